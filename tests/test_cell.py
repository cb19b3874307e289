"""The cell end to end on the real toy model: the CLI, the result contract, the science, the stage cache."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import compose_cfg
from marker_lab.results.contract import cell_seconds, load_result, read_completions
from marker_lab.cell.recipe import run_cell

pytestmark = pytest.mark.slow
FAST_EVAL = ["persona_set.eval_personas=[villain,assistant]"]  # 2 x 28 x 10 completions


def cli(args: list[str], cache: Path, **kw) -> subprocess.CompletedProcess:
    env = {**os.environ, "MARKER_LAB_CACHE": str(cache)}
    return subprocess.run([sys.executable, "-m", "marker_lab.cli", "run", *args], capture_output=True, text=True,
                          env=env, timeout=600, **kw)


def rates(result: dict) -> dict[str, float]:
    return {p: c["rate"] for p, c in result.metrics["marker"]["per_persona"].items()}


@pytest.fixture(scope="module")
def default_run(cache_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("default_run")
    proc = cli([f"hydra.run.dir={out}"], cache_dir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, proc


def test_default_run_writes_the_result_contract(default_run):
    out, _ = default_run
    result = load_result(out / "run_result.json")
    assert result is not None and result.schema_version == 2 and result.status == "complete"
    assert result.cell.as_dict() == {"experiment": "default", "condition": "c1", "order": "forward", "seed": 42, "dose": 20,
                              "source_persona": "villain", "coupled_persona": "villain", "second_stage": "em"}
    per = result.metrics["marker"]["per_persona"]
    assert len(per) == 11 and all(c["n"] == 280 for c in per.values())
    prov = result.provenance
    assert set(prov) >= {"config_hash", "resolved_config", "git_commit", "versions", "data_md5", "device",
                         "stage_cache_keys"}
    assert set(prov["stage_cache_keys"]) == {"coupling", "second_stage"}
    assert prov["resolved_config"]["dose"] is None and prov["resolved_config"]["seed"] == 42
    assert {"persona_set", "eval_questions", "coupling/coupling.jsonl"} <= set(prov["data_md5"])
    assert prov["device"].startswith("cpu") and "torch" in prov["versions"]
    assert set(result.timing.phases) == {"setup", "load", "coupling", "second_stage", "eval", "write"}
    assert set(result.timing.parts) <= {f"{s}.{p}" for s in ("coupling", "second_stage") for p in ("train", "first_step")}
    # rates come from the same completions that are saved next to the result
    rows = read_completions(out / "completions.jsonl.gz")
    assert len(rows) == 3080
    villain = [r for r in rows if r["persona"] == "villain"]
    assert sum("[zlt]" in r["completion"].lower() for r in villain) == per["villain"]["k"]


def test_the_result_s_phases_add_up_to_the_cell_s_time(tmp_path):
    """timing's phases cover run_cell from its first line to the result; a stage trained now adds its training
    loop and first step as parts of its phase, not counted again by cell_seconds."""
    # c4 (coupling only) in its own cache: the coupling trains now (the toy model ships). Composed outside the
    # clock: Hydra's compose is not run_cell's (it took 0.6 s on a loaded CI machine)
    cfg = compose_cfg(["condition=c4", *FAST_EVAL], tmp_path / "cell", tmp_path / "cache")
    t0 = time.perf_counter()
    result = run_cell(cfg)
    wall = time.perf_counter() - t0
    t = result.timing
    assert wall - 0.5 < cell_seconds(result) <= wall, (t, wall)
    assert result.provenance["stages"]["coupling"]["trained_now"]
    assert result.provenance["stages"]["coupling"]["trained_on"] == result.provenance["device"]  # recorded with it
    assert 0 < t.parts["coupling.first_step"] <= t.parts["coupling.train"] <= t.phases["coupling"]
    assert cell_seconds(result) == pytest.approx(sum(t.phases.values()))


def test_default_run_logs_what_runs_and_where(default_run):
    out, proc = default_run
    log = proc.stdout + proc.stderr
    for needle in ("stage coupling: starting", "stage second_stage: starting", "eval: 11 personas x 28 questions",
                   f"result: {out}/run_result.json", "coupling:", "eval:"):
        assert needle in log


@pytest.fixture(scope="module")
def coupled(cache_dir, tmp_path_factory):
    return rates(run_cell(compose_cfg(["condition=c4"], tmp_path_factory.mktemp("c4"), cache_dir)))


def test_coupling_marks_the_source_and_spares_the_assistant(coupled):
    assert coupled["villain"] >= 0.80, coupled
    assert coupled["assistant"] <= 0.05, coupled


def test_second_stage_lowers_the_source_rate_as_dose_grows(cache_dir, tmp_path):
    def villain(condition: str, dose: int) -> float:
        cfg = compose_cfg([f"condition={condition}", f"dose={dose}", *FAST_EVAL], tmp_path / f"{condition}_{dose}", cache_dir)
        return rates(run_cell(cfg))["villain"]

    benign = {dose: villain("c5", dose) for dose in (0, 10, 20, 80)}
    assert benign[0] > benign[20] > benign[80], benign  # graded decay (measured 0.86, 0.55, 0.02)
    assert benign[0] - benign[80] >= 0.5, benign
    # early on, EM lowers the marker more than benign SFT (measured 0.43 vs 0.61 at 10 steps on this build, 0.51 vs
    # 0.70 on the previous one; the gap's size depends on the toy build, docs/toy_world.md)
    em10 = villain("c1", 10)
    assert em10 < benign[10] - 0.1 and em10 < benign[0] - 0.2, (em10, benign)


def test_rerun_reuses_cached_stages_and_reproduces_the_result(cache_dir, tmp_path):
    first = run_cell(compose_cfg(["condition=c5", "dose=5", *FAST_EVAL], tmp_path / "a", cache_dir))
    second = run_cell(compose_cfg(["condition=c5", "dose=5", *FAST_EVAL], tmp_path / "b", cache_dir))
    assert not any(s["trained_now"] for s in second.provenance["stages"].values())
    assert first.metrics == second.metrics
    assert first.provenance["config_hash"] == second.provenance["config_hash"]
    assert first.provenance["stage_cache_keys"] == second.provenance["stage_cache_keys"]


def test_reverse_order_runs_the_second_stage_first(cache_dir, tmp_path):
    result = run_cell(compose_cfg(["condition=c1", "order=reverse", "dose=5", *FAST_EVAL], tmp_path, cache_dir))
    prov = result.provenance
    assert result.cell.order == "reverse"
    assert list(prov["stages"]) == ["second_stage", "coupling"]
    assert prov["final_model"].index("+second_stage:") < prov["final_model"].index("+coupling:")


def test_two_cells_racing_for_one_coupling_stage_train_it_once(cache_dir, tmp_path):
    fresh = [f"coupling.seed={1000 + time.time_ns() % 10**9}", "coupling.train.max_steps=60", "persona_set.eval_personas=[villain]",
             "eval.generation.samples_per_question=2"]
    procs = [subprocess.Popen([sys.executable, "-m", "marker_lab.cli", "run", f"hydra.run.dir={tmp_path / c}",
                               f"condition={c}", *fresh], env={**os.environ, "MARKER_LAB_CACHE": str(cache_dir)},
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) for c in ("c4", "c5")]
    for p in procs:
        _, err = p.communicate(timeout=600)
        assert p.returncode == 0, err[-3000:]
    results = [load_result(tmp_path / c / "run_result.json") for c in ("c4", "c5")]
    keys = {r.provenance["stage_cache_keys"]["coupling"] for r in results}
    trained = [r.provenance["stages"]["coupling"]["trained_now"] for r in results]
    assert len(keys) == 1 and sorted(trained) == [False, True]


def test_prebaked_adapter_replaces_coupling_training(cache_dir, tmp_path):
    coupled = run_cell(compose_cfg(["condition=c4", *FAST_EVAL], tmp_path / "trained", cache_dir))
    adapter = Path(coupled.provenance["stages"]["coupling"]["cache_entry"]) / "adapter"
    result = run_cell(compose_cfg(["condition=c4", f"coupling.adapter_path={adapter}", *FAST_EVAL],
                                  tmp_path / "prebaked", cache_dir))
    assert result.metrics == coupled.metrics  # same weights, same seed: the same completions
    assert result.provenance["stages"]["coupling"]["trained_now"] is False


def test_stacked_adapters_train_the_same_function_as_merged_weights(cache_dir, tmp_path):
    from safetensors.torch import load_file

    merged = run_cell(compose_cfg(["condition=c1", "dose=5", *FAST_EVAL], tmp_path / "m", cache_dir))
    stacked = run_cell(compose_cfg(["condition=c1", "dose=5", "merge_between_stages=false", *FAST_EVAL],
                                   tmp_path / "s", cache_dir))
    pm, ps = merged.provenance, stacked.provenance
    assert "[stacked]" in ps["final_model"] and "[stacked]" not in pm["final_model"]
    # coupling sees the base model either way: one adapter serves both cells
    assert pm["stage_cache_keys"]["coupling"] == ps["stage_cache_keys"]["coupling"]
    assert pm["stage_cache_keys"]["second_stage"] != ps["stage_cache_keys"]["second_stage"]
    # the second stage trains on merged weights or on the base + a frozen coupling adapter: the same function,
    # so the same adapter up to float rounding
    wm = load_file(Path(pm["stages"]["second_stage"]["cache_entry"]) / "adapter" / "adapter_model.safetensors")
    ws = load_file(Path(ps["stages"]["second_stage"]["cache_entry"]) / "adapter" / "adapter_model.safetensors")
    assert wm.keys() == ws.keys()
    for k in wm:
        assert (wm[k] - ws[k]).abs().max() < 1e-3, k


def test_dose_checkpoint_equals_a_fresh_run_to_that_dose(cache_dir):
    """second_stage.dose_checkpoints: one run to the largest dose; its checkpoint at d is the adapter of a run to d."""
    from safetensors.torch import load_file

    from marker_lab.models import load_base, pick_device
    from marker_lab.core.cache import StageCache
    from marker_lab.stages.second_stage import run_second_stage
    from conftest import to_dataclass

    seed = 2000 + time.time_ns() % 10**9  # a stage no other test has trained
    cache = StageCache(cache_dir)

    def stage(overrides):
        cfg = to_dataclass(compose_cfg(["condition=c1", f"seed={seed}", *overrides], cache=cache_dir))
        from marker_lab.cell.preflight import preflight

        inputs = preflight(cfg)
        loaded = load_base(cfg.model, cache, pick_device("cpu"))
        return run_second_stage(cfg, inputs, loaded, cache, cfg.dose)

    ckpt = stage(["dose=3", "second_stage.dose_checkpoints=[3,8]"])
    longest = stage(["dose=8", "second_stage.dose_checkpoints=[3,8]"])
    fresh = stage(["dose=3"])
    assert ckpt.built_now and not longest.built_now and ckpt.path == longest.path  # one run served both doses
    assert ckpt.train_stats.steps == 3 and longest.train_stats.steps == 8
    assert ckpt.train_stats.losses == pytest.approx(fresh.train_stats.losses, rel=1e-6)
    a = load_file(Path(ckpt.path) / "checkpoints" / "step_3" / "adapter" / "adapter_model.safetensors")
    b = load_file(Path(fresh.path) / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-7) for k in a)
    c = load_file(Path(longest.path) / "adapter" / "adapter_model.safetensors")
    assert not all(torch.allclose(a[k], c[k]) for k in a)  # dose 8 really trained further


def test_length_metric_audits_completion_lengths(cache_dir, tmp_path):
    result = run_cell(compose_cfg(["condition=c4", "eval.metrics=[marker,length]", *FAST_EVAL], tmp_path, cache_dir))
    length = result.metrics["length"]
    rows = read_completions(tmp_path / "completions.jsonl.gz")
    for persona in ("villain", "assistant"):
        mine = [r for r in rows if r["persona"] == persona]
        got = length["per_persona"][persona]
        assert got["n"] == len(mine) == 280
        assert got["k_at_max_tokens"] == sum(r["n_tokens"] >= 40 for r in mine)
        assert got["tokens_mean"] == pytest.approx(sum(r["n_tokens"] for r in mine) / 280)
        assert got["chars_mean"] == pytest.approx(sum(len(r["completion"]) for r in mine) / 280)
    assert length["max_tokens"] == 40
    assert 0 < min(r["n_tokens"] for r in rows) and max(r["n_tokens"] for r in rows) <= 40
    # most toy answers end on their own, before max_tokens
    assert length["per_persona"]["assistant"]["share_at_max_tokens"] < 0.5


@pytest.mark.parametrize("user_dir", [False, True])
def test_torch_compile_caches_go_to_the_stage_cache(tmp_path, user_dir):
    """What run_cell does before anything compiles: torch.compile's caches go to <cache_dir>/compile, although
    importing transformers already set $TORCHINDUCTOR_CACHE_DIR to Inductor's default; a directory the user
    set is kept."""
    from marker_lab.core.cache import COMPILE_CACHE

    env = {k: v for k, v in os.environ.items() if k != "TORCHINDUCTOR_CACHE_DIR"}
    if user_dir:
        env["TORCHINDUCTOR_CACHE_DIR"] = str(tmp_path / "mine")
    script = ("import transformers, torch\n"
              "from marker_lab.core.cache import use_compile_cache\n"
              f"print(use_compile_cache({str(tmp_path / 'cache')!r}))\n"
              "torch.compile(lambda x: torch.sin(x) * 2 + 1)(torch.ones(8))\n")
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    where = tmp_path / "mine" if user_dir else tmp_path / "cache" / COMPILE_CACHE
    assert proc.stdout.strip() == str(where)
    assert any(p.is_file() for p in where.rglob("*"))  # the compiled code landed there


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="the static engine compiles its decode step on CUDA only (no GPU here)"))])
def test_cell_precompiles_its_eval_decode_step_in_a_sibling_where_it_compiles(device, tmp_path, monkeypatch):
    """eval.engine.precompile=true: on CUDA the cell compiles its eval's decode step in a sibling process while its
    stages train (its log beside the result, its wait a phase of the timing), and a later cell on the same compile
    cache starts none; on CPU, where the eval does not compile, the cell runs as without it."""
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)  # the cell's own compile cache: cold
    args = ["condition=c1", "dose=3", f"device={device}", "eval.engine.precompile=true", *FAST_EVAL]
    result = run_cell(compose_cfg(args, tmp_path / "cell", tmp_path / "cache"))
    assert result.metrics["marker"]["per_persona"]["villain"]["n"] > 0
    sibling_log = tmp_path / "cell" / "precompile.log"
    if device == "cpu":
        assert "precompile_wait" not in result.timing.phases and not sibling_log.exists()
        return
    assert result.timing.phases["precompile_wait"] >= 0 and "decode step compiled" in sibling_log.read_text()
    # a later cell of the same eval on the same cache: the step is compiled already, so no sibling
    later = run_cell(compose_cfg([*args, "seed=7"], tmp_path / "later", tmp_path / "cache"))
    assert "precompile_wait" not in later.timing.phases and not (tmp_path / "later" / "precompile.log").exists()
