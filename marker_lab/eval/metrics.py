"""The eval's metrics by name (`eval.metrics`): each scores a cell's completion rows into one entry of
`run_result.json`'s `metrics`."""

from __future__ import annotations

from typing import Callable

from marker_lab.eval.length import length_metric
from marker_lab.eval.marker import marker_metric

# name -> f(cfg, rows) -> the metric's result; rows are completion records (persona, question, completion, n_tokens)
METRICS: dict[str, Callable[[object, list[dict]], dict]] = {
    "marker": lambda cfg, rows: marker_metric(rows, cfg.marker),
    "length": lambda cfg, rows: length_metric(rows, cfg.eval.generation.max_tokens),
}


def score(cfg, rows: list[dict]) -> dict:
    """Every metric of `cfg.eval.metrics`, in order."""
    return {name: METRICS[name](cfg, rows) for name in cfg.eval.metrics}
