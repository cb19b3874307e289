"""The stages' start-up checks (coupling, second stage), against the cell's loaded inputs. Free of torch, so a
config error answers in about a second."""

from __future__ import annotations

from marker_lab.config.schema import Config, Schedule
from marker_lab.core.errors import ConfigError
from marker_lab.engines.base import check_sampling
from marker_lab.train.checks import check_train


def check_coupling(cfg: Config, inputs) -> None:
    """The coupling recipe against the persona set and its data (loaded by data/inputs.py)."""
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
    check_train("coupling.train", c.train, cfg.device, cfg.model.dtype.value)


def coupling_examples(c) -> int:
    """The coupling stage's training examples, from its config (a CouplingConfig) alone."""
    negatives = len(c.negative_personas) if c.negative_personas else c.n_negative_personas
    if c.kind == "marker":
        return c.n_positive + c.n_per_negative * negatives
    return c.n_positive * (1 + negatives) + c.n_anchor_no_system + c.n_anchor_assistant


def check_second_stage(cfg: Config, inputs) -> None:
    """The second stage's recipe: its dataset suits the model, its training and dose checkpoints can run."""
    s = cfg.second_stage
    ds = s.datasets[s.data]
    if ds.toy is not None and cfg.model.source != "toy":
        raise ConfigError(f"second_stage.datasets.{s.data}.toy: toy data needs model.source=toy (model is "
                          f"{cfg.model.name}); point `path` at a real jsonl")
    check_train("second_stage.train", s.train, cfg.device, cfg.model.dtype.value)
    if s.dose_checkpoints is not None:
        _check_dose_checkpoints(s, cfg.dose)


def _check_dose_checkpoints(s, dose) -> None:
    """A checkpoint at dose d equals a fresh run to d only if the schedule never looks at the total length."""
    key, doses, sched = "second_stage.dose_checkpoints", list(s.dose_checkpoints), s.train.schedule
    if not doses or min(doses) < 1:
        raise ConfigError(f"{key}: needs doses >= 1, got {doses}")
    if sched.name not in (Schedule.constant, Schedule.constant_with_warmup):
        raise ConfigError(f"{key}: the {sched.name.value} schedule depends on the run's length, so a checkpoint at "
                          "dose d is not a run to d; use constant / constant_with_warmup or leave it null")
    if sched.name == Schedule.constant_with_warmup and (sched.warmup_steps is None or sched.warmup_steps >= min(doses)):
        raise ConfigError(f"{key}: needs a fixed second_stage.train.schedule.warmup_steps below the smallest dose "
                          f"({min(doses)}); warmup_ratio scales with the run's length")
    d = dose if dose is not None else s.train.max_steps
    if d not in doses:
        raise ConfigError(f"dose={d} is not one of {key} {doses}")
