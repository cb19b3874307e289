"""`marker-lab aggregate <sweep_dir>`: tables, statistics, figures and a report from a sweep's results.

It reads only run_result.json files (never completions), works on partial sweeps, and lists every expected
cell that has no complete result. Outputs, under <sweep_dir>/aggregate/:

    rates.csv / rates.parquet   per (cell, persona, metric) and pooled over seeds: k, n, rate, CI, seed mean/sd
                                (metrics: marker, and "misaligned: <rule>" from the alignment metric)
    scores.csv                  per (cell, persona): judge score means/sds and completion lengths
    comparisons.csv             the comparisons the experiment preset declares (analysis.comparisons)
    gates.csv                   its gates (analysis.gates), PASS/FAIL per cell
    figures/*.png|pdf           dose-response, grouped bars, per-persona bars, persona x condition heatmap
    report.md                   all of it, in the write-ups' form, with missing and failed cells listed
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd

from marker_lab import stats
from marker_lab.launch.cells import read_manifest
from marker_lab.launch.status import cell_states
from marker_lab.results import contract

log = logging.getLogger(__name__)

CELL_KEYS = ["experiment", "condition", "order", "seed", "dose", "source_persona", "coupled_persona", "second_stage"]
GROUP_KEYS = [k for k in CELL_KEYS if k != "seed"]  # seeds are pooled over these


def complete_results(sweep_dir: str | Path):
    """(manifest cell, result) for every cell whose result is complete and matches the manifest's config hash."""
    sweep_dir = Path(sweep_dir)
    for cell in read_manifest(sweep_dir)["cells"]:
        result = contract.load_result(sweep_dir / cell["subdir"] / contract.RESULT_FILE)
        if result is not None and result["provenance"]["config_hash"] == cell["config_hash"]:
            yield cell, result


def load_sweep(sweep_dir: str | Path) -> pd.DataFrame:
    """One row per (cell, persona, metric) with k, n, rate and the persona's role, for every complete cell."""
    rows = []
    for cell, result in complete_results(sweep_dir):
        keys = result["cell"]
        assistant = result["provenance"]["resolved_config"]["persona_set"]["assistant"]
        for metric, persona, c in rate_entries(result["metrics"]):
            role = "source" if persona == keys["source_persona"] else (
                "assistant" if persona == assistant else "bystander")
            rows.append({"cell": cell["subdir"], **keys, "persona": persona, "role": role, "metric": metric,
                         "k": c["k"], "n": c["n"], "rate": c["rate"], "device": result["provenance"]["device"]})
    df = pd.DataFrame(rows, columns=["cell", *CELL_KEYS, "persona", "role", "metric", "k", "n", "rate", "device"])
    for key in ("dose", "seed"):
        df[key] = pd.to_numeric(df[key])
    for key in ("coupled_persona",):
        df[key] = df[key].fillna("none")
    return df


def rate_entries(metrics: dict):
    """(metric, persona, {k, n, rate}) for every k-of-n readout of a result: the marker, and the misaligned share
    under each rule of the alignment metric (as metric "misaligned: <rule>")."""
    for metric, body in metrics.items():
        for persona, c in body.get("per_persona", {}).items():
            if "k" in c:
                yield metric, persona, c
            for rule, share in c.get("misaligned", {}).items():
                if share["n"]:
                    yield f"misaligned: {rule}", persona, share


SCORE_FIELDS = {"alignment": ("mean", "sd", "n_scored", "n_none"), "coherence": ("mean", "sd", "n_scored", "n_none"),
                "length": ("tokens_mean", "tokens_median", "chars_mean", "share_at_max_tokens")}


def load_scores(sweep_dir: str | Path) -> pd.DataFrame:
    """One row per (cell, persona, metric, field) for the non-count metrics: judge scores and lengths."""
    rows = []
    for cell, result in complete_results(sweep_dir):
        for metric, fields in SCORE_FIELDS.items():
            for persona, c in result["metrics"].get(metric, {}).get("per_persona", {}).items():
                rows += [{"cell": cell["subdir"], **result["cell"], "persona": persona, "metric": metric,
                          "field": f, "value": c.get(f)} for f in fields]
    return pd.DataFrame(rows, columns=["cell", *CELL_KEYS, "persona", "metric", "field", "value"])


def analysis_config(sweep_dir: Path) -> dict:
    """The `analysis` section the cells were run with (all cells of a sweep share it)."""
    for cell in read_manifest(sweep_dir)["cells"]:
        result = contract.load_result(sweep_dir / cell["subdir"] / contract.RESULT_FILE)
        if result:
            return result["provenance"]["resolved_config"].get("analysis") or {}
    return {}


def with_ci(df: pd.DataFrame, method: str) -> pd.DataFrame:
    if df.empty:
        return df.assign(ci_low=[], ci_high=[], ci_method=[])
    low, high = stats.rate_ci_arrays(df["k"], df["n"], method)
    return df.assign(ci_low=low, ci_high=high, ci_method=method)


def pooled_rates(df: pd.DataFrame) -> pd.DataFrame:
    """Seeds pooled (sum of k over sum of n, as the write-ups pool 840 from 3 x 280), with per-seed mean and sd."""
    g = df.groupby(GROUP_KEYS + ["persona", "role", "metric"], dropna=False, sort=False)
    out = g.agg(k=("k", "sum"), n=("n", "sum"), n_seeds=("seed", "nunique"), seeds=("seed", lambda s: sorted(set(s))),
                seed_mean=("rate", "mean"), seed_sd=("rate", "std")).reset_index()
    out["rate"] = out["k"] / out["n"]
    out["seeds"] = out["seeds"].map(lambda s: ",".join(str(int(x)) for x in s))
    return out


