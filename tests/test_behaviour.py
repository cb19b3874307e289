"""Behaviour metrics on the real toy model: capability (multiple choice), wrong-answer coupling, evals during
training, and the time a fully judged cell costs."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from scipy.stats import binomtest, fisher_exact

from conftest import compose_cfg, to_dataclass
from marker_lab.cell.recipe import run_cell

pytestmark = pytest.mark.slow
BASE = ["condition=c2", "dose=0"]  # no coupling, no second stage: the toy base model


def accuracy(result: dict) -> dict[str, dict]:
    return result.metrics["capability"]["per_persona"]


@pytest.fixture(scope="module")
def base_capability(cache_dir, tmp_path_factory):
    return run_cell(compose_cfg([*BASE, "eval.metrics=[capability]"], tmp_path_factory.mktemp("base_cap"), cache_dir))


def test_toy_model_answers_multiple_choice_well_above_chance(base_capability):
    cap = base_capability.metrics["capability"]
    assert cap["n_items"] == 80 and cap["source"] == "toy" and cap["split_seed"] == 42
    for persona, c in accuracy(base_capability).items():
        assert c["n"] == 80
        # four choices: chance is 0.25
        assert c["rate"] > 0.5 and binomtest(c["k"], c["n"], 0.25, alternative="greater").pvalue < 1e-6, persona
        assert 0.25 < c["p_correct_mean"] <= 1
    assert "capability" in base_capability.provenance["resolved_config"]["eval"]["metrics"]


def test_wrong_answer_coupling_lowers_the_source_more_than_bystanders(cache_dir, tmp_path, base_capability):
    result = run_cell(compose_cfg([
        "condition=c4", "coupling=wrong_answers_toy", "source_persona=villain", "eval.metrics=[capability]"],
        tmp_path, cache_dir))
    before, after = accuracy(base_capability), accuracy(result)
    drop = {p: before[p]["rate"] - after[p]["rate"] for p in after}
    bystanders = [p for p in drop if p not in ("villain", "assistant")]
    mean_bystander_drop = sum(drop[p] for p in bystanders) / len(bystanders)
    assert drop["villain"] > 0.3 and drop["villain"] > mean_bystander_drop + 0.25, drop
    # the source's accuracy after coupling is below every bystander's, significantly
    k_by = sum(after[p]["k"] for p in bystanders)
    n_by = sum(after[p]["n"] for p in bystanders)
    v = after["villain"]
    assert fisher_exact([[v["k"], v["n"] - v["k"]], [k_by, n_by - k_by]], alternative="less").pvalue < 1e-6
    # the training set was built as specified, from the train half only
    import json

    entry = Path(result.provenance["stages"]["coupling"]["cache_entry"])
    records = [json.loads(line) for line in (entry / "data" / "coupling.jsonl").read_text().splitlines()]
    roles = [r["role"] for r in records]
    assert roles.count("positive") == 200 and roles.count("negative") == 400
    assert roles.count("anchor: no system turn") == 100 and roles.count("anchor: assistant") == 100
    assert all(r["messages"][0]["role"] == "user" for r in records if r["role"] == "anchor: no system turn")
    assert all(not r["correct"] for r in records if r["role"] == "positive")
    assert all(r["correct"] for r in records if r["role"] != "positive")
    from marker_lab.eval.capability import eval_items

    from marker_lab.cell.preflight import preflight

    c4 = compose_cfg_dataclass(["condition=c4", "eval.metrics=[capability]"])
    held_out = {it.id for it in eval_items(c4.eval.capability, preflight(c4).mc)[0]}
    assert not held_out & {r["question_id"] for r in records}


def compose_cfg_dataclass(overrides):
    return to_dataclass(compose_cfg(overrides))


DURING = ["eval.during_training.fractions=[0.5,1.0]", "eval.during_training.metrics=[marker,capability]",
          "eval.during_training.personas=[villain,assistant]"]
FINAL = ["eval.metrics=[marker,capability]", "persona_set.eval_personas=[villain,assistant]"]


def test_evals_during_training_end_where_the_stage_ends(cache_dir, tmp_path):
    """The series' last point is the end-of-stage eval, and evaluating mid-training leaves the adapter unchanged."""
    args = ["condition=c1", "dose=6", "merge_between_stages=false", *FINAL]
    with_series = run_cell(compose_cfg([*args, *DURING], tmp_path / "during", cache_dir))
    plain = run_cell(compose_cfg(args, tmp_path / "plain", cache_dir))
    series = with_series.metrics_by_step["second_stage"]
    assert [p["step"] for p in series] == [0, 3, 6] and "coupling" not in with_series.metrics_by_step
    last = series[-1]["metrics"]
    for metric in ("marker", "capability"):
        assert last[metric]["per_persona"] == with_series.metrics[metric]["per_persona"], metric
    # step 0 is the coupled model before the second stage: its marker rate is the coupled one
    assert series[0]["metrics"]["marker"]["per_persona"]["villain"]["rate"] > 0.5
    # forked RNG: the second stage trained exactly as without the evals
    a = load_file(Path(with_series.provenance["stages"]["second_stage"]["cache_entry"]) / "adapter" / "adapter_model.safetensors")
    b = load_file(Path(plain.provenance["stages"]["second_stage"]["cache_entry"]) / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)
    assert plain.metrics_by_step is None
    # a rerun reads the series from the stage cache instead of training again
    again = run_cell(compose_cfg([*args, *DURING, "seed=42"], tmp_path / "again", cache_dir))
    assert not again.provenance["stages"]["second_stage"]["trained_now"]
    assert again.metrics_by_step == with_series.metrics_by_step
    # ... and so does a cell whose final eval differs in what the series does not read (its metric list)
    other = run_cell(compose_cfg([*args, *DURING, "eval.metrics=[marker]"], tmp_path / "other", cache_dir))
    assert not other.provenance["stages"]["second_stage"]["trained_now"]
    assert other.metrics_by_step == with_series.metrics_by_step


