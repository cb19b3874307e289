"""`marker-lab aggregate <sweep_dir>`: tables, statistics, figures and a report from a sweep's results.

It reads only run_result.json files (never completions), works on partial sweeps, and lists every expected
cell that has no complete result. Outputs, under <sweep_dir>/aggregate/:

    rates.csv / rates.parquet   per (cell, persona, metric) and pooled over seeds: k, n, rate, CI, seed mean/sd
                                (metrics: marker, and "misaligned: <rule>" from the alignment metric)
    scores.csv                  per (cell, persona): judge score means/sds, completion lengths and marker_prob
                                (the exact probability that the reply opens with the marker: mean, sd over questions)
    by_step.csv                 evals during training: per (cell, stage, step, persona, metric) its value
    leakage*.csv                cells with eval.baseline and geometry: each bystander's leakage vs its distance to
                                the source, Spearman rho with bootstrap CI per source and pooled, per bystander
                                across seeds (pooled Newcombe CI and per-seed t interval), per category
    drift.csv                   cells with geometry.drift: per (cell, model) the persona geometry's summary and
                                its change from the base model (figures/drift.png)
    probe.csv                   cells with the probe metric: per (cell, model, persona) the frozen probe's mean score
                                and AUC source vs that persona; probe_summary.csv, the source per cell group and
                                model; figures/surface_vs_latent.png (marker rate beside probe score and AUC)
    phase_diagram.csv           analysis.phase_diagram: the recipe sweep's cells, and selection.json, the recipe
                                its rule selects (read by `${selected:<sweep_dir>,<key>}` in a later preset)
    comparisons.csv             the comparisons the experiment preset declares (analysis.comparisons)
    gates.csv                   its gates (analysis.gates): PASS / FAIL / NO DATA per cell group
    figures/*.png|pdf           dose-response, grouped bars, per-persona bars, persona x condition heatmap,
                                evolution curves (metric vs step) when cells evaluated during training
    report.md                   all of it, in the write-ups' form, with missing and failed cells listed
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pandas as pd

from marker_lab import stats
from marker_lab.config.schema import COMPARE
from marker_lab.core.files import atomic_write_bytes
from marker_lab.results import drift, figures, leakage, probe, report
from marker_lab.results.contract import cell_seconds
from marker_lab.results.sweep import CELL_KEYS, GROUP_KEYS, cell_states, complete_results, role_of
from marker_lab.results.tables import persona_rows, rate_entries, select_rows

log = logging.getLogger(__name__)


def load_sweep(sweep: str | Path | list) -> pd.DataFrame:
    """One row per (cell, persona, metric) with k, n, rate and the persona's role, for every complete cell."""
    rows = []
    for cell, result in results_of(sweep):
        keys = result.cell.as_dict()
        for metric, persona, c in rate_entries(result.metrics):
            rows.append({"cell": cell["subdir"], **keys, "persona": persona, "role": role_of(result, persona),
                         "metric": metric, "k": c["k"], "n": c["n"], "rate": c["rate"],
                         "device": result.provenance["device"]})
    return _typed(pd.DataFrame(rows, columns=["cell", *CELL_KEYS, "persona", "role", "metric", "k", "n", "rate", "device"]))


def results_of(sweep: str | Path | list) -> list:
    """A sweep's (cell, result) pairs: given as a list (aggregation reads them once), or read from a directory."""
    return sweep if isinstance(sweep, list) else complete_results(sweep)


SCORE_FIELDS = {"alignment": ("mean", "sd", "n_scored", "n_none"), "coherence": ("mean", "sd", "n_scored", "n_none"),
                "marker_prob": ("mean", "sd", "median", "logprob_mean", "n"),
                "length": ("tokens_mean", "tokens_median", "chars_mean", "share_at_max_tokens")}


def _typed(df: pd.DataFrame) -> pd.DataFrame:
    for key in ("dose", "seed"):  # integers stay integers (Int64 holds the missing seed of pooled rows)
        df[key] = pd.to_numeric(df[key]).astype("Int64")
    df["coupled_persona"] = df["coupled_persona"].fillna("none")
    return df


def load_scores(sweep: str | Path | list) -> pd.DataFrame:
    """One row per (cell, persona, metric, field) for the non-count metrics: judge scores and lengths."""
    rows = []
    for cell, result in results_of(sweep):
        for metric, fields in SCORE_FIELDS.items():
            for persona, c in result.metrics.get(metric, {}).get("per_persona", {}).items():
                rows += [{"cell": cell["subdir"], **result.cell.as_dict(), "persona": persona, "role": role_of(result, persona),
                          "metric": metric, "field": f, "value": c.get(f)} for f in fields]
    return _typed(pd.DataFrame(rows, columns=["cell", *CELL_KEYS, "persona", "role", "metric", "field", "value"]))


