"""The latent probe across a sweep: surface (the source's marker rate) beside latent (the frozen probe on the
same cell's models), so "destroyed on the surface, alive underneath" is one figure.

A cell's `metrics.probe` (eval/probe.py) holds the probe's readout on every model of the cell; `load_probe`
flattens it to one row per (cell, model, persona), `latent_summary` to one row per (cell, model) for the source.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from marker_lab.results.sweep import CELL_KEYS, GROUP_KEYS, role_of
from marker_lab.results.plotting import plt, save

# the probe's settings: cells that differ only in these are different probes of the same cells
PROBE_KEYS = ["target", "position", "fit_on", "layer", "probe_C", "probe_seed"]
COLUMNS = ["cell", *CELL_KEYS, *PROBE_KEYS, "model", "step", "before_second_stage", "persona", "role",
           "mean_score", "mean_score_change", "auc_vs_source", "auc_vs_source_change", "auc", "auc_low", "auc_high",
           "auc_change", "source_margin", "source_margin_change", "surface_rate"]


def load_probe(results: list) -> pd.DataFrame:
    """One row per (cell, model, persona): the probe's mean score, the AUC of source vs that persona, the model's
    AUC of source vs rest with its CI, and (final model only) the persona's marker rate, the surface readout."""
    rows = []
    for cell, result in results:
        probe = result.metrics.get("probe")
        if not probe:
            continue
        surface = result.metrics.get("marker", {}).get("per_persona", {})
        settings = result.resolved_config["eval"]["probe"]
        how = {"target": probe["target"], "position": probe["position"], "fit_on": probe["fit_on"],
               "layer": probe["layer"], "probe_C": settings["C"], "probe_seed": settings["seed"]}
        for step, (model, m) in enumerate(probe["models"].items()):
            final = model == probe["final_model"]
            for persona, c in m["per_persona"].items():
                rows.append({"cell": cell["subdir"], **result.cell.as_dict(), **how, "model": model, "step": step,
                             "before_second_stage": model == probe["before_second_stage"], "persona": persona,
                             "role": role_of(result, persona), **{k: c.get(k) for k in COLUMNS if k in c},
                             "auc": m["auc"], "auc_low": m["auc_ci"][0], "auc_high": m["auc_ci"][1],
                             "auc_change": m.get("auc_change"), "source_margin": m["source_margin"],
                             "source_margin_change": m.get("source_margin_change"),
                             "surface_rate": surface[persona]["rate"] if final and persona in surface else np.nan})
    return pd.DataFrame(rows, columns=COLUMNS)


def latent_summary(probe: pd.DataFrame) -> pd.DataFrame:
    """The source persona per (cell group, model position), seeds averaged (min and max kept): surface rate,
    probe score and AUC."""
    src = probe[probe["role"] == "source"]
    keys = [k for k in GROUP_KEYS if k in src] + PROBE_KEYS + ["step", "model", "before_second_stage"]
    return (src.groupby(keys, dropna=False, sort=True)
            .agg(seeds=("seed", "nunique"), surface_rate=("surface_rate", "mean"),
                 probe_score=("mean_score", "mean"), probe_score_min=("mean_score", "min"),
                 probe_score_max=("mean_score", "max"), source_margin=("source_margin", "mean"),
                 auc=("auc", "mean"), auc_min=("auc", "min"), auc_max=("auc", "max"))
            .reset_index())


def surface_vs_latent(probe: pd.DataFrame, out: Path) -> list[Path]:
    """Per cell group, on the final model. Left: the source's marker rate (surface) beside its probe score and the
    probe's AUC source vs rest (latent, 0-1). Right: the source margin (log-odds above the other personas), which a
    shift of every persona does not move. Hollow diamonds: the latent values on the model before the second stage."""
    if probe.empty:
        return []
    src = probe[probe["role"] == "source"]
    keys = [k for k in GROUP_KEYS + PROBE_KEYS if src[k].nunique(dropna=False) > 1] or ["condition"]
    final = src[src["step"] == src.groupby("cell")["step"].transform("max")]
    before = src[src["before_second_stage"]]
    groups = list(final.groupby(keys, dropna=False, sort=True).groups)  # sorted per column: dose 5 before 10
    panels = [[("surface_rate", "surface: marker rate"), ("mean_score", "latent: probe score"),
               ("auc", "latent: AUC source vs rest")], [("source_margin", "latent: source margin")]]
    colors = {"surface_rate": "#4c72b0", "mean_score": "#dd8452", "auc": "#c44e52", "source_margin": "#8172b3"}
    fig, axes = plt.subplots(1, 2, figsize=(max(7.0, 1.9 * len(groups) + 3), 3.8), width_ratios=[3, 1.4])
    x = np.arange(len(groups))
    for ax, bars in zip(axes, panels):
        width = 0.8 / len(bars)
        for i, (column, label) in enumerate(bars):
            offset = (i - (len(bars) - 1) / 2) * width
            values = final.groupby(keys, dropna=False)[column].agg(["mean", "min", "max"]).reindex(groups)
            err = np.vstack([values["mean"] - values["min"], values["max"] - values["mean"]])
            ax.bar(x + offset, values["mean"], width, label=label, yerr=err, capsize=2, color=colors[column])
            if column != "surface_rate" and len(before):
                pre = before.groupby(keys, dropna=False)[column].mean().reindex(groups)
                ax.scatter(x + offset, pre, marker="D", facecolors="none", edgecolors="black", zorder=3,
                           label="before the second stage" if column in ("mean_score", "source_margin") else None)
        ax.set_xticks(x, ["\n".join(str(v) for v in (g if isinstance(g, tuple) else (g,))) for g in groups], fontsize=7)
        ax.set_xlabel(" / ".join(keys), fontsize=8)
        ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.28), ncol=4, frameon=False)
    axes[0].set_ylim(0, 1.05)
    axes[1].set_ylabel("log-odds", fontsize=8)
    axes[1].axhline(0, color="grey", lw=0.5)
    fixed = ", ".join(f"{k} {src[k].iloc[0]}" for k in PROBE_KEYS if k not in keys)
    fig.suptitle(f"The source persona on the final model: surface vs latent (probe {fixed}; seeds averaged, bars "
                 "min-max)", fontsize=9)
    fig.tight_layout()
    return save(fig, out, "surface_vs_latent")