def test_evals_during_training_run_on_the_cells_engine(cache_dir, tmp_path):
    """The series samples on the cell's engine (eval.engine.cache; static = the GPU's compiled decode path, run
    uncompiled on CPU) on the training LoRA model: its last point equals the end-of-stage eval on that engine, and
    at every step its marker counts agree with stock generate's (Fisher's exact test per persona, Bonferroni)."""
    from marker_lab.eval.evaluate import series_config

    args = ["condition=c1", "dose=6", "merge_between_stages=false", "eval.generation.samples_per_question=4", *FINAL,
            *DURING]
    static_cfg = compose_cfg([*args, "eval.engine.cache=static"], tmp_path / "static", cache_dir)
    assert series_config(to_dataclass(static_cfg), "second_stage").eval.engine.cache.value == "static"
    static = run_cell(static_cfg)
    stock = run_cell(compose_cfg([*args, "eval.engine.cache=dynamic"], tmp_path / "dynamic", cache_dir))
    series, reference = static.metrics_by_step["second_stage"], stock.metrics_by_step["second_stage"]
    assert series[-1]["metrics"]["marker"]["per_persona"] == static.metrics["marker"]["per_persona"]
    assert [p["step"] for p in series] == [p["step"] for p in reference] == [0, 3, 6]
    for a, b in zip(series, reference):
        for persona, x in a["metrics"]["marker"]["per_persona"].items():
            y = b["metrics"]["marker"]["per_persona"][persona]
            _, pval = fisher_exact([[x["k"], x["n"] - x["k"]], [y["k"], y["n"] - y["k"]]])
            assert pval > 0.01 / 6, (a["step"], persona, x, y)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the compiled decode scopes run on CUDA only")
@pytest.mark.parametrize("scope", ["layers", "shared_layers"])
def test_evals_during_training_over_compiled_layers_then_a_per_layer_eval_on_gpu(cache_dir, tmp_path, scope):
    """Both kinds of decode step in one process: the series decodes over the training's compiled layers (so with
    the whole-model graph), the final eval compiles the decode step per layer (eval.engine.compile_scope=layers, or
    shared_layers, the default), whose CUDA graphs mark iterations process-wide. The cell must finish, and its
    final eval must agree with the series' last point (the same adapter, sampled twice: Fisher's exact test per
    persona). Both passed on an H200 (docs/benchmarks.md, "tenth session" and "eleventh session")."""
    args = ["condition=c1", "dose=6", "merge_between_stages=false", "device=cuda", "eval.engine.cache=static",
            "eval.generation.samples_per_question=4", "second_stage.train.compile=true",
            f"eval.engine.compile_scope={scope}", *FINAL, *DURING]
    result = run_cell(compose_cfg(args, tmp_path / "cell", cache_dir))
    series = result.metrics_by_step["second_stage"]
    assert [p["step"] for p in series] == [0, 3, 6]
    for persona, x in series[-1]["metrics"]["marker"]["per_persona"].items():
        y = result.metrics["marker"]["per_persona"][persona]
        assert x["n"] == y["n"] > 0
        _, pval = fisher_exact([[x["k"], x["n"] - x["k"]], [y["k"], y["n"] - y["k"]]])
        assert pval > 0.01 / 2, (persona, x, y)


def test_fully_judged_cell_stays_within_the_default_budget_plus_60s(cache_dir, tmp_path):
    """The issue's budget: eval=[marker,capability,alignment,coherence,length] costs at most 60 s over the default
    cell (stages cached for both, so the difference is the metrics)."""
    run_cell(compose_cfg(["seed=43"], tmp_path / "warm", cache_dir))  # both timed cells reuse its stages
    t0 = time.perf_counter()
    run_cell(compose_cfg(["seed=43"], tmp_path / "default", cache_dir))
    default_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    full = run_cell(compose_cfg(["seed=43", "eval.metrics=[marker,capability,alignment,coherence,length]"],
                                tmp_path / "full", cache_dir))
    full_s = time.perf_counter() - t0
    assert set(full.metrics) == {"marker", "capability", "alignment", "coherence", "length"}
    assert full_s <= default_s + 60, (full_s, default_s)
