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
    "capability": None,  # read from the model, not from completions: computed in eval.cell.evaluate (eval/capability.py)
    "marker_prob": None,  # read from the model too: teacher-forced, in eval.cell.evaluate (eval/marker_prob.py)
    "probe": None,  # read from every model of the cell as the stages run: computed in run.run_cell (eval/probe.py)
}


# metrics read from the model itself rather than from completions (eval/capability.py, eval/marker_prob.py)
MODEL_METRICS = ("capability", "marker_prob")
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
