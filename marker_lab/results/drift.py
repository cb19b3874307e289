"""Representation drift (003's question: does EM compress the persona manifold?): the persona geometry of every
model of a cell (`geometry.drift=true`), summarised per model and drawn per condition.

A cell's result carries `drift`: per model (base, after_<stage> in the order the stages ran) the mean cosine
distance over persona pairs, the source-to-assistant distance, the relative spread of the raw persona vectors,
and each one's change from the base model.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from marker_lab.results.sweep import CELL_KEYS, GROUP_KEYS
from marker_lab.results.plotting import plt, save

SUMMARIES = ("mean_distance", "source_assistant", "relative_spread")


def load_drift(results: list) -> pd.DataFrame:
    """One row per (cell, model): the drift summary, `step` = the model's position (0 = base)."""
    rows = []
    for cell, result in results:
        for step, (model, summary) in enumerate((result.drift or {}).items()):
            rows.append({"cell": cell["subdir"], **result.cell.as_dict(), "model": model, "step": step,
                         **{k: v for k, v in summary.items() if k not in ("file", "cache_key")}})
    return pd.DataFrame(rows, columns=None if rows else ["cell", *CELL_KEYS, "model", "step"])


def drift_figure(drift: pd.DataFrame, out: Path) -> list[Path]:
    """One panel per summary: each cell group's line over its models (seeds averaged, min-max band)."""
    if drift.empty:
        return []
    summaries = [s for s in SUMMARIES if s in drift and drift[s].notna().any()]
    fig, axes = plt.subplots(1, len(summaries), figsize=(4.2 * len(summaries), 3.6), squeeze=False)
    keys = [k for k in GROUP_KEYS if k in drift and drift[k].nunique(dropna=False) > 1] or ["condition"]
    for ax, summary in zip(axes[0], summaries):
        for key, part in drift.groupby(keys, dropna=False, sort=True):
            g = part.groupby(["step", "model"], sort=True)[summary].agg(["mean", "min", "max"]).reset_index()
            label = ", ".join(str(v) for v in (key if isinstance(key, tuple) else (key,)))
            line, = ax.plot(g["step"], g["mean"], marker="o", label=label)
            ax.fill_between(g["step"], g["min"], g["max"], color=line.get_color(), alpha=0.15)
        # by position, not name: in reverse order the second stage runs first
        steps = sorted(drift["step"].unique())
        ax.set_xticks(steps, ["base" if s == 0 else f"after\nstage {s}" for s in steps], fontsize=8)
        ax.set_title(summary.replace("_", " "), fontsize=10)
    axes[0][0].legend(fontsize=7, title=" / ".join(keys), title_fontsize=7)
    fig.suptitle("Persona geometry drift over the cell's models, in the order its stages ran (seeds averaged; band: "
                 "min-max over seeds)", fontsize=10)
    fig.tight_layout()
    return save(fig, out, "drift")
