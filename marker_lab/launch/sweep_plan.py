"""The cells of a sweep: composed and checked before anything is submitted, listed in the manifest, and held
against the results already in the sweep directory so a rerun runs only what is missing, stale or damaged.
The sweep directory's layout is in marker_lab/results/sweep.py.
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

from omegaconf import DictConfig, OmegaConf, open_dict

from marker_lab.core.errors import config_error_line
from marker_lab.launch.hydra_compat import hydra_config
from marker_lab.results import contract
from marker_lab.results.sweep import cell_state, write_manifest as _write_manifest


@dataclass
class PlannedCell:
    index: int  # position in the sweep
    overrides: list[str]  # the cell's Hydra overrides
    subdir: str  # its directory under the sweep dir (named from its overrides)
    config_hash: str  # what a complete result must carry to count as this cell
    complete: bool = False  # a current result is already there
    engine_per: str = "cell"  # the cell's engine_per: base cells leave their sampling to the sweep's shared eval
    completions: int = 0  # what its eval samples (eval.checks.cell_size)
    judge_calls: int = 0  # and the judge calls those take
    training_examples: int = 0  # its stages' examples, summed


class SweepConfigError(ValueError):
    """One or more cells of a sweep cannot run; the message has a line per bad cell."""


def plan_cells(config_loader, config: DictConfig, job_overrides: Sequence[Sequence[str]],
               initial_index: int = 0) -> list[PlannedCell]:
    """Compose and check every cell and its inputs (no model is loaded) and find the ones already complete."""
    from marker_lab.eval.checks import cell_size
    from marker_lab.cell.preflight import preflight

    plans, errors = [], []
    sweep_dir = Path(str(config.hydra.sweep.dir))
    for i, overrides in enumerate(job_overrides):
        try:
            cell_cfg = config_loader.load_sweep_config(config, list(overrides))
        except Exception as e:  # a group option that does not exist, a wrong type: one line per cell
            errors.append(f"cell {' '.join(overrides)}: {config_error_line(e)}")
            continue
        with hydra_config(cell_cfg):  # lets ${hydra:...} resolve as in the job
            subdir = str(OmegaConf.select(cell_cfg, "hydra.sweep.subdir"))
            task_cfg = copy.deepcopy(cell_cfg)
            with open_dict(task_cfg):
                del task_cfg["hydra"]
                task_cfg.output_dir = str(sweep_dir / subdir)
            try:
                task = OmegaConf.to_object(task_cfg)
                size = cell_size(task, preflight(task))
                resolved = OmegaConf.to_container(task_cfg, resolve=True, enum_to_str=True)
            except Exception as e:  # ConfigError, or a composition error from omegaconf
                errors.append(f"cell {' '.join(overrides)}: {' '.join(str(e).split())}")
                continue
            plan = PlannedCell(initial_index + i, list(overrides), subdir, contract.config_hash(resolved),
                            engine_per=str(resolved.get("engine_per", "cell")), completions=size.completions,
                            judge_calls=size.judge_calls, training_examples=sum(size.training_examples.values()))
            state, _ = cell_state(sweep_dir, asdict(plan))
        plan.complete = state.state == "complete"
        plans.append(plan)
    if errors:
        raise SweepConfigError(f"{len(errors)} of {len(job_overrides)} cells cannot run; nothing was submitted:\n"
                               + "\n".join(errors))
    return plans


def sweep_size(plans: list[PlannedCell]) -> str:
    """What the cells still to run will do, summed (logged before any is submitted)."""
    todo = [p for p in plans if not p.complete]
    return (f"{len(todo)} cells to run: {sum(p.completions for p in todo)} completions to sample, "
            f"{sum(p.judge_calls for p in todo)} judge calls, {sum(p.training_examples for p in todo)} training "
            "examples (stages already in the cache train nothing)")


def write_manifest(sweep_dir: Path, plans: list[PlannedCell], launcher: str) -> None:
    """Every expected cell of this command, added to the sweep's manifest before any starts."""
    _write_manifest(sweep_dir, [asdict(p) for p in plans], launcher)
