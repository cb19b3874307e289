"""What Hydra runs for a cell: its status record, the cell, and how it ended (one line and an exit code for a
config, input or endpoint problem or an interrupt; anything else recorded, then raised for Hydra / submitit)."""

from __future__ import annotations

import logging
import signal
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

from marker_lab.cell.recipe import run_cell
from marker_lab.config.schema import register_configs
from marker_lab.core import environment
from marker_lab.core.errors import ConfigError, MarkerLabError
from marker_lab.core.files import CONF
from marker_lab.results import contract
from marker_lab.results.contract import PendingEval

log = logging.getLogger("marker_lab")
CONF_DIR = str(CONF)

_PHASES = {"checks": "its start-up checks", "load": "loading the model", "baseline": "the baseline eval",
           "coupling": "the coupling stage", "second_stage": "the second stage", "eval": "the eval",
           "write": "writing its result"}  # how the interrupt line names a phase


class Killed(BaseException):
    """The cell's process got a termination signal (recorded before it exits; SIGKILL leaves no chance to)."""


def _on_signal(signum, _frame):
    raise Killed(f"killed by signal {signum} ({signal.Signals(signum).name})")


def cell_main(cfg: DictConfig):
    """What Hydra runs for a cell: its status record, the cell, and how it ended (a config, input or endpoint
    problem is one line and exit code 2 or 1; anything else is recorded, then raised for Hydra / submitit)."""
    out_dir = Path(cfg.output_dir)
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _on_signal)
    signal.signal(signal.SIGINT, signal.default_int_handler)  # a sweep's launcher starts cells with it ignored
    phase = ["start"]  # the phase running now, for the status file and an interrupt's line

    def on_phase(name: str) -> None:
        phase[0] = name
        contract.write_cell_status(out_dir, "running", phase=name)

    contract.write_cell_status(out_dir, "running", phase=phase[0])
    try:
        result = run_cell(cfg, in_sweep=_in_sweep(), on_phase=on_phase)
    except KeyboardInterrupt:  # Ctrl-C: one line, the phase recorded; the stage cache keeps what finished
        contract.write_cell_status(out_dir, "interrupted", phase=phase[0], error=f"interrupted during {phase[0]}")
        if environment.full_error():
            raise
        print(f"marker-lab: interrupted: cell {out_dir} during {_PHASES.get(phase[0], phase[0])}; rerun the same "
              "command to resume", file=sys.stderr, flush=True)
        sys.exit(130)
    except MarkerLabError as e:  # a config, input or endpoint problem: one line, no traceback
        kind = "config error" if isinstance(e, ConfigError) else "error"
        contract.write_cell_status(out_dir, "failed", error=f"{kind}: {e}")
        log.error("%s: %s", kind, e)
        sys.exit(2 if isinstance(e, ConfigError) else 1)
    except BaseException as e:  # recorded for `marker-lab status`, then re-raised for Hydra / submitit
        contract.write_cell_status(out_dir, "failed", error=f"{type(e).__name__}: {e}")
        raise
    if isinstance(result, PendingEval):
        contract.write_cell_status(out_dir, "awaiting_eval")
        return result.partial.config_hash
    contract.write_cell_status(out_dir, "complete")
    return result.config_hash


def _in_sweep() -> bool:
    """Whether this cell runs as one job of a multirun sweep (whose launcher runs the shared eval afterwards)."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


_hydra_app = hydra.main(config_path=CONF_DIR, config_name="config", version_base="1.3")(cell_main)


def main() -> None:
    """`python -m marker_lab.run [overrides]`: the schema registered with Hydra, then one cell (or a multirun)."""
    environment.use_expandable_segments()  # before anything can start CUDA
    register_configs()
    _hydra_app()
