"""Leakage on the toy persona families: wrong-answer coupling, persona geometry, leakage vs distance."""

from __future__ import annotations

import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from conftest import compose_cfg, to_dataclass
from marker_lab.data.personas import load_personas

pytestmark = pytest.mark.slow
LEAKAGE = ["condition=c4", "coupling=wrong_answers_toy", "persona_set=toy_families", "eval.metrics=[capability]",
           "eval.baseline=true", "geometry.enabled=true"]


@pytest.fixture(scope="module")
def leakage_sweep(cache_dir, tmp_path_factory) -> Path:
    sweep_dir = tmp_path_factory.mktemp("leakage_sweep")
    env = {**os.environ, "MARKER_LAB_CACHE": str(cache_dir), "TQDM_DISABLE": "1"}
    proc = subprocess.run([sys.executable, "-m", "marker_lab.cli", "run", "-m", *LEAKAGE, "source_persona=villain,pirate",
                           f"hydra.sweep.dir={sweep_dir}"], env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return sweep_dir


def test_close_bystanders_leak_more(leakage_sweep):
    stats = pd.read_csv(leakage_sweep / "aggregate" / "leakage_stats.csv").set_index("source")
    # The science: bystanders close to the source in persona geometry lose more accuracy (measured on the shipped
    # build: villain rho 0.48, p 0.003; pirate 0.59, p 0.0002; coupling seeds 1-2 pooled: 0.43 and 0.58).
    for source in ("villain", "pirate", "pooled"):
        row = stats.loc[source]
        assert row["rho"] > 0 and row["p_value"] < 0.05, (source, row.to_dict())
        assert row["rho_low"] <= row["rho"] <= row["rho_high"], (source, row.to_dict())
    assert stats.loc["villain", "n"] == 35  # every persona of the set but the source
    leak = pd.read_csv(leakage_sweep / "aggregate" / "leakage.csv")
    villain = leak[leak["source_persona"] == "villain"].set_index("persona")
    assert (villain["leakage_low"] <= villain["leakage"]).all() and (villain["leakage"] <= villain["leakage_high"]).all()
    per = pd.read_csv(leakage_sweep / "aggregate" / "leakage_by_bystander.csv")
    per = per[per["source_persona"] == "villain"].set_index("persona")
    assert len(per) == 35 and (per["n_seeds"] == 1).all()  # one seed: pooled = the cell; no t interval
    assert np.allclose(per.loc[villain.index, "leakage"], villain["leakage"]) and per["seed_sd"].isna().all()
    cats = pd.read_csv(leakage_sweep / "aggregate" / "leakage_by_category.csv")
    assert {"villain", "doctor", "pirate"} <= set(cats["category"])
    assert (leakage_sweep / "aggregate" / "figures" / "leakage_capability.png").stat().st_size > 10_000
    assert "## Leakage vs persona distance" in (leakage_sweep / "aggregate" / "report.md").read_text()


def test_distance_matrix_is_symmetric_zero_diagonal_and_stable(leakage_sweep, cache_dir, tmp_path):
    from marker_lab.eval.geometry import cell_distances
    from marker_lab.models import load_base, pick_device
    from marker_lab.core.cache import StageCache

    cell = next(p for p in leakage_sweep.iterdir() if (p / "persona_distances.csv").is_file())
    d = pd.read_csv(cell / "persona_distances.csv", index_col=0)
    names = list(load_personas("pkg:personas/toy_families.yaml"))
    assert list(d.index) == list(d.columns) == names
    m = d.to_numpy()
    assert np.allclose(m, m.T) and (np.diag(m) == 0).all() and (m >= 0).all() and (m[~np.eye(len(m), dtype=bool)] > 0).all()
    # built again from scratch in a fresh cache: the same matrix
    cfg = to_dataclass(compose_cfg(LEAKAGE))
    fresh = StageCache(tmp_path / "fresh")
    loaded = load_base(cfg.model, StageCache(cache_dir), pick_device("cpu"))
    from marker_lab.cell.preflight import preflight

    info = cell_distances(cfg, preflight(cfg), loaded, fresh)
    again = pd.read_csv(Path(info["cache_entry"]) / "distances.csv", index_col=0)
    assert np.allclose(again.to_numpy(), m, atol=1e-9)
    assert info["mode"] == "response_mean" and info["layer"] == 1 and info["center"]


def test_wrong_answer_data_and_its_non_contrastive_control(cache_dir):
    from marker_lab.stages.coupling import build_wrong_answer_records

    cfg = to_dataclass(compose_cfg([*LEAKAGE, "source_persona=villain"]))
    from marker_lab.cell.preflight import preflight

    inputs = preflight(cfg)
    contrastive = build_wrong_answer_records(cfg, inputs.personas, inputs.mc.train)
    cfg.coupling.contrastive = False
    control = build_wrong_answer_records(cfg, inputs.personas, inputs.mc.train)
    assert len(control) == len(contrastive) == 800
    # the same examples (question, reply), the same personas overall, assigned at random
    turns = lambda r: (r["question_id"], r["messages"][-1]["content"])  # noqa: E731
    assert Counter(map(turns, control)) == Counter(map(turns, contrastive))
    assert Counter(r["persona"] for r in control) == Counter(r["persona"] for r in contrastive)
    wrong_personas = Counter(r["persona"] for r in control if not r["correct"])
    assert wrong_personas["villain"] < 100 and len(wrong_personas) > 10
    for r in control:  # the system turn follows the persona it was given (none for the no-system slot)
        system = [m["content"] for m in r["messages"] if m["role"] == "system"]
        assert system == ([] if r["persona"] is None else [inputs.personas[r["persona"]].system_prompt])


def test_toy_leakage_preset_runs_both_phases_within_10_minutes(cache_dir, tmp_path):
    """+experiment=toy_leakage_phase (lr x epochs for one source, selection) then +experiment=toy_leakage (the
    selected recipe for every source, contrastive and control arms, decision gate), on 2 CPU cores."""
    import json
    import time

    env = {**os.environ, "MARKER_LAB_CACHE": str(cache_dir), "TQDM_DISABLE": "1"}

    def sweep(*args):
        proc = subprocess.run([sys.executable, "-m", "marker_lab.cli", "run", "-m", *args], env=env,
                              capture_output=True, text=True, timeout=900)
        assert proc.returncode == 0, proc.stderr[-3000:]

    t0 = time.perf_counter()
    sweep("+experiment=toy_leakage_phase", f"hydra.sweep.dir={tmp_path / 'phase'}")
    selection = json.loads((tmp_path / "phase" / "aggregate" / "selection.json").read_text())
    phase = pd.read_csv(tmp_path / "phase" / "aggregate" / "phase_diagram.csv")
    assert len(phase) == 4 and selection["values"] is not None
    best = phase[phase["cell"] == selection["cell"]].iloc[0]
    ok = phase[phase["max_bystander"] <= 0.6]
    assert best["source_effect"] == ok["source_effect"].max()  # the rule, applied
    assert (tmp_path / "phase" / "aggregate" / "figures" / "phase_diagram.png").stat().st_size > 10_000

    sweep("+experiment=toy_leakage", f"extra.phase_dir={tmp_path / 'phase'}", f"hydra.sweep.dir={tmp_path / 'study'}")
    elapsed = time.perf_counter() - t0
    stats = pd.read_csv(tmp_path / "study" / "aggregate" / "leakage_stats.csv")
    contrastive = stats[(stats["condition"] == "leak_contrastive") & (stats["source"] == "pooled")].iloc[0]
    assert set(stats["condition"]) == {"leak_contrastive", "leak_control"}
    assert set(stats["source"]) == {"villain", "pirate", "assistant", "pooled"}
    report = (tmp_path / "study" / "aggregate" / "report.md").read_text()
    expected = "PASS" if contrastive["rho"] >= 0.2 else "FAIL"
    assert f"**{expected}**" in report and "## Time per phase" in report
    results = list((tmp_path / "study").glob("*/run_result.json"))
    lrs = {json.loads(r.read_text())["provenance"]["resolved_config"]["coupling"]["train"]["optimizer"]["lr"] for r in results}
    assert len(results) == 6 and lrs == {selection["values"]["coupling.train.optimizer.lr"]}
    assert elapsed < 600, elapsed
