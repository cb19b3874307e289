"""The coupling stage: a pre-baked adapter, or the configured kind trained (and cached), and its checks."""

from __future__ import annotations

from marker_lab.config.schema import Config
from marker_lab.core.cache import StageCache
from marker_lab.models import LoadedModel
from marker_lab.stages.coupling.contrastive import run_contrastive
from marker_lab.stages.coupling.marker import run_marker
from marker_lab.stages.during_training import StepEval
from marker_lab.stages.lora_stage import StageResult, apply_prebaked_adapter


def run_coupling(cfg: Config, inputs, loaded: LoadedModel, cache: StageCache,
                 step_eval: StepEval | None = None) -> StageResult:
    """The coupling stage of a cell (trained, cached, or pre-baked), merged into `loaded`."""
    c = cfg.coupling
    if c.adapter_path:
        return apply_prebaked_adapter("coupling", loaded, inputs.files["coupling.adapter_path"])
    if c.kind == "marker":
        return run_marker(cfg, inputs, loaded, cache, step_eval)
    return run_contrastive(cfg, inputs, loaded, cache, step_eval)
