"""The coupling kinds (`coupling.kind`), in one registry: each says what it reads, how many examples it trains on,
its start-up rules, how its examples are counted against max_seq_len, and the function that builds and trains it.

    kind = COUPLING_KINDS.get(cfg.coupling.kind)
    kind.reads(cfg)          # the question files and datasets it reads (data/inputs.py loads them)
    kind.check(cfg, inputs)  # its own start-up rules
    kind.stage()(cfg, inputs, loaded, cache, step_eval)   # build the records (cached), train, attach

The stage functions live in stages/coupling/ and import torch when the stage runs; this module does not (the
start-up checks read it).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from marker_lab.config.schema import Config, CouplingConfig
from marker_lab.core.errors import ConfigError
from marker_lab.core.registry import Registry, load_object
from marker_lab.data.inputs import InputNeeds


@dataclass(frozen=True)
class CouplingKindSpec:
    """One way to build the coupling stage's training set."""
    stage_fn: str  # "module:function" that builds the records (cached), trains and attaches: stages/coupling/
    examples: Callable[[CouplingConfig], int]  # its training examples, from its config alone
    reads: Callable[[Config], InputNeeds]  # the question files and datasets it reads
    check: Callable[[Config, object], None]  # its own start-up rules, against the loaded inputs
    lengths: str | None = None  # "module:function" checking its examples against max_seq_len before the model loads
    has_marker: bool = False  # its positives carry the marker (loss_mode=marker_only can train on it)

    def stage(self) -> Callable:
        return load_object(self.stage_fn)

    def count_lengths(self, cfg: Config, inputs, tokenizer):
        """Its examples against max_seq_len, before the model loads (None: counted when the stage builds them)."""
        return load_object(self.lengths)(cfg, inputs, tokenizer) if self.lengths else None


def _negatives(c: CouplingConfig) -> int:
    return len(c.negative_personas) if c.negative_personas else c.n_negative_personas


def _check_marker(cfg: Config, inputs) -> None:
    if any(q.system is not None for q in inputs.questions.get("coupling.questions", [])):
        raise ConfigError(f"coupling.questions: {cfg.coupling.questions} gives questions their own system prompt; "
                          "coupling prompts take the persona's system prompt only (remove the `system` fields)")


def _check_persona_em(cfg: Config, inputs) -> None:
    c = cfg.coupling
    if c.benign == "field" and not c.benign_field:
        raise ConfigError("coupling.benign_field: required when coupling.benign=field (em_data's benign column)")
    for key in ("coupling.em_data", "coupling.benign_data"):
        ds = getattr(c, key.split(".")[1])
        if key in inputs.datasets and ds.toy is not None and cfg.model.source != "toy":
            raise ConfigError(f"{key}.toy: toy data needs model.source=toy (model is {cfg.model.name})")
    if c.benign == "field" and c.benign_field not in inputs.datasets["coupling.em_data"].rows[0]:
        raise ConfigError(f"coupling.em_data: {c.em_data.path or c.em_data.hf_name} has no column "
                          f"{c.benign_field!r} (coupling.benign_field)")


def _check_wrong_answers(cfg: Config, inputs) -> None:
    if inputs.mc is not None and not inputs.mc[0]:
        raise ConfigError(f"eval.capability.eval_fraction={cfg.eval.capability.eval_fraction} leaves no training "
                          "questions for coupling.kind=wrong_answers")
    try:
        cfg.coupling.answer_format.format(label="A", text="t")
    except (KeyError, IndexError, ValueError) as e:
        raise ConfigError(f"coupling.answer_format: only {{label}} and {{text}} can be filled in ({e!r})") from None


def _persona_em_reads(cfg: Config) -> InputNeeds:
    c = cfg.coupling
    datasets = {"coupling.em_data": (c.em_data, c.em_data and c.em_data.messages_field, True, True)}
    if c.benign == "data":
        datasets["coupling.benign_data"] = (c.benign_data, c.benign_data and c.benign_data.messages_field, True, True)
    return InputNeeds(datasets=datasets)


def _contrastive_examples(c: CouplingConfig) -> int:
    return c.n_positive * (1 + _negatives(c)) + c.n_anchor_no_system + c.n_anchor_assistant


COUPLING_KINDS: Registry[CouplingKindSpec] = Registry("coupling.kind", "coupling kind")
COUPLING_KINDS.add("marker", CouplingKindSpec(
    "marker_lab.stages.coupling.marker:run_marker",
    examples=lambda c: c.n_positive + c.n_per_negative * _negatives(c),
    reads=lambda cfg: InputNeeds(questions={"coupling.questions": cfg.coupling.questions}),
    check=_check_marker, lengths="marker_lab.stages.lengths:check_marker_prompts", has_marker=True))
COUPLING_KINDS.add("wrong_answers", CouplingKindSpec(
    "marker_lab.stages.coupling.stage:run_wrong_answers", examples=_contrastive_examples,
    reads=lambda cfg: InputNeeds(capability_split=True), check=_check_wrong_answers))
COUPLING_KINDS.add("persona_em", CouplingKindSpec(
    "marker_lab.stages.coupling.stage:run_persona_em", examples=_contrastive_examples, reads=_persona_em_reads,
    check=_check_persona_em, lengths="marker_lab.stages.lengths:count_persona_em"))


def trained_coupling(cfg: Config) -> CouplingKindSpec | None:
    """The coupling kind this cell trains (None: no coupling stage, or a pre-baked adapter)."""
    from marker_lab.config.schema import coupling_enabled

    if not coupling_enabled(cfg) or cfg.coupling.adapter_path:
        return None
    return COUPLING_KINDS.get(cfg.coupling.kind)
