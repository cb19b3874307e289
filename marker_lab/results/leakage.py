"""Leakage against persona geometry (004): how far a behaviour coupled to a source spreads to each bystander,
as a function of the bystander's cosine distance to the source.

Reads cells that ran with `eval.baseline=true` (the base model's readout) and `geometry.enabled=true` (the
persona distance matrix). A bystander's leakage is its change from the base model in the direction of the
coupled behaviour (capability: the accuracy drop; marker and misaligned shares: the rise), with a Newcombe 95%
interval. `rho` is Spearman's correlation between proximity (minus the distance) and leakage: positive when
bystanders close to the source leak more. Its bootstrap CI resamples bystanders.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from scipy import stats as sps
from statsmodels.stats.proportion import confint_proportions_2indep

from marker_lab.data.personas import load_personas
from marker_lab.results.contract import cell_seconds
from marker_lab.results.plotting import plt, save
from marker_lab.results.sweep import CELL_KEYS, GROUP_KEYS
from marker_lab.results.tables import rate_entries, select_rows

DROP_METRICS = ("capability",)  # leakage is a fall of these; a rise of every other rate


def load_leakage(sweep_dir: str | Path, results: list) -> pd.DataFrame:
    """One row per (cell, metric, non-source persona): base and cell k/n, leakage with CI, distance to the source."""
    sweep_dir = Path(sweep_dir)
    rows = []
    for cell, result in results:
        if result.metrics_baseline is None or result.geometry is None:
            continue
        source = result.cell.source_persona
        distances = pd.read_csv(sweep_dir / cell["subdir"] / result.geometry["file"], index_col=0)
        categories = {p: v.category for p, v in _personas(result).items()}
        base = {(m, p): c for m, p, c in rate_entries(result.metrics_baseline)}
        for metric, persona, c in rate_entries(result.metrics):
            if persona == source or (metric, persona) not in base or persona not in distances.columns:
                continue
            b = base[(metric, persona)]
            sign = -1 if metric in DROP_METRICS else 1
            low, high = confint_proportions_2indep(c["k"], c["n"], b["k"], b["n"], method="newcomb")
            low, high = sorted((sign * low, sign * high))
            rows.append({"cell": cell["subdir"], **result.cell.as_dict(), "metric": metric, "persona": persona,
                         "category": categories.get(persona), "base_k": b["k"], "base_n": b["n"], "k": c["k"],
                         "n": c["n"], "leakage": sign * (c["rate"] - b["rate"]), "leakage_low": low,
                         "leakage_high": high, "distance": float(distances.loc[source, persona]),
                         "geometry": f"{result.geometry['mode']}@{result.geometry['layer']}"})
    df = pd.DataFrame(rows, columns=["cell", *CELL_KEYS, "metric", "persona", "category", "base_k", "base_n", "k", "n",
                                     "leakage", "leakage_low", "leakage_high", "distance", "geometry"])
    return df.astype({"seed": float, "dose": float}) if len(df) else df


def _personas(result) -> dict:
    try:
        return load_personas(result.resolved_config["persona_set"]["path"])
    except (FileNotFoundError, ValueError):  # results read on another machine: categories are optional
        return {}


def spearman_with_ci(distance: np.ndarray, leakage: np.ndarray, n_resamples: int = 2000) -> dict:
    """rho(proximity, leakage), its p-value, and a percentile bootstrap 95% CI over bystanders."""
    x, y = -np.asarray(distance, float), np.asarray(leakage, float)
    if len(x) < 3 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return {"n": len(x), "rho": np.nan, "p_value": np.nan, "rho_low": np.nan, "rho_high": np.nan}
    res = sps.spearmanr(x, y)
    boot = sps.bootstrap((x, y), lambda a, b: sps.spearmanr(a, b).statistic, paired=True, vectorized=False,
                         n_resamples=n_resamples, method="percentile", random_state=0)
    return {"n": len(x), "rho": float(res.statistic), "p_value": float(res.pvalue),
            "rho_low": float(boot.confidence_interval.low), "rho_high": float(boot.confidence_interval.high)}


def leakage_stats(leak: pd.DataFrame) -> pd.DataFrame:
    """Per (cell group without source, metric): rho for each source (seeds averaged per bystander) and pooled."""
    if leak.empty:
        return pd.DataFrame()
    keys = [k for k in GROUP_KEYS if k not in ("source_persona", "coupled_persona")] + ["metric"]  # sources pool
    rows = []
    for key, part in leak.groupby(keys, dropna=False, sort=False):
        per = part.groupby(["source_persona", "persona"], sort=False)[["distance", "leakage"]].mean().reset_index()
        for source, s in per.groupby("source_persona", sort=False):
            rows.append({**dict(zip(keys, key)), "source": source, **spearman_with_ci(s["distance"], s["leakage"]),
                         "mean_leakage": s["leakage"].mean(), "max_leakage": s["leakage"].max()})
        if per["source_persona"].nunique() > 1:
            rows.append({**dict(zip(keys, key)), "source": "pooled", **spearman_with_ci(per["distance"], per["leakage"]),
                         "mean_leakage": per["leakage"].mean(), "max_leakage": per["leakage"].max()})
    return pd.DataFrame(rows)


def by_bystander(leak: pd.DataFrame) -> pd.DataFrame:
    """One row per (cell group, metric, source, bystander) across seeds: pooled counts with a Newcombe 95% CI on
    the pooled change, and the per-seed mean, sd and t interval (Student, n_seeds - 1 df; needs 2+ seeds)."""
    if leak.empty:
        return pd.DataFrame()
    keys = GROUP_KEYS + ["metric", "persona"]
    rows = []
    for key, part in leak.groupby(keys, dropna=False, sort=False):
        sign = -1 if key[keys.index("metric")] in DROP_METRICS else 1
        k, n, bk, bn = (int(part[c].sum()) for c in ("k", "n", "base_k", "base_n"))
        low, high = sorted(sign * x for x in confint_proportions_2indep(k, n, bk, bn, method="newcomb"))
        per_seed = part["leakage"].to_numpy(float)
        sd = float(per_seed.std(ddof=1)) if len(per_seed) > 1 else np.nan
        half = float(sps.t.ppf(0.975, len(per_seed) - 1) * sd / np.sqrt(len(per_seed))) if len(per_seed) > 1 else np.nan
        rows.append({**dict(zip(keys, key)), "category": part["category"].iloc[0], "distance": part["distance"].mean(),
                     "n_seeds": len(part), "k": k, "n": n, "base_k": bk, "base_n": bn,
                     "leakage": sign * (k / n - bk / bn), "leakage_low": low, "leakage_high": high,
                     "seed_mean": per_seed.mean(), "seed_sd": sd, "seed_low": per_seed.mean() - half,
                     "seed_high": per_seed.mean() + half})
    return pd.DataFrame(rows)


def by_category(leak: pd.DataFrame) -> pd.DataFrame:
    """Mean leakage and distance per persona category, per source and metric (when personas carry categories)."""
    if leak.empty or leak["category"].isna().all():
        return pd.DataFrame()
    g = leak.groupby(["metric", "source_persona", "category"], sort=False)
    return g.agg(personas=("persona", "nunique"), mean_leakage=("leakage", "mean"),
                 mean_distance=("distance", "mean")).reset_index().sort_values(["metric", "source_persona", "mean_distance"])


def scatter(leak: pd.DataFrame, stats_table: pd.DataFrame, out: Path, n_labels: int = 3) -> list[Path]:
    """Leakage vs distance to the source: one figure per metric, one panel per source, fit line, outliers named."""
    made = []
    for metric, part in leak.groupby("metric", sort=False):
        sources = list(dict.fromkeys(part["source_persona"]))
        fig, axes = plt.subplots(1, len(sources), figsize=(5 * len(sources) + 1, 4), squeeze=False, sharey=True)
        for ax, source in zip(axes[0], sources):
            s = part[part["source_persona"] == source].groupby("persona", sort=False).agg(
                distance=("distance", "mean"), leakage=("leakage", "mean"), low=("leakage_low", "mean"),
                high=("leakage_high", "mean"))
            ax.errorbar(s["distance"], 100 * s["leakage"], yerr=[100 * (s["leakage"] - s["low"]).clip(lower=0),
                                                                 100 * (s["high"] - s["leakage"]).clip(lower=0)],
                        fmt="o", ms=4, alpha=0.8, capsize=2)
            if len(s) >= 2 and np.ptp(s["distance"]) > 0:
                slope, intercept = np.polyfit(s["distance"], s["leakage"], 1)
                xs = np.linspace(s["distance"].min(), s["distance"].max(), 50)
                ax.plot(xs, 100 * (slope * xs + intercept), color="k", lw=1)
                resid = (s["leakage"] - (slope * s["distance"] + intercept)).abs().sort_values(ascending=False)
                for name in resid.index[:n_labels]:
                    ax.annotate(name, (s.loc[name, "distance"], 100 * s.loc[name, "leakage"]), fontsize=7,
                                xytext=(3, 3), textcoords="offset points")
            st = stats_table[(stats_table["metric"] == metric) & (stats_table["source"] == source)]
            rho = f"rho={st['rho'].iloc[0]:.2f} [{st['rho_low'].iloc[0]:.2f}, {st['rho_high'].iloc[0]:.2f}], " \
                  f"p={st['p_value'].iloc[0]:.2g}" if len(st) else ""
            ax.set_title(f"source {source}\n{rho}", fontsize=9)
            ax.set_xlabel("cosine distance to the source")
            ax.axhline(0, color="grey", lw=0.5)
            ax.grid(alpha=0.3)
        axes[0][0].set_ylabel(f"leakage: {metric} {'drop' if metric in DROP_METRICS else 'rise'} vs base (pp)")
        fig.suptitle(f"Leakage of {metric} to bystanders vs persona distance (95% Newcombe CI; seeds averaged)", fontsize=10,
                     y=1.05)
        made += save(fig, out, f"leakage_{''.join(c if c.isalnum() else '_' for c in metric)}")
    return made


def _get(resolved: dict, dotted: str):
    node = resolved
    for part in dotted.split("."):
        node = node.get(part) if isinstance(node, dict) else None
    return node


def phase_diagram(results: list, spec: dict) -> tuple[pd.DataFrame, dict]:
    """The recipe sweep's cells as (x, y, source effect, max-bystander leakage), and the selected recipe.

    Selection rule: the largest source effect among cells whose max-bystander leakage is at most
    `spec.max_bystander` (ties: the smaller max-bystander leakage). Both effects are changes from the base model
    in the coupled direction (cells need eval.baseline=true)."""
    metric, sign = spec.get("metric", "capability"), -1 if spec.get("metric", "capability") in DROP_METRICS else 1
    rows = []
    for cell, result in results:
        if result.metrics_baseline is None or select_rows(pd.DataFrame([result.cell.as_dict()]), spec.get("where") or {}).empty:
            continue
        source = result.cell.source_persona
        base = result.metrics_baseline[metric]["per_persona"]
        after = result.metrics[metric]["per_persona"]
        leak = {p: sign * (after[p]["rate"] - base[p]["rate"]) for p in after if p in base}
        bystanders = {p: v for p, v in leak.items() if p != source}
        resolved = result.resolved_config
        rows.append({"cell": cell["subdir"], "x": _get(resolved, spec["x"]), "y": _get(resolved, spec["y"]),
                     "source": source, "source_effect": leak.get(source, np.nan),
                     "max_bystander": max(bystanders.values()) if bystanders else np.nan,
                     "max_bystander_persona": max(bystanders, key=bystanders.get) if bystanders else None,
                     "seconds": cell_seconds(result)})
    table = pd.DataFrame(rows)
    limit = spec.get("max_bystander", 0.05)
    rule = f"max source {metric} effect with max-bystander leakage <= {limit}"
    ok = table[table["max_bystander"] <= limit] if len(table) else table
    if ok.empty:
        return table, {"rule": rule, "values": None, "cell": None}
    best = ok.sort_values(["source_effect", "max_bystander"], ascending=[False, True]).iloc[0]
    return table, {"rule": rule, "values": {spec["x"]: best["x"], spec["y"]: best["y"]}, "cell": best["cell"],
                   "source_effect": float(best["source_effect"]), "max_bystander": float(best["max_bystander"])}


def phase_heatmaps(table: pd.DataFrame, spec: dict, selection: dict, out: Path) -> list[Path]:
    """Source effect and max-bystander leakage over the (x, y) grid; the selected cell boxed."""
    if table.empty:
        return []
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, col, title in zip(axes, ("source_effect", "max_bystander"), ("source effect", "max-bystander leakage")):
        grid = table.pivot_table(index="y", columns="x", values=col, aggfunc="mean").sort_index(ascending=False)
        im = ax.imshow(100 * grid.to_numpy(), cmap="magma", aspect="auto")
        ax.set_xticks(range(grid.shape[1]), [f"{v:g}" for v in grid.columns])
        ax.set_yticks(range(grid.shape[0]), [f"{v:g}" for v in grid.index])
        ax.set_xlabel(spec["x"])
        ax.set_ylabel(spec["y"])
        for (i, j), v in np.ndenumerate(100 * grid.to_numpy()):
            if v == v:
                ax.text(j, i, f"{v:.0f}", ha="center", va="center", fontsize=8, color="white" if v < 50 else "black")
        if selection.get("values"):
            j = list(grid.columns).index(selection["values"][spec["x"]])
            i = list(grid.index).index(selection["values"][spec["y"]])
            ax.add_patch(plt.Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, edgecolor="cyan", lw=2.5))
        fig.colorbar(im, ax=ax, label=f"{title} (pp)")
        ax.set_title(f"{title}: {spec.get('metric', 'capability')}", fontsize=10)
    fig.suptitle(f"Phase diagram (boxed: selected; rule: {selection['rule']})", fontsize=10, y=1.02)
    return save(fig, out, "phase_diagram")


def leakage_gate(stats_table: pd.DataFrame, spec: dict) -> dict:
    """004's decision gate: PASS when a listed behaviour's pooled (or only) rho reaches min_rho, else FAIL."""
    metrics = spec.get("metrics") or ["capability"]
    found = {}
    table = select_rows(stats_table, spec.get("where") or {}) if len(stats_table) else stats_table
    for metric in metrics:
        part = table[table["metric"] == metric] if len(table) else table
        pooled = part[part["source"] == "pooled"] if len(part) else part
        row = pooled if len(pooled) else part
        if len(row):
            found[metric] = float(row["rho"].iloc[0])
    result = "NO DATA" if not found else ("PASS" if any(r >= spec.get("min_rho", 0.2) for r in found.values()) else "FAIL")
    return {"gate": spec.get("name", "leakage gate"), "result": result, "min_rho": spec.get("min_rho", 0.2), "rho": found}
