"""A cell's plan: every check, every input and the cell's whole identity, settled before a model loads.

    plan = plan_cell(cfg_node, in_sweep=False)   # ConfigError (one line) on the first problem

The identity is the `CellKey` the result and every table group by (the dose settled here, from the data when the
recipe trains for epochs), the config hash, and the inputs with their checksums. Nothing here imports torch.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from marker_lab.config.schema import Config, EnginePer, coupling_enabled, second_stage_enabled
from marker_lab.cell.preflight import preflight
from marker_lab.data.formats import SECOND_STAGE_FORMATS
from marker_lab.data.inputs import CellInputs
from marker_lab.eval.metrics import Reads, metrics_reading
from marker_lab.results.contract import CellKey, config_hash
from marker_lab.stages.checks import settled_dose


@dataclass(frozen=True)
class CellPlan:
    """What a cell is and will do, fixed before any model loads."""
    cfg: Config  # the typed config
    resolved: dict  # the resolved config, as saved next to the result and hashed
    config_hash: str  # sha256 of `resolved` without location keys
    inputs: CellInputs  # every input file, read and checked once, with checksums
    key: CellKey  # the cell's identity in tables
    stages: tuple[str, ...]  # the stages it runs, in order
    samples_here: bool  # False: a sweep's shared engine samples it later (engine_per=base)

    @property
    def out_dir(self) -> Path:
        return Path(self.cfg.output_dir)


def plan_cell(cfg_node: DictConfig, in_sweep: bool = False) -> CellPlan:
    """Check the config and its inputs, and settle the cell's identity (`in_sweep`: one cell of a multirun sweep,
    whose launcher runs the shared eval afterwards)."""
    cfg: Config = OmegaConf.to_object(cfg_node)
    inputs = preflight(cfg)  # every check and input file, before any model is loaded
    resolved = OmegaConf.to_container(cfg_node, resolve=True, enum_to_str=True)
    shared = in_sweep and cfg.engine_per == EnginePer.base
    return CellPlan(cfg, resolved, config_hash(resolved), inputs, cell_key(cfg, inputs), stage_order(cfg),
                    samples_here=not (shared and bool(metrics_reading(cfg.eval.metrics, Reads.completions))))


def stage_order(cfg: Config) -> tuple[str, ...]:
    """The stages this cell runs, in order (forward: couple then second stage; reverse: the other way)."""
    names = ["coupling", "second_stage"] if cfg.order == "forward" else ["second_stage", "coupling"]
    enabled = {"coupling": coupling_enabled(cfg), "second_stage": second_stage_enabled(cfg)}
    return tuple(n for n in names if enabled[n])


def cell_key(cfg: Config, inputs: CellInputs) -> CellKey:
    """The cell's keys, from its config and inputs."""
    return CellKey(experiment=cfg.experiment, condition=cfg.condition, order=str(cfg.order), seed=cfg.seed,
                   dose=settled_dose(cfg, inputs), source_persona=cfg.source_persona,
                   coupled_persona=cfg.coupling.persona if coupling_enabled(cfg) else None,
                   second_stage=second_stage_label(cfg) if second_stage_enabled(cfg) else "none")


def second_stage_label(cfg: Config) -> str:
    """The second stage's data name, with its variant when not the plain chat recipe: "em", "em (raw)",
    "em (kl=0.5)", so the arms of a variant sweep stay apart in every table."""
    s = cfg.second_stage
    label = SECOND_STAGE_FORMATS.get(s.format).label
    variant = ([label] if label else []) + ([f"kl={s.train.kl_to_input:g}"] if s.train.kl_to_input else [])
    return f"{s.data} ({', '.join(variant)})" if variant else s.data
