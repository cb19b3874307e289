"""The stages' start-up checks (coupling, second stage), against the cell's loaded inputs. Free of torch, so a
config error answers in about a second."""

from __future__ import annotations

from marker_lab.config.schema import Config, Schedule, second_stage_enabled
from marker_lab.core.errors import ConfigError
from marker_lab.engines.base import check_sampling
from marker_lab.stages.coupling_kinds import COUPLING_KINDS
from marker_lab.train.checks import check_train
from marker_lab.train.steps import resolve_steps


def check_coupling(cfg: Config, inputs) -> None:
    """The coupling recipe against the persona set and its data (loaded by data/inputs.py)."""
    c = cfg.coupling
    inputs.require_persona("coupling.persona", c.persona, cfg)
    kind = COUPLING_KINDS.get(c.kind)
    kind.check(cfg, inputs)
    if not kind.has_marker and c.train.loss_mode == "marker_only":
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
    return COUPLING_KINDS.get(c.kind).examples(c)


def settled_dose(cfg: Config, inputs) -> int:
    """The second stage's optimizer steps: `dose`, else its recipe's max_steps, else its epochs over the loaded
    data; 0 without a second stage. The one place a cell resolves `dose` (its plan's CellKey holds it): the stage
    trains this many steps."""
    if not second_stage_enabled(cfg):
        return 0
    s = cfg.second_stage
    return resolve_steps(s.train, len(inputs.datasets[f"second_stage.datasets.{s.data}"].rows), cfg.dose)


def check_second_stage(cfg: Config, inputs) -> None:
    """The second stage's recipe: its dataset suits the model, its training and dose checkpoints can run."""
    s = cfg.second_stage
    ds = s.datasets[s.data]
    if ds.toy is not None and cfg.model.source != "toy":
        raise ConfigError(f"second_stage.datasets.{s.data}.toy: toy data needs model.source=toy (model is "
                          f"{cfg.model.name}); point `path` at a real jsonl")
    check_train("second_stage.train", s.train, cfg.device, cfg.model.dtype.value)
    if s.dose_checkpoints is not None:
        _check_dose_checkpoints(s, settled_dose(cfg, inputs))


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
    if dose not in doses:
        raise ConfigError(f"dose={dose} is not one of {key} {doses}")
