"""The write-ups' standard figures, each saved as PNG and PDF (matplotlib, no display needed)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.ticker import NullLocator

from marker_lab.results.plotting import plt, save
from marker_lab.results.sweep import GROUP_KEYS

ROLE_COLORS = {"source": "#1f77b4", "assistant": "#ff7f0e", "bystander mean": "#2ca02c"}


def labels(pooled: pd.DataFrame) -> pd.Series:
    """A short name per pooled cell group, from the keys that vary across the sweep."""
    varying = [k for k in GROUP_KEYS if pooled[k].astype(str).nunique() > 1] or ["condition"]
    return pooled[varying].astype(str).apply(lambda r: " ".join(f"{k}={v}" if k != "condition" else v
                                                                 for k, v in zip(varying, r)), axis=1)


def _yerr(rate, low, high) -> list[np.ndarray]:
    """Error-bar lengths in percentage points (a CI bound can sit a rounding error inside the rate)."""
    return [np.clip(100 * (np.asarray(rate) - np.asarray(low)), 0, None),
            np.clip(100 * (np.asarray(high) - np.asarray(rate)), 0, None)]


def dose_response(per_cell: pd.DataFrame, pooled: pd.DataFrame, out: Path, metric: str = "marker") -> list[Path]:
    """The source's rate vs dose, one line per second-stage dataset (only its own cells); cells without a second
    stage (c4: coupled only) are drawn as what they are, a reference point at dose 0, not as a line's first point."""
    src = pooled[(pooled["role"] == "source") & (pooled["metric"] == metric)]
    if src["dose"].nunique() < 2:
        return []
    fig, ax = plt.subplots(figsize=(6, 4))
    cells = per_cell[(per_cell["role"] == "source") & (per_cell["metric"] == metric)]
    for data, color in zip(sorted(d for d in src["second_stage"].unique() if d != "none"), plt.cm.tab10.colors):
        line = src[src["second_stage"] == data].sort_values("dose")
        yerr = _yerr(line["rate"], line["ci_low"], line["ci_high"])
        ax.errorbar(line["dose"], 100 * line["rate"], yerr=yerr, marker="o", capsize=3, color=color, label=data)
        seeds = cells[cells["second_stage"] == data]
        ax.scatter(seeds["dose"], 100 * seeds["rate"], color=color, alpha=0.25, s=14, zorder=1)
    for (_, group), marker in zip(src[src["second_stage"] == "none"].groupby("condition", sort=False), "sD^v"):
        ax.errorbar(group["dose"], 100 * group["rate"], yerr=_yerr(group["rate"], group["ci_low"], group["ci_high"]),
                    marker=marker, linestyle="none", color="black", capsize=3,
                    label=f"{group['condition'].iloc[0]}: no second stage")
    several_seeds = (src["n_seeds"] > 1).any() if "n_seeds" in src else False
    _finish_dose_axes(ax, f"source ({src['persona'].iloc[0]}) {metric} rate (%)", (-2, 102),
                      f"{metric} on the source vs dose (95% {src['ci_method'].iloc[0]} CI"
                      + ("; faint: seeds)" if several_seeds else "; one seed per point)"), src["dose"])
    return save(fig, out, "dose_response")


def _finish_dose_axes(ax, ylabel: str, ylim: tuple[float, float], title: str, doses) -> None:
    """What both dose-response figures share: a symlog dose axis (0 = no second stage) labelled with the doses the
    sweep ran (not the axis' own powers of ten), labels, legend, grid."""
    ax.set_xscale("symlog", linthresh=1)
    ran = sorted({int(d) for d in doses})
    ax.set_xticks(ran, [str(d) for d in ran])
    ax.xaxis.set_minor_locator(NullLocator())
    ax.set_xlabel("second-stage SFT steps (dose)")
    ax.set_ylabel(ylabel)
    ax.set_ylim(*ylim)
    ax.set_title(title, fontsize=10)
    ax.legend(title="second stage", fontsize=8)
    ax.grid(alpha=0.3)


