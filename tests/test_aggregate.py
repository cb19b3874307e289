"""Aggregation of a real toy sweep: rates with CIs, pooling over seeds, comparisons, gates, figures, report."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from scipy import stats as sps
from statsmodels.stats.proportion import proportion_confint

from marker_lab.results import load_sweep
from marker_lab.results.aggregate import aggregate

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def toy_sweep(cache_dir, tmp_path_factory) -> Path:
    sweep_dir = tmp_path_factory.mktemp("agg_sweep")
    env = {**os.environ, "MARKER_LAB_CACHE": str(cache_dir), "TQDM_DISABLE": "1"}
    small = ["persona_set.eval_personas=[villain,assistant,pirate]", "eval.generation.samples_per_question=2",
             f"hydra.sweep.dir={sweep_dir}"]
    for grid in (["condition=c1,c5", "dose=2,20", "seed=42,137"], ["condition=c4"]):
        proc = subprocess.run([sys.executable, "-m", "marker_lab.cli", "run", "-m", *grid, *small], env=env,
                              capture_output=True, text=True, timeout=900)
        assert proc.returncode == 0, proc.stderr[-3000:]
    return sweep_dir


def test_rates_carry_cis_and_pool_seeds(toy_sweep):
    rates = pd.read_parquet(toy_sweep / "aggregate" / "rates.parquet")
    assert rates.equals(rates) and len(pd.read_csv(toy_sweep / "aggregate" / "rates.csv")) == len(rates)
    cells = rates[rates["level"] == "cell"]
    assert cells["cell"].nunique() == 9 and set(cells["persona"]) == {"villain", "assistant", "pirate"}
    for r in cells.itertuples():
        low, high = proportion_confint(r.k, r.n, method="wilson")
        assert r.ci_low == pytest.approx(max(0, low)) and r.ci_high == pytest.approx(min(1, high))
    pooled = rates[rates["level"] == "pooled"]
    one = pooled[(pooled["condition"] == "c1") & (pooled["dose"] == 20) & (pooled["persona"] == "villain")].iloc[0]
    seeds = cells[(cells["condition"] == "c1") & (cells["dose"] == 20) & (cells["persona"] == "villain")]
    assert (one.k, one.n, one.n_seeds) == (seeds["k"].sum(), seeds["n"].sum(), 2) and one.seeds == "42,137"
    assert one.seed_mean == pytest.approx(seeds["rate"].mean()) and one.seed_sd == pytest.approx(seeds["rate"].std())
    c4 = pooled[(pooled["condition"] == "c4") & (pooled["persona"] == "villain")].iloc[0]
    assert c4.n_seeds == 1 and pd.isna(c4.seed_sd)  # one seed: no spread, not a made-up zero


def test_comparisons_and_gates(toy_sweep):
    comps = pd.read_csv(toy_sweep / "aggregate" / "comparisons.csv")
    em_benign = comps[comps["comparison"] == "EM vs benign on the source"].sort_values("dose")
    assert list(em_benign["dose"]) == [2, 20]
    for r in em_benign.itertuples():
        p = sps.fisher_exact([[r.k_1, r.n_1 - r.k_1], [r.k_2, r.n_2 - r.k_2]]).pvalue
        assert r.p_value == pytest.approx(p) and r.diff == pytest.approx(r.k_1 / r.n_1 - r.k_2 / r.n_2)
        assert (r.seeds_1, r.seeds_2) == (2, 2) and 0 <= r.seed_p_value <= 1
    gates = pd.read_csv(toy_sweep / "aggregate" / "gates.csv")
    g0 = gates[gates["gate"] == "G0"].iloc[0]
    rates = load_sweep(toy_sweep)
    c4 = rates[rates["condition"] == "c4"].set_index("persona")["rate"]
    expected = "PASS" if c4["villain"] >= 0.85 and c4["assistant"] <= 0.01 else "FAIL"
    assert g0["condition"] == "c4" and g0["result"] == expected


def test_figures_and_report(toy_sweep):
    figs = toy_sweep / "aggregate" / "figures"
    for name in ("dose_response", "condition_bars", "persona_bars", "heatmap"):
        assert (figs / f"{name}.png").stat().st_size > 10_000 and (figs / f"{name}.pdf").stat().st_size > 1_000
    report = (toy_sweep / "aggregate" / "report.md").read_text()
    assert report.count("| c1 dose=") == 2 and "| c4 " in report and "G0" in report
    assert "![dose_response](figures/dose_response.png)" in report
    assert "None: every expected cell is complete." in report


def test_missing_cells_are_shown_never_dropped(toy_sweep, tmp_path):
    partial = tmp_path / "partial"
    shutil.copytree(toy_sweep, partial)
    victim = next(p for p in sorted(partial.iterdir()) if p.name.startswith("condition=c5"))
    (victim / "run_result.json").unlink()
    aggregate(partial)
    report = (partial / "aggregate" / "report.md").read_text()
    assert f"`{victim.name}`" in report
    assert victim.name in (partial / "aggregate" / "missing.txt").read_text()
    assert load_sweep(partial)["cell"].nunique() == 8


def run_notebook(sweep: Path, monkeypatch) -> str:
    """Execute notebooks/browse_results.ipynb on `sweep`; fail on any error; return its text and data outputs."""
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    notebook = Path(__file__).resolve().parent.parent / "notebooks" / "browse_results.ipynb"
    nb = nbformat.read(notebook, as_version=4)
    monkeypatch.setenv("MARKER_LAB_SWEEP", str(sweep))
    nbclient.NotebookClient(nb, timeout=300, kernel_name="python3",
                            resources={"metadata": {"path": str(notebook.parent)}}).execute()
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    assert not [o for o in outputs if o.get("output_type") == "error"]
    return "".join(o.get("text", "") for o in outputs) + "".join(str(o.get("data", {})) for o in outputs)


def test_browse_notebook_runs_on_a_toy_sweep(toy_sweep, monkeypatch):
    text = run_notebook(toy_sweep, monkeypatch)
    assert "9 complete cells" in text and "image/png" in text and "EM vs benign on the source" in text


def test_browse_notebook_runs_on_one_loose_result(toy_sweep, tmp_path, monkeypatch):
    """One c4 result and no manifest: no comparison matches (an empty comparisons.csv), one seed, no dose curve."""
    c4 = next(p for p in sorted(toy_sweep.iterdir()) if p.name.startswith("condition=c4"))
    (tmp_path / "one").mkdir()
    shutil.copy(c4 / "run_result.json", tmp_path / "one" / "run_result.json")
    text = run_notebook(tmp_path, monkeypatch)
    assert "1 complete cells" in text and "No comparisons declared" in text and "c4 / villain / marker" in text


def test_any_set_of_result_files_aggregates_without_a_manifest(toy_sweep, tmp_path):
    loose = tmp_path / "runs"
    for i, result in enumerate(sorted(toy_sweep.glob("*/run_result.json"))[:3]):
        (loose / f"run{i}").mkdir(parents=True)
        shutil.copy(result, loose / f"run{i}" / "run_result.json")
    out = aggregate(loose)
    assert load_sweep(loose)["cell"].nunique() == 3
    assert "None: every expected cell is complete." in (out / "report.md").read_text()


@pytest.fixture(scope="module")
def judged_sweep(cache_dir, tmp_path_factory) -> Path:
    """Two cells judged by the toy judge and evaluated during their second stage."""
    sweep_dir = tmp_path_factory.mktemp("judged_sweep")
    env = {**os.environ, "MARKER_LAB_CACHE": str(cache_dir), "TQDM_DISABLE": "1"}
    args = ["condition=c1,c5", "dose=4", "persona_set.eval_personas=[villain,assistant,pirate]",
            "eval.generation.samples_per_question=2", "eval.metrics=[marker,capability,alignment]",
            "eval.during_training.fractions=[0.5,1.0]", "eval.during_training.metrics=[marker,capability,alignment]",
            f"hydra.sweep.dir={sweep_dir}"]
    proc = subprocess.run([sys.executable, "-m", "marker_lab.cli", "run", "-m", *args], env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return sweep_dir


def test_evolution_curves_from_evals_during_training(judged_sweep):
    by_step = pd.read_csv(judged_sweep / "aggregate" / "by_step.csv")
    assert sorted(by_step["step"].unique()) == [0, 2, 4] and set(by_step["stage"]) == {"second_stage"}
    assert {"marker", "capability", "alignment"} <= set(by_step["metric"])
    assert set(by_step["condition"]) == {"c1", "c5"} and set(by_step["persona"]) == {"villain", "assistant", "pirate"}
    # the curve's end is the cell's own end-of-stage readout
    rates = load_sweep(judged_sweep)
    end = by_step[(by_step["step"] == 4) & (by_step["metric"] == "capability")]
    for r in end.itertuples():
        cell = rates[(rates["cell"] == r.cell) & (rates["persona"] == r.persona) & (rates["metric"] == "capability")]
        assert cell["rate"].iloc[0] == pytest.approx(r.value)
    figs = judged_sweep / "aggregate" / "figures"
    for metric in ("marker", "capability", "alignment"):
        assert (figs / f"evolution_second_stage_{metric}.png").stat().st_size > 10_000


def test_gates_read_scores_and_say_when_data_is_missing(judged_sweep):
    from marker_lab.results.aggregate import gates, load_scores

    rates, scores = load_sweep(judged_sweep), load_scores(judged_sweep)
    spec = {"name": "G4", "where": {"second_stage": "em"}, "level": "cell",
            "checks": [{"persona": "assistant", "metric": "alignment", "field": "mean", "op": "<", "value": 40}]}
    table = gates(rates, [spec], scores)
    mean = scores[(scores["condition"] == "c1") & (scores["persona"] == "assistant") & (scores["metric"] == "alignment")
                  & (scores["field"] == "mean")]["value"].iloc[0]
    assert len(table) == 1 and table["result"].iloc[0] == ("PASS" if mean < 40 else "FAIL")
    assert f"{mean:.3f}" in table["detail"].iloc[0]
    missing = {**spec, "checks": [{"persona": "assistant", "metric": "coherence", "field": "mean", "op": ">", "value": 50}]}
    assert gates(rates, [missing], scores)["result"].iloc[0] == "NO DATA"
    elsewhere = {**spec, "name": "G0", "where": {"condition": "c4"}}  # a gate for cells this sweep does not have
    assert gates(rates, [elsewhere, spec], scores)["gate"].tolist() == ["G4"]  # not evaluated: no NO DATA row
    cap = {"name": "capability kept", "where": {}, "checks": [{"persona": "max_bystander", "metric": "capability",
                                                                 "op": ">=", "value": 0.3}]}
    assert set(gates(rates, [cap], scores)["result"]) <= {"PASS", "FAIL"}


def test_dose_response_labels_the_doses_the_sweep_ran(toy_sweep, tmp_path, monkeypatch):
    """The dose axis (symlog) is labelled 0, 2 and 20, the doses of the sweep, not the axis' powers of ten."""
    from marker_lab.results import figures
    from marker_lab.results.aggregate import pooled_rates, with_ci

    drawn = []
    real_save = figures.save

    def keep(fig, out, name):  # the figure as drawn, then saved as it always is
        drawn.append([t.get_text() for t in fig.axes[0].get_xticklabels()])
        return real_save(fig, out, name)

    monkeypatch.setattr(figures, "save", keep)
    per_cell = with_ci(load_sweep(toy_sweep), "wilson")
    paths = figures.dose_response(per_cell, with_ci(pooled_rates(per_cell), "wilson"), tmp_path)
    assert paths and drawn == [["0", "2", "20"]]


@pytest.mark.slow
def test_loose_runs_of_two_experiments_get_each_gate_once(cache_dir, tmp_path):
    """Two loose c4 runs of different experiments, aggregated together: each row of the headline shows its own G0,
    and the gates section names the experiment of each."""
    from conftest import compose_cfg
    from marker_lab.cell.recipe import run_cell

    small = ["condition=c4", "persona_set.eval_personas=[villain,assistant]", "eval.generation.samples_per_question=1"]
    run_cell(compose_cfg(small, tmp_path / "runs" / "a", cache_dir))
    run_cell(compose_cfg(["+experiment=toy_dose_response", *small], tmp_path / "runs" / "b", cache_dir))
    report = (aggregate(tmp_path / "runs") / "report.md").read_text()
    rows = [line for line in report.splitlines() if line.startswith("| experiment=")]
    assert len(rows) == 2 and all(row.count("G0 ") == 1 for row in rows), rows
    assert "| G0 | default: c4 dose=0 |" in report and "| G0 | toy_dose_response: c4 dose=0 |" in report
