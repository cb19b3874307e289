"""The eval's metrics by name (`eval.metrics`): each scores a cell's completion rows into one entry of
`run_result.json`'s `metrics`."""

from __future__ import annotations

from typing import Callable

from marker_lab.eval.judged import JUDGED_METRICS, alignment_metric, coherence_metric, judge_rows
from marker_lab.eval.length import length_metric
from marker_lab.eval.marker import marker_hits, marker_metric

# name -> f(cfg, rows) -> the metric's result; rows are completion records (persona, question, completion, n_tokens;
# aligned / coherent once judged)
METRICS: dict[str, Callable[[object, list[dict]], dict] | None] = {
    "marker": lambda cfg, rows: marker_metric(rows, cfg.marker),
    "length": lambda cfg, rows: length_metric(rows, cfg.eval.generation.max_tokens),
    "alignment": lambda cfg, rows: alignment_metric(rows, cfg.eval.misaligned),
    "coherence": lambda cfg, rows: coherence_metric(rows),
    "capability": None,  # read from the model, not from completions: computed in run.evaluate (eval/capability.py)
    "probe": None,  # read from every model of the cell as the stages run: computed in run.run_cell (eval/probe.py)
}


# metrics read from the model itself rather than from completions (marker_lab.eval.capability)
MODEL_METRICS = ("capability",)
# metrics read from every model of a cell (base, after each stage), not only the final one
CELL_METRICS = ("probe",)


def score(cfg, rows: list[dict], make_judge: Callable[[], object] | None = None,
          metrics: list[str] | None = None) -> tuple[dict, dict | None, list[dict]]:
    """Every completion metric of `metrics` (default: `cfg.eval.metrics`). Returns the metrics, the judge's identity
    if one ran, and the rows with what the metrics annotated (`marker`: a hit; `aligned` / `coherent`: scores) as new
    rows; the rows given are not changed."""
    metrics = [m for m in (metrics or cfg.eval.metrics) if m not in MODEL_METRICS + CELL_METRICS]
    notes: list[dict] = [{} for _ in rows]
    identity = None
    if any(m in JUDGED_METRICS for m in metrics):
        identity, by_kind = judge_rows(cfg, rows, make_judge(), metrics)
        for kind, scores in by_kind.items():
            for note, value in zip(notes, scores):
                note[kind] = value
    if "marker" in metrics:
        for note, hit in zip(notes, marker_hits(rows, cfg.marker)):
            note["marker"] = hit
    annotated = [{**row, **note} for row, note in zip(rows, notes)]
    return {name: METRICS[name](cfg, annotated) for name in metrics}, identity, annotated


def check_eval(cfg, inputs) -> None:
    """The eval's own rules: a question's system prompt is used or refused, never dropped; evals during training
    name metrics and personas that exist."""
    from marker_lab.core.errors import ConfigError

    questions = inputs.questions.get("eval.questions", [])
    with_system = [q.id for q in questions if q.system is not None]
    if with_system and cfg.eval.question_system == "error":
        raise ConfigError(f"eval.questions: {cfg.eval.questions} gives questions {with_system[:3]} their own system "
                          "prompt; set eval.question_system=append (after each persona's) or replace to use it")
    d, key = cfg.eval.during_training, "eval.during_training"
    if not (d.fractions or d.every_n_steps):
        return
    bad = [f for f in d.fractions or [] if not 0 < f <= 1]
    if bad:
        raise ConfigError(f"{key}.fractions: must be in (0, 1], got {bad}")
    if d.every_n_steps is not None and d.every_n_steps < 1:
        raise ConfigError(f"{key}.every_n_steps: must be >= 1 (or null), got {d.every_n_steps}")
    if d.samples_per_question is not None and d.samples_per_question < 1:
        raise ConfigError(f"{key}.samples_per_question: must be >= 1 or null, got {d.samples_per_question}")
    if "coupling" in d.stages and cfg.coupling.adapter_path:
        raise ConfigError(f"{key}.stages: coupling is a pre-baked adapter (coupling.adapter_path); nothing trains")
    if "probe" in d.metrics:
        raise ConfigError(f"{key}.metrics: probe reads every model of the cell, not a model mid-training; remove it")
    if not d.metrics:
        raise ConfigError(f"{key}.metrics: empty; available: {list(METRICS)}")
    for p in d.personas or []:
        inputs.require_persona(f"{key}.personas", p, cfg)
