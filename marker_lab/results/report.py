"""report.md: the headline table in the write-ups' form, comparisons, gates, figures, missing cells."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from marker_lab.results.figures import labels
from marker_lab.results.sweep import GROUP_KEYS


def _pct(k: int, n: int) -> str:
    return f"{100 * k / n:.2f}% ({k}/{n})" if n else "n/a"


def _marker_probs(scores: pd.DataFrame | None) -> dict[tuple, dict[str, float]]:
    """Cell group (its GROUP_KEYS values, as text) -> role -> marker_prob mean (over questions, then seeds)."""
    if scores is None or scores.empty:
        return {}
    s = scores[(scores["metric"] == "marker_prob") & (scores["field"] == "mean") & scores["role"].isin(["source", "assistant"])]
    means = s.groupby([*GROUP_KEYS, "role"], dropna=False, sort=False)["value"].mean()
    out: dict[tuple, dict[str, float]] = {}
    for key, value in means.items():
        out.setdefault(tuple(str(k) for k in key[:-1]), {})[key[-1]] = value
    return out


def headline(pooled: pd.DataFrame, gate_table: pd.DataFrame, scores: pd.DataFrame | None = None) -> str:
    present = list(dict.fromkeys(pooled["metric"]))
    metric = "marker" if "marker" in present else present[0]
    m = pooled[pooled["metric"] == metric].assign(label=labels(pooled[pooled["metric"] == metric]))
    probs = _marker_probs(scores) if metric == "marker" else {}
    extra = " assistant marker_prob | source marker_prob |" if probs else ""
    lines = [f"{metric} rate per cell" + (" (marker_prob: the exact probability that the reply opens with the "
                                          "marker, mean over questions and seeds)." if probs else "."), "",
             "| cell | seeds | N (per persona) | assistant | source | max bystander | gates |" + extra,
             "| --- | --- | --- | --- | --- | --- | --- |" + (" --- | --- |" if probs else "")]
    for label, cell in m.groupby("label", sort=False):
        src, asst = cell[cell["role"] == "source"], cell[cell["role"] == "assistant"]
        by = cell[cell["role"] == "bystander"].sort_values("rate", ascending=False)
        top = f"{100 * by['rate'].iloc[0]:.2f}% ({by['persona'].iloc[0]})" if len(by) else "n/a"
        gate_txt = ""
        if len(gate_table):  # the gate rows of this cell group: every group key the gate table has must agree
            g = gate_table
            for key in [k for k in GROUP_KEYS if k in gate_table.columns]:
                g = g[g[key].astype(str) == str(cell[key].iloc[0])]
            gate_txt = ", ".join(f"{r.gate} {r.result}" for r in g.itertuples())
        lines.append(f"| {label} | {cell['seeds'].iloc[0]} | {int(cell['n'].iloc[0])} | "
                     f"{_pct(int(asst['k'].sum()), int(asst['n'].sum())) if len(asst) else 'n/a'} | "
                     f"{_pct(int(src['k'].sum()), int(src['n'].sum())) if len(src) else 'n/a'} | {top} | {gate_txt} |"
                     + (_prob_cells(probs, cell) if probs else ""))
    return "\n".join(lines)


def _prob_cells(probs: dict, cell: pd.DataFrame) -> str:
    got = probs.get(tuple(str(cell[k].iloc[0]) for k in GROUP_KEYS), {})
    return "".join(f" {got[r]:.4f} |" if r in got else " n/a |" for r in ("assistant", "source"))


def render(sweep_dir: Path, pooled: pd.DataFrame, comps: pd.DataFrame, gate_table: pd.DataFrame, missing,
           figures: list[Path], leak_stats: pd.DataFrame | None = None, selection: dict | None = None,
           leak_gate: dict | None = None, seconds: dict | None = None, scores: pd.DataFrame | None = None) -> str:
    parts = [f"# Sweep report: {sweep_dir}", ""]
    if len(pooled):
        ci = pooled["ci_method"].iloc[0]
        parts += ["## Headline", "", f"Rates pooled over seeds (sum of k over sum of n); CIs: 95% {ci}.", "",
                  headline(pooled, gate_table, scores), ""]
    else:
        parts += ["No complete cells yet.", ""]
    if len(comps):
        parts += ["## Comparisons", "", "| comparison | where | persona | arm 1 | arm 2 | diff | test | p | seeds p |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
        extra = [c for c in comps.columns if c not in {"comparison", "persona", "arm_1", "k_1", "n_1", "rate_1", "arm_2",
                                                        "k_2", "n_2", "rate_2", "diff", "test", "alternative", "p_value",
                                                        "seeds_1", "seeds_2", "seed_diff", "seed_test", "seed_p_value"}]
        for r in comps.to_dict("records"):
            where = " ".join(f"{k}={r[k]}" for k in extra if pd.notna(r.get(k)))
            parts.append(f"| {r['comparison']} | {where} | {r['persona']} | {r['arm_1']}: {_pct(r['k_1'], r['n_1'])} | "
                         f"{r['arm_2']}: {_pct(r['k_2'], r['n_2'])} | {100 * r['diff']:+.2f} pp | {r['test']} "
                         f"({r['alternative']}) | {r['p_value']:.3g} | {_seed_p(r['seed_p_value'])} "
                         f"(N={r['seeds_1']} vs {r['seeds_2']} seeds) |")
        parts.append("")
    if len(gate_table):
        parts += ["## Gates", "", "| gate | cell | result | values |", "| --- | --- | --- | --- |"]
        several = "experiment" in gate_table and gate_table["experiment"].nunique() > 1  # loose runs of several
        for r in gate_table.to_dict("records"):
            seed = f" seed={int(r['seed'])}" if pd.notna(r.get("seed")) else ""
            where = f"{r.get('condition', '')} dose={r.get('dose', '')}{seed}" if pd.notna(r.get("condition")) else "-"
            where = f"{r['experiment']}: {where}" if several and pd.notna(r.get("experiment")) else where
            parts.append(f"| {r['gate']} | {where} | {r['result']} | {r['detail']} |")
        parts.append("")
    if leak_stats is not None and len(leak_stats):
        parts += ["## Leakage vs persona distance", "",
                  "rho: Spearman correlation of proximity to the source (minus cosine distance) with leakage (the "
                  "bystander's change from the base model toward the coupled behaviour); 95% bootstrap CI over bystanders.",
                  "", "| metric | condition | dose | source | bystanders | rho | 95% CI | p | mean leakage | max leakage |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
        for r in leak_stats.to_dict("records"):
            parts.append(f"| {r['metric']} | {r['condition']} | {r['dose']} | {r['source']} | {r['n']} | {r['rho']:.3f} | "
                         f"[{r['rho_low']:.3f}, {r['rho_high']:.3f}] | {r['p_value']:.3g} | {100 * r['mean_leakage']:.1f} pp | "
                         f"{100 * r['max_leakage']:.1f} pp |")
        parts.append("")
    if selection is not None:
        parts += ["## Phase diagram", "", f"Rule: {selection['rule']}.", ""]
        parts += [f"Selected: `{selection['cell']}` ({', '.join(f'{k}={v}' for k, v in selection['values'].items())}): "
                  f"source effect {100 * selection['source_effect']:.1f} pp, max bystander {100 * selection['max_bystander']:.1f} pp."
                  if selection.get("values") else "No cell meets the rule: nothing selected.", ""]
    if leak_gate is not None:
        rhos = ", ".join(f"{m}: rho={r:.3f}" for m, r in leak_gate["rho"].items()) or "no leakage statistics"
        parts += ["## Decision gate", "", f"{leak_gate['gate']}: **{leak_gate['result']}** (needs rho >= "
                  f"{leak_gate['min_rho']} for at least one behaviour; {rhos})", ""]
    if seconds:
        parts += ["## Time per phase", "", "| experiment (phase) | cell time, summed |", "| --- | --- |"]
        parts += [f"| {k} | {v / 60:.1f} min |" for k, v in seconds.items()] + [""]
    if figures:
        parts += ["## Figures", ""] + [f"![{p.stem}](figures/{p.name})" for p in figures if p.suffix == ".png"] + [""]
    parts += ["## Missing or failed cells", ""]
    parts += [f"- `{s.subdir}`: {s.state}{': ' + s.error if s.error else ''}" for s in missing] or ["None: every expected cell is complete."]
    return "\n".join(parts) + "\n"


def _seed_p(p: float) -> str:
    """The seed-level p-value as the report shows it: none is possible with one seed in an arm."""
    return "n/a (one seed)" if p != p else f"{p:.3g}"