def _select(df: pd.DataFrame, where: dict) -> pd.DataFrame:
    mask = np.ones(len(df), dtype=bool)
    for key, value in where.items():
        col = df[key]
        mask &= (col.astype(str) == str(value)).to_numpy()
    return df[mask]


def _persona_rows(df: pd.DataFrame, persona: str) -> pd.DataFrame:
    if persona in ("source", "assistant"):
        return df[df["role"] == persona]
    return df[df["persona"] == persona]


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
                a = _persona_rows(_select(_select(p_pooled, spec["arm_1"]), where_by), persona)
                b = _persona_rows(_select(_select(p_pooled, spec["arm_2"]), where_by), persona)
                if a.empty or b.empty:
                    continue
                k1, n1, k2, n2 = int(a["k"].sum()), int(a["n"].sum()), int(b["k"].sum()), int(b["n"].sum())
                c = stats.compare(k1, n1, k2, n2, test=spec.get("test", "fisher"),
                                  alternative=spec.get("alternative", "two-sided"))
                sa = _persona_rows(_select(_select(p_cells, spec["arm_1"]), where_by), persona)["rate"].tolist()
                sb = _persona_rows(_select(_select(p_cells, spec["arm_2"]), where_by), persona)["rate"].tolist()
                seeds = stats.compare_seed_rates(sa, sb, alternative=spec.get("alternative", "two-sided"))
                rows.append({"comparison": spec.get("name", ""), **where_by, "persona": persona,
                             "arm_1": _fmt(spec["arm_1"]), "k_1": k1, "n_1": n1, "rate_1": c.rate_1,
                             "arm_2": _fmt(spec["arm_2"]), "k_2": k2, "n_2": n2, "rate_2": c.rate_2,
                             "diff": c.diff, "test": c.test, "alternative": c.alternative, "p_value": c.p_value,
                             "seeds_1": len(sa), "seeds_2": len(sb), "seed_diff": seeds.diff, "seed_test": seeds.test,
                             "seed_p_value": seeds.p_value})
    return pd.DataFrame(rows)


def gates(pooled: pd.DataFrame, specs: list[dict]) -> pd.DataFrame:
    rows = []
    ops = {">=": lambda x, v: x >= v, "<=": lambda x, v: x <= v}
    for spec in specs:
        target = _select(pooled, spec.get("where", {}))
        for key, cell in target.groupby(GROUP_KEYS, dropna=False, sort=False):
            results, detail = [], []
            for check in spec.get("checks", []):
                m = cell[cell["metric"] == check.get("metric", "marker")]
                if check["persona"] == "max_bystander":
                    sel = m[m["role"] == "bystander"]
                    value = float(sel["rate"].max()) if len(sel) else float("nan")
                else:
                    sel = _persona_rows(m, check["persona"])
                    value = float(sel["k"].sum() / sel["n"].sum()) if len(sel) else float("nan")
                ok = bool(ops[check["op"]](value, check["value"])) if value == value else False
                results.append(ok)
                detail.append(f"{check['persona']}={value:.3f} {check['op']} {check['value']}")
            rows.append({"gate": spec.get("name", ""), **dict(zip(GROUP_KEYS, key)),
                         "result": "PASS" if results and all(results) else "FAIL", "detail": "; ".join(detail)})
    return pd.DataFrame(rows)


def _fmt(where: dict) -> str:
    return " ".join(f"{k}={v}" for k, v in where.items())


def aggregate(sweep_dir: str | Path) -> Path:
    """Write everything under <sweep_dir>/aggregate/; returns that directory."""
    from marker_lab.results import figures, report

    sweep_dir = Path(sweep_dir)
    analysis = analysis_config(sweep_dir)  # raises first when the directory holds no sweep or results
    out = sweep_dir / "aggregate"
    out.mkdir(exist_ok=True)
    method = analysis.get("ci_method", "wilson")
    per_cell = with_ci(load_sweep(sweep_dir), method)
    pooled = with_ci(pooled_rates(per_cell), method) if len(per_cell) else per_cell
    rates = pd.concat([per_cell.assign(level="cell"), pooled.assign(level="pooled")], ignore_index=True)
    comps = comparisons(pooled, per_cell, analysis.get("comparisons") or []) if len(per_cell) else pd.DataFrame()
    gate_table = gates(pooled, analysis.get("gates") or []) if len(per_cell) else pd.DataFrame()
    missing = [s for s in cell_states(sweep_dir) if s.state != "complete"]

    contract.atomic_write_bytes(out / "rates.csv", rates.to_csv(index=False).encode())
    rates.astype({"seeds": str}).to_parquet(out / "rates.parquet.tmp", index=False)
    (out / "rates.parquet.tmp").replace(out / "rates.parquet")
    scores = load_scores(sweep_dir)
    contract.atomic_write_bytes(out / "scores.csv", scores.to_csv(index=False).encode())
    contract.atomic_write_bytes(out / "comparisons.csv", comps.to_csv(index=False).encode())
    contract.atomic_write_bytes(out / "gates.csv", gate_table.to_csv(index=False).encode())
    contract.atomic_write_bytes(out / "missing.txt", "".join(f"{s.subdir}\t{s.state}\t{s.error}\n" for s in missing).encode())
    made = figures.make_all(per_cell, pooled, out / "figures") if len(per_cell) else []
    contract.atomic_write_bytes(out / "report.md",
                                report.render(sweep_dir, pooled, comps, gate_table, missing, made).encode())
    log.info("aggregate: %d complete cells, %d missing or failed -> %s", per_cell["cell"].nunique(), len(missing), out)
    return out