# the number a metric is drawn as in evolution curves
STEP_VALUE = {"alignment": "mean", "coherence": "mean", "length": "tokens_mean", "marker_prob": "mean"}  # k/n metrics: rate


def load_by_step(sweep: str | Path | list) -> pd.DataFrame:
    """Evals during training: one row per (cell, stage, step, persona, metric) with its value (and k, n if counted)."""
    rows = []
    for cell, result in results_of(sweep):
        for stage, series in (result.metrics_by_step or {}).items():
            for point in series:
                for metric, persona, c in rate_entries(point["metrics"]):
                    rows.append({"cell": cell["subdir"], **result.cell.as_dict(), "stage": stage, "step": point["step"],
                                 "persona": persona, "role": role_of(result, persona), "metric": metric,
                                 "value": c["rate"], "k": c["k"], "n": c["n"]})
                for metric, field in STEP_VALUE.items():
                    for persona, c in point["metrics"].get(metric, {}).get("per_persona", {}).items():
                        rows.append({"cell": cell["subdir"], **result.cell.as_dict(), "stage": stage, "step": point["step"],
                                     "persona": persona, "role": role_of(result, persona), "metric": metric,
                                     "value": c.get(field), "k": None, "n": None})
    df = _typed(pd.DataFrame(rows, columns=["cell", *CELL_KEYS, "stage", "step", "persona", "role", "metric",
                                            "value", "k", "n"]))
    return df.astype({"k": "Int64", "n": "Int64"})  # counts stay integers where scores have none


def analysis_config(results: list) -> dict:
    """The `analysis` section the cells were run with (all cells of a sweep share it)."""
    for _, result in results:
        return result.resolved_config.get("analysis") or {}
    return {}


def with_ci(df: pd.DataFrame, method: str) -> pd.DataFrame:
    if df.empty:
        return df.assign(ci_low=[], ci_high=[], ci_method=[])
    low, high = stats.rate_ci_arrays(df["k"], df["n"], method)
    # a bound at 0 or 1 is exactly that (Wilson's formula leaves 6.9e-18 for k = 0)
    low = np.where(df["k"].to_numpy() == 0, 0.0, low)
    high = np.where(df["k"].to_numpy() == df["n"].to_numpy(), 1.0, high)
    return df.assign(ci_low=low, ci_high=high, ci_method=method)


def pooled_rates(df: pd.DataFrame) -> pd.DataFrame:
    """Seeds pooled (sum of k over sum of n, as the write-ups pool 840 from 3 x 280), with per-seed mean and sd."""
    g = df.groupby(GROUP_KEYS + ["persona", "role", "metric"], dropna=False, sort=False)
    out = g.agg(k=("k", "sum"), n=("n", "sum"), n_seeds=("seed", "nunique"), seeds=("seed", lambda s: sorted(set(s))),
                seed_mean=("rate", "mean"), seed_sd=("rate", "std")).reset_index()
    out["rate"] = out["k"] / out["n"]
    out["seeds"] = out["seeds"].map(lambda s: ",".join(str(int(x)) for x in s))
    return out


def comparisons(pooled: pd.DataFrame, per_cell: pd.DataFrame, specs: list[dict]) -> pd.DataFrame:
    rows = []
    for spec in specs:
        p_pooled = pooled[pooled["metric"] == spec.get("metric", "marker")]
        p_cells = per_cell[per_cell["metric"] == spec.get("metric", "marker")]
        personas = sorted(p_pooled["persona"].unique()) if spec.get("persona") == "each" else [spec.get("persona", "source")]
        by = list(spec.get("by") or [])
        groups = [()] if not by else sorted({tuple(r) for r in p_pooled[by].itertuples(index=False)})
        for persona in personas:
            for group in groups:
                where_by = dict(zip(by, group))
                a = persona_rows(select_rows(select_rows(p_pooled, spec["arm_1"]), where_by), persona)
                b = persona_rows(select_rows(select_rows(p_pooled, spec["arm_2"]), where_by), persona)
                if a.empty or b.empty:
                    continue
                k1, n1, k2, n2 = int(a["k"].sum()), int(a["n"].sum()), int(b["k"].sum()), int(b["n"].sum())
                c = stats.compare(k1, n1, k2, n2, test=spec.get("test", "fisher"),
                                  alternative=spec.get("alternative", "two-sided"))
                sa = persona_rows(select_rows(select_rows(p_cells, spec["arm_1"]), where_by), persona)["rate"].tolist()
                sb = persona_rows(select_rows(select_rows(p_cells, spec["arm_2"]), where_by), persona)["rate"].tolist()
                seeds = stats.compare_seed_rates(sa, sb, alternative=spec.get("alternative", "two-sided"))
                rows.append({"comparison": spec.get("name", ""), **where_by, "persona": persona,
                             "arm_1": _fmt(spec["arm_1"]), "k_1": k1, "n_1": n1, "rate_1": c.rate_1,
                             "arm_2": _fmt(spec["arm_2"]), "k_2": k2, "n_2": n2, "rate_2": c.rate_2,
                             "diff": c.diff, "test": c.test, "alternative": c.alternative, "p_value": c.p_value,
                             "seeds_1": len(sa), "seeds_2": len(sb), "seed_diff": seeds.diff, "seed_test": seeds.test,
                             "seed_p_value": seeds.p_value})
    return pd.DataFrame(rows)




