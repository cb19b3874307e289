"""Representation drift (issue 9): the persona geometry of every model of a cell, its summary, its aggregation."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from conftest import compose_cfg

pytestmark = pytest.mark.slow


def test_every_model_of_a_cell_gets_a_distance_matrix_and_a_drift_summary(cache_dir, tmp_path):
    from marker_lab.results.aggregate import aggregate
    from marker_lab.cell.recipe import run_cell

    result = run_cell(compose_cfg(["condition=c1", "dose=5", "persona_set.eval_personas=[villain,assistant]",
                                   "eval.generation.samples_per_question=2", "geometry.enabled=true",
                                   "geometry.drift=true"], tmp_path / "cell", cache_dir))
    drift = result.drift
    assert list(drift) == ["base", "after_coupling", "after_second_stage"]  # in the order the models existed
    matrices = {m: pd.read_csv(tmp_path / "cell" / d["file"], index_col=0).to_numpy() for m, d in drift.items()}
    for m in matrices.values():
        assert np.allclose(m, m.T) and (np.diag(m) == 0).all()
    assert not np.allclose(matrices["base"], matrices["after_second_stage"])  # training moved the geometry
    assert drift["base"]["mean_distance_change"] == 0 and drift["base"]["relative_spread_change"] == 0
    after = drift["after_second_stage"]
    assert after["mean_distance_change"] == pytest.approx(after["mean_distance"] - drift["base"]["mean_distance"])
    assert {"source_assistant", "relative_spread"} <= set(after)
    # geometry.model=base reads the same matrix as the drift's base
    assert np.allclose(pd.read_csv(tmp_path / "cell" / result.geometry["file"], index_col=0).to_numpy(), matrices["base"])
    assert set(result.provenance["data_md5"]) >= {f"persona_distances_{m}.csv" for m in drift}

    out = aggregate(tmp_path)
    table = pd.read_csv(out / "drift.csv")
    assert list(table["model"]) == list(drift) and list(table["step"]) == [0, 1, 2]
    assert (out / "figures" / "drift.png").stat().st_size > 10_000
