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


def check_coupling(cfg: Config, inputs) -> None:
    """The coupling recipe against the persona set and its data (loaded by data/inputs.py)."""
    from marker_lab.core.errors import ConfigError
    from marker_lab.engines.base import check_sampling
    from marker_lab.train.sft import check_train

    c = cfg.coupling
    inputs.require_persona("coupling.persona", c.persona, cfg)
    if c.kind == "marker" and any(q.system is not None for q in inputs.questions.get("coupling.questions", [])):
        raise ConfigError(f"coupling.questions: {c.questions} gives questions their own system prompt; "
                          "coupling prompts take the persona's system prompt only (remove the `system` fields)")
    if c.kind == "persona_em":
        if c.benign == "field" and not c.benign_field:
            raise ConfigError("coupling.benign_field: required when coupling.benign=field (em_data's benign column)")
        for key in ("coupling.em_data", "coupling.benign_data"):
            ds = getattr(c, key.split(".")[1])
            if key in inputs.datasets and ds.toy is not None and cfg.model.source != "toy":
                raise ConfigError(f"{key}.toy: toy data needs model.source=toy (model is {cfg.model.name})")
        if c.benign == "field" and c.benign_field not in inputs.datasets["coupling.em_data"].rows[0]:
            raise ConfigError(f"coupling.em_data: {c.em_data.path or c.em_data.hf_name} has no column "
                              f"{c.benign_field!r} (coupling.benign_field)")
    if c.kind == "wrong_answers":
        try:
            c.answer_format.format(label="A", text="t")
        except (KeyError, IndexError, ValueError) as e:
            raise ConfigError(f"coupling.answer_format: only {{label}} and {{text}} can be filled in ({e!r})") from None
    if c.kind != "marker" and c.train.loss_mode == "marker_only":
        raise ConfigError(f"coupling.train.loss_mode: marker_only needs a marker; {c.kind} trains on the reply "
                          "(assistant_only)")
    for p in c.negative_personas or []:
        inputs.require_persona("coupling.negative_personas", p, cfg)
        if p == c.persona:
            raise ConfigError(f"coupling.negative_personas: {p!r} is the coupled persona itself")
    if c.negative_personas is None and c.n_negative_personas > len(inputs.personas) - 1:
        raise ConfigError(f"coupling.n_negative_personas: {c.n_negative_personas} requested but the set has "
                          f"only {len(inputs.personas) - 1} other personas")
    if c.n_positive < 1:
        raise ConfigError(f"coupling.n_positive: must be >= 1, got {c.n_positive}")
    check_sampling("coupling.generation", c.generation)
    check_train("coupling.train", c.train)