def gates(rates: pd.DataFrame, specs: list[dict], scores: pd.DataFrame | None = None) -> pd.DataFrame:
    """PASS / FAIL (or NO DATA) per gate and cell group; `rates` holds per-cell rows (seeds pooled unless a gate
    says level: cell). A check reads a k/n rate (marker, capability, misaligned shares) or, with `field`, a score
    (alignment/coherence mean, length), averaged over the group's seeds."""
    scores = scores if scores is not None else pd.DataFrame(columns=[*CELL_KEYS, "persona", "role", "metric", "field", "value"])
    rows = []
    for spec in specs:
        keys = GROUP_KEYS + ["seed"] if spec.get("level", "pooled") == "cell" else GROUP_KEYS
        target_r, target_s = select_rows(rates, spec.get("where", {})), select_rows(scores, spec.get("where", {}))
        groups = pd.concat([target_r[keys], target_s[keys]]).drop_duplicates()
        if groups.empty:  # a gate for cells this sweep does not have (G0 on a sweep without c4): not evaluated
            log.info("gate %s: not evaluated, no cell of this sweep matches %s", spec.get("name", ""),
                     spec.get("where", {}))
        for key in groups.itertuples(index=False):
            where = dict(zip(keys, key))
            results, detail = [], []
            for check in spec.get("checks", []):
                value = _check_value(check, select_rows(target_r, where), select_rows(target_s, where))
                results.append(None if value != value else bool(COMPARE[check["op"]](value, check["value"])))
                name = f"{check['persona']} {check.get('metric', 'marker')}{'.' + check['field'] if check.get('field') else ''}"
                detail.append(f"{name}={value:.3f} {check['op']} {check['value']}" if value == value else f"{name}: no data")
            result = "NO DATA" if not results or None in results else ("PASS" if all(results) else "FAIL")
            rows.append({"gate": spec.get("name", ""), **where, "result": result, "detail": "; ".join(detail)})
    return pd.DataFrame(rows)


def _check_value(check: dict, rates: pd.DataFrame, scores: pd.DataFrame) -> float:
    """The number a gate check compares: a pooled rate, or a score field averaged over seeds (nan: absent)."""
    metric, persona = check.get("metric", "marker"), check["persona"]
    if check.get("field"):
        m = scores[(scores["metric"] == metric) & (scores["field"] == check["field"])].dropna(subset=["value"])
        if persona == "max_bystander":
            means = m[m["role"] == "bystander"].groupby("persona")["value"].mean()
            return float(means.max()) if len(means) else float("nan")
        sel = persona_rows(m, persona)
        return float(sel["value"].astype(float).mean()) if len(sel) else float("nan")
    m = rates[rates["metric"] == metric]
    if persona == "max_bystander":
        by = m[m["role"] == "bystander"].groupby("persona")[["k", "n"]].sum()
        return float((by["k"] / by["n"]).max()) if len(by) else float("nan")
    sel = persona_rows(m, persona)
    return float(sel["k"].sum() / sel["n"].sum()) if len(sel) and sel["n"].sum() else float("nan")


def phase_seconds(sweep: str | Path | list) -> dict[str, float]:
    """Summed cell time per experiment label (a leakage study's phases are its experiments), from the results."""
    total: dict[str, float] = {}
    for _, result in results_of(sweep):
        label = result.cell.experiment
        total[label] = total.get(label, 0.0) + cell_seconds(result)
    return total


def _fmt(where: dict) -> str:
    return " ".join(f"{k}={v}" for k, v in where.items())