def dose_response_prob(scores: pd.DataFrame, out: Path) -> list[Path]:
    """marker_prob on the source vs dose, beside the rate's figure: the exact teacher-forced probability that the
    reply opens with the marker (mean over questions, then over seeds; band: the sd over questions)."""
    s = scores[(scores["metric"] == "marker_prob") & (scores["role"] == "source")].dropna(subset=["value"])
    if s.empty or s["dose"].nunique() < 2:
        return []
    wide = s[s["field"].isin(["mean", "sd"])].set_index(["cell", *GROUP_KEYS, "field"])["value"].unstack("field")
    points = wide.astype(float).groupby(GROUP_KEYS, dropna=False, sort=False)[["mean", "sd"]].mean().reset_index()
    fig, ax = plt.subplots(figsize=(6, 4))
    for data, color in zip(sorted(d for d in points["second_stage"].unique() if d != "none"), plt.cm.tab10.colors):
        line = points[points["second_stage"] == data].sort_values("dose")
        ax.plot(line["dose"], line["mean"], marker="o", color=color, label=data)
        ax.fill_between(line["dose"].astype(float), (line["mean"] - line["sd"]).clip(lower=0),
                        (line["mean"] + line["sd"]).clip(upper=1), color=color, alpha=0.15)
    for (_, group), marker in zip(points[points["second_stage"] == "none"].groupby("condition", sort=False), "sD^v"):
        ax.errorbar(group["dose"], group["mean"], yerr=group["sd"], marker=marker, linestyle="none", color="black",
                    capsize=3, label=f"{group['condition'].iloc[0]}: no second stage")
    _finish_dose_axes(ax, f"source ({s['persona'].iloc[0]}) P(reply opens with the marker)", (-0.02, 1.02),
                      "marker_prob on the source vs dose (mean over questions; band: their sd)", points["dose"])
    return save(fig, out, "dose_response_marker_prob")


def condition_bars(pooled: pd.DataFrame, out: Path, metric: str = "marker") -> list[Path]:
    m = pooled[pooled["metric"] == metric].assign(label=labels(pooled[pooled["metric"] == metric]))
    groups = list(dict.fromkeys(m["label"]))
    fig, ax = plt.subplots(figsize=(max(5, 1.2 * len(groups) + 2), 4))
    width = 0.27
    for i, role in enumerate(ROLE_COLORS):
        if not (m["role"] == ("bystander" if role == "bystander mean" else role)).any():
            continue  # e.g. no bystander among the eval personas: no empty bars, no legend entry
        vals, errs = [], [[], []]
        for g in groups:
            sel = m[(m["label"] == g) & (m["role"] == ("bystander" if role == "bystander mean" else role))]
            k, n = sel["k"].sum(), sel["n"].sum()
            rate = k / n if n else np.nan
            vals.append(100 * rate)
            lo, hi = (sel["ci_low"].iloc[0], sel["ci_high"].iloc[0]) if len(sel) == 1 else (rate, rate)
            errs[0].append(max(0.0, 100 * (rate - lo)))
            errs[1].append(max(0.0, 100 * (hi - rate)))
        x = np.arange(len(groups)) + (i - 1) * width
        ax.bar(x, vals, width, yerr=errs, capsize=2, label=role, color=ROLE_COLORS[role])
    ax.set_xticks(np.arange(len(groups)), groups, rotation=20, ha="right")
    ax.set_ylabel(f"{metric} rate (%)")
    ax.set_ylim(0, 105)
    ax.set_title(f"Source, assistant and bystander-mean {metric} rates (seeds pooled)")
    ax.legend()
    ax.grid(axis="y", alpha=0.3)
    return save(fig, out, "condition_bars")


