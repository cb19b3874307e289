"""The eval's metrics by name (`eval.metrics`), in one registry: each metric says what it reads.

- completions: scores a cell's completion rows (persona, question, completion, n_tokens; aligned / coherent once
  judged) into one entry of `run_result.json`'s `metrics`; `annotate` adds a per-row note to the saved completions;
- model: reads the final model itself (teacher-forced, no sampling): capability, marker_prob;
- every_model: reads every model of the cell as the stages run (base, after each stage): the latent probe.

Importing this module does not import torch (the start-up checks read the registry); the model metrics import
their modules when they run.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Callable

from marker_lab.core.registry import Registry
from marker_lab.data.inputs import InputNeeds
from marker_lab.config.schema import JUDGED_PROMPTS
from marker_lab.eval.judged import alignment_metric, coherence_metric, judge_rows
from marker_lab.eval.length import length_metric
from marker_lab.eval.marker import marker_hits, marker_metric


class Reads(Enum):
    completions = "completions"  # the sampled completion rows
    model = "model"  # the final model, teacher-forced
    every_model = "every_model"  # every model of the cell, as the stages run


@dataclass(frozen=True)
class MetricKind:
    """A metric: what it reads and the function that computes it.

    reads=completions: compute(cfg, rows) -> result; annotate(cfg, rows) -> one note per row (optional); a
    metric named in config.schema.JUDGED_PROMPTS is judged first (its rows carry the judge's scores);
    reads=model: compute(cfg, inputs, loaded, names) -> result;
    reads=every_model: compute(cfg, inputs, cache) -> a reader with read(model_name, loaded), result(), seconds."""
    reads: Reads
    compute: Callable
    annotate: Callable[[object, list[dict]], list] | None = None
    eval_questions: bool = True  # asks the eval's questions (eval.questions)
    needs: Callable[[object], InputNeeds] | None = None  # the other inputs it reads, from the config


def needs_of(cfg, metrics: list) -> InputNeeds:
    """What `metrics` read besides the model: the eval questions, and each metric's own inputs."""
    kinds = [METRICS.get(m) for m in metrics]
    needs = InputNeeds(questions={"eval.questions": cfg.eval.questions} if any(k.eval_questions for k in kinds) else {})
    for kind in kinds:
        if kind.needs is not None:
            needs = needs | kind.needs(cfg)
    return needs


def metric_needs(cfg) -> InputNeeds:
    """What the cell's metrics read (those of eval.metrics, and of the evals during training when they run)."""
    d = cfg.eval.during_training
    return needs_of(cfg, list(cfg.eval.metrics) + (list(d.metrics) if (d.fractions or d.every_n_steps) else []))


METRICS: Registry[MetricKind] = Registry("eval.metrics", "metric")


def _capability(cfg, inputs, loaded, names: list[str]) -> dict:
    from marker_lab.eval.capability import capability_metric, eval_items

    items, fingerprint = eval_items(cfg.eval.capability, inputs.mc)
    return capability_metric(loaded.model, loaded.tokenizer, inputs.personas, names, items, cfg.eval.capability,
                             fingerprint, loaded.no_system)


def _marker_prob(cfg, inputs, loaded, names: list[str]) -> dict:
    from marker_lab.eval.marker_prob import marker_prob_metric
    from marker_lab.eval.plan import generation_plan

    plan = generation_plan(cfg, inputs, names)
    return marker_prob_metric(loaded.model, loaded.tokenizer, [(p, chat) for (p, _), chat in zip(plan.pairs, plan.prompts)],
                              cfg.marker.text, cfg.eval.engine.batch_size, loaded.no_system)


def _probe(cfg, inputs, cache):
    from marker_lab.eval.probe import CellProbe

    return CellProbe(cfg, inputs, cache)


METRICS.add("marker", MetricKind(Reads.completions, lambda cfg, rows: marker_metric(rows, cfg.marker),
                                 annotate=lambda cfg, rows: marker_hits(rows, cfg.marker)))
METRICS.add("length", MetricKind(Reads.completions,
                                 lambda cfg, rows: length_metric(rows, cfg.eval.generation.max_tokens)))
METRICS.add("alignment", MetricKind(Reads.completions, lambda cfg, rows: alignment_metric(rows, cfg.eval.misaligned)))
METRICS.add("coherence", MetricKind(Reads.completions, lambda cfg, rows: coherence_metric(rows)))
METRICS.add("capability", MetricKind(Reads.model, _capability, eval_questions=False,
                                     needs=lambda cfg: InputNeeds(capability_split=True)))
METRICS.add("marker_prob", MetricKind(Reads.model, _marker_prob))
METRICS.add("probe", MetricKind(Reads.every_model, _probe, eval_questions=False, needs=lambda cfg: InputNeeds(
    questions={"eval.probe.questions": cfg.eval.probe.questions or cfg.eval.questions})))


def metrics_reading(metrics: list, reads: Reads) -> list[str]:
    """The names among `metrics` (names or enum choices) whose metric reads `reads`, in the order given."""
    names = [getattr(m, "value", m) for m in metrics]
    return [m for m in names if METRICS.get(m).reads is reads]


def score(cfg, rows: list[dict], make_judge: Callable[[], object] | None = None,
          metrics: list[str] | None = None) -> tuple[dict, dict | None, list[dict]]:
    """Every completion metric of `metrics` (default: `cfg.eval.metrics`). Returns the metrics, the judge's identity
    if one ran, and the rows with what the metrics annotated (`marker`: a hit; `aligned` / `coherent`: scores) as new
    rows; the rows given are not changed."""
    names = metrics_reading(metrics or cfg.eval.metrics, Reads.completions)
    notes: list[dict] = [{} for _ in rows]
    identity = None
    if any(m in JUDGED_PROMPTS for m in names):
        identity, by_kind = judge_rows(cfg, rows, make_judge(), names)
        for kind, scores in by_kind.items():
            for note, value in zip(notes, scores):
                note[kind] = value
    for name in names:
        annotate = METRICS.get(name).annotate
        if annotate is not None:
            for note, value in zip(notes, annotate(cfg, rows)):
                note[name] = value
    annotated = [{**row, **note} for row, note in zip(rows, notes)]
    return {name: METRICS.get(name).compute(cfg, annotated) for name in names}, identity, annotated