def aggregate(sweep_dir: str | Path) -> Path:
    """Write everything under <sweep_dir>/aggregate/; returns that directory."""
    sweep_dir = Path(sweep_dir)
    states = cell_states(sweep_dir)  # raises first when the directory holds no sweep or results
    results = complete_results(sweep_dir)  # read once; every table below gets them
    return _aggregate(sweep_dir, results, analysis_config(results), [s for s in states if s.state != "complete"])


def _aggregate(sweep_dir: Path, results: list, analysis: dict, missing: list) -> Path:
    out = sweep_dir / "aggregate"
    out.mkdir(exist_ok=True)
    method = analysis.get("ci_method", "wilson")
    per_cell = with_ci(load_sweep(results), method)
    pooled = with_ci(pooled_rates(per_cell), method) if len(per_cell) else per_cell
    rates = pd.concat([per_cell.assign(level="cell"), pooled.assign(level="pooled")], ignore_index=True)
    rates = rates.astype({k: "Int64" for k in ("seed", "dose", "k", "n") if k in rates})
    comps = comparisons(pooled, per_cell, analysis.get("comparisons") or []) if len(per_cell) else pd.DataFrame()
    scores = load_scores(results)
    gate_table = gates(per_cell, analysis.get("gates") or [], scores) if len(per_cell) or len(scores) else pd.DataFrame()
    by_step = load_by_step(results)

    atomic_write_bytes(out / "rates.csv", rates.to_csv(index=False).encode())
    rates.astype({"seeds": str} if "seeds" in rates else {}).to_parquet(out / "rates.parquet.tmp", index=False)
    (out / "rates.parquet.tmp").replace(out / "rates.parquet")
    atomic_write_bytes(out / "scores.csv", scores.to_csv(index=False).encode())
    atomic_write_bytes(out / "by_step.csv", by_step.to_csv(index=False).encode())
    atomic_write_bytes(out / "comparisons.csv", comps.to_csv(index=False).encode())
    atomic_write_bytes(out / "gates.csv", gate_table.to_csv(index=False).encode())
    atomic_write_bytes(out / "missing.txt", "".join(f"{s.subdir}\t{s.state}\t{s.error}\n" for s in missing).encode())
    made = figures.make_all(per_cell, pooled, out / "figures", scores) if len(per_cell) else []
    made += figures.evolution(by_step, out / "figures")
    leak_table, leak_stats = leakage.load_leakage(sweep_dir, results), None
    if len(leak_table):
        leak_stats = leakage.leakage_stats(leak_table)
        for name, table in (("leakage", leak_table), ("leakage_stats", leak_stats),
                            ("leakage_by_bystander", leakage.by_bystander(leak_table)),
                            ("leakage_by_category", leakage.by_category(leak_table))):
            atomic_write_bytes(out / f"{name}.csv", table.to_csv(index=False).encode())
        made += leakage.scatter(leak_table, leak_stats, out / "figures")
    drift_table = drift.load_drift(results)
    if len(drift_table):
        atomic_write_bytes(out / "drift.csv", drift_table.to_csv(index=False).encode())
        made += drift.drift_figure(drift_table, out / "figures")
    probe_table = probe.load_probe(results)
    if len(probe_table):
        atomic_write_bytes(out / "probe.csv", probe_table.to_csv(index=False).encode())
        atomic_write_bytes(out / "probe_summary.csv", probe.latent_summary(probe_table).to_csv(index=False).encode())
        made += probe.surface_vs_latent(probe_table, out / "figures")
    leak_gate = selection = None
    if analysis.get("phase_diagram"):
        phase, selection = leakage.phase_diagram(results, analysis["phase_diagram"])
        atomic_write_bytes(out / "phase_diagram.csv", phase.to_csv(index=False).encode())
        atomic_write_bytes(out / "selection.json", json.dumps(selection, indent=1, default=float).encode())
        made += leakage.phase_heatmaps(phase, analysis["phase_diagram"], selection, out / "figures")
    if analysis.get("leakage_gate"):
        leak_gate = leakage.leakage_gate(leak_stats if leak_stats is not None else pd.DataFrame(), analysis["leakage_gate"])
    atomic_write_bytes(out / "report.md",
                                report.render(sweep_dir, pooled, comps, gate_table, missing, made, leak_stats, selection, leak_gate,
                                              phase_seconds(results), scores).encode())
    log.info("aggregate: %d complete cells, %d missing or failed -> %s", per_cell["cell"].nunique(), len(missing), out)
    return out