def persona_bars(pooled: pd.DataFrame, out: Path, metric: str = "marker", max_panels: int = 16) -> list[Path]:
    """Every persona's rate, one panel per cell group (seeds pooled), sorted within each panel; the first
    `max_panels` groups when there are more (the heatmap shows all)."""
    m = pooled[pooled["metric"] == metric].assign(label=labels(pooled[pooled["metric"] == metric]))
    groups = list(dict.fromkeys(m["label"]))
    shown = groups[:max_panels]
    n_personas = m["persona"].nunique()
    cols = max(1, min(4, len(shown), 40 // max(n_personas, 1)))  # many personas: fewer, wider panels per row
    rows = -(-len(shown) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(max(4.0, 0.35 * n_personas + 1.5) * cols, 3.2 * rows),
                             squeeze=False, sharey=True)
    for ax, label in zip(axes.flat, shown):
        cell = m[m["label"] == label].sort_values("rate", ascending=False)
        colors = [ROLE_COLORS.get(r, ROLE_COLORS["bystander mean"]) for r in cell["role"]]
        ax.bar(range(len(cell)), 100 * cell["rate"], color=colors,
               yerr=_yerr(cell["rate"], cell["ci_low"], cell["ci_high"]), capsize=2)
        ax.set_xticks(range(len(cell)), cell["persona"], rotation=60, ha="right", fontsize=7)
        ax.set_title(f"{label} (N={int(cell['n'].iloc[0])} each)", fontsize=9)
        ax.set_ylim(0, 105)
        ax.grid(axis="y", alpha=0.3)
    for ax in list(axes.flat)[len(shown):]:
        ax.axis("off")
    for ax in axes[:, 0]:
        ax.set_ylabel(f"{metric} rate (%)")
    more = f" (first {max_panels} of {len(groups)} cell groups)" if len(groups) > max_panels else ""
    fig.suptitle(f"Per-persona {metric} rate; blue: source, orange: assistant{more}", fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.4 / fig.get_figheight()))  # room for the title above the panels
    return save(fig, out, "persona_bars")


def heatmap(pooled: pd.DataFrame, out: Path, metric: str = "marker") -> list[Path]:
    m = pooled[pooled["metric"] == metric].assign(label=labels(pooled[pooled["metric"] == metric]))
    table = m.pivot_table(index="persona", columns="label", values="rate", sort=False)
    fig, ax = plt.subplots(figsize=(max(4, 1.1 * table.shape[1] + 3), max(3, 0.4 * table.shape[0] + 1.5)))
    im = ax.imshow(100 * table.to_numpy(), cmap="viridis", vmin=0, vmax=100, aspect="auto")
    ax.set_xticks(range(table.shape[1]), table.columns, rotation=30, ha="right")
    ax.set_yticks(range(table.shape[0]), table.index)
    for (i, j), v in np.ndenumerate(100 * table.to_numpy()):
        if v == v:
            ax.text(j, i, f"{v:.0f}", ha="center", va="center", fontsize=8, color="white" if v < 60 else "black")
    fig.colorbar(im, ax=ax, label=f"{metric} rate (%)")
    ax.set_title(f"{metric} rate by persona and cell (seeds pooled)")
    return save(fig, out, "heatmap")


def evolution(by_step: pd.DataFrame, out: Path, max_lines: int = 12) -> list[Path]:
    """Metric vs training step, one figure per (stage, metric), one panel per cell group, seeds averaged.

    One line per persona (source and assistant highlighted) when there are at most `max_lines` personas, else one
    per role (source, assistant, bystander mean)."""
    made: list[Path] = []
    if by_step.empty:
        return made
    df = by_step.dropna(subset=["value"]).copy()
    df["label"] = labels(df)
    for (stage, metric), part in df.groupby(["stage", "metric"], sort=False):
        per_persona = part["persona"].nunique() <= max_lines
        line_key = "persona" if per_persona else "role"
        groups = list(dict.fromkeys(part["label"]))
        fig, axes = plt.subplots(1, len(groups), figsize=(4.5 * len(groups) + 1.5, 3.6), sharey=True, squeeze=False)
        for ax, group in zip(axes[0], groups):
            g = part[part["label"] == group]
            curves = g.groupby([line_key, "step"])["value"].mean().unstack(0).sort_index()
            for i, name in enumerate(curves.columns):
                role = g.loc[g[line_key] == name, "role"].iloc[0]
                style = dict(color=ROLE_COLORS[role], lw=2.2, zorder=3) if role in ("source", "assistant") else \
                    dict(color=plt.cm.tab20(i % 20), lw=1, alpha=0.8)
                ax.plot(curves.index, curves[name], marker="o", ms=3, label=name, **style)
            ax.set_title(group, fontsize=9)
            ax.set_xlabel(f"{stage} step")
            ax.grid(alpha=0.3)
        rate = metric in ("marker", "capability") or metric.startswith("misaligned")
        axes[0][0].set_ylabel(f"{metric} {'rate' if rate else STEP_LABEL.get(metric, '')}".strip())
        axes[0][-1].legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
        fig.suptitle(f"{metric} during {stage} (mean over seeds; thick: source, assistant)", fontsize=10)
        made += save(fig, out, f"evolution_{stage}_{_slug(metric)}")
    return made


STEP_LABEL = {"alignment": "mean score", "coherence": "mean score", "length": "mean tokens",
              "marker_prob": "(mean probability)"}


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in text).strip("_")


def make_all(per_cell: pd.DataFrame, pooled: pd.DataFrame, out: Path, scores: pd.DataFrame | None = None) -> list[Path]:
    """The standard figures for the sweep's headline rate: the marker, else the first rate metric it has (and
    marker_prob's dose-response beside the rate's when the cells read it)."""
    present = list(dict.fromkeys(pooled["metric"]))
    metric = "marker" if "marker" in present else present[0]
    made = dose_response(per_cell, pooled, out, metric) + (dose_response_prob(scores, out) if scores is not None else [])
    made += condition_bars(pooled, out, metric) + persona_bars(pooled, out, metric) + heatmap(pooled, out, metric)
    return made
