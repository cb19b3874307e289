"""Sweeps through the real CLI on the toy model: grids, resume, failure isolation, kill -9, shared stages."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
from hydra import compose, initialize_config_dir

from marker_lab.launch.launchers import gpu_slots
from marker_lab.launch.sweeper import union_of_grids
from marker_lab.results.sweep import cell_states
from marker_lab.results.contract import load_result
from marker_lab.cell.main import CONF_DIR

# small cells: the villain only, 2 samples per question
SMALL = ["persona_set.eval_personas=[villain]", "eval.generation.samples_per_question=2"]


def sweep(args: list[str], sweep_dir: Path, cache: Path, **kw) -> subprocess.CompletedProcess:
    env = {**os.environ, "MARKER_LAB_CACHE": str(cache), "TQDM_DISABLE": "1"}
    return subprocess.run([sys.executable, "-m", "marker_lab.cli", "run", "-m", *args, *SMALL,
                           f"hydra.sweep.dir={sweep_dir}"], capture_output=True, text=True, env=env, timeout=900, **kw)


def grid_cells(experiment: str, cli: list[str] = ()) -> list[list[str]]:
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("config", overrides=[f"+experiment={experiment}"], return_hydra_config=True)
    grids = [dict(g) for g in cfg.hydra.sweeper.grids]
    return union_of_grids(grids, list(cli), {})


def test_experiment_grids_are_the_write_ups_grids():
    mt = grid_cells("marker_transfer")
    assert len(mt) == 13
    assert sorted(c for c in mt if "condition=c4" in c) == [["condition=c4", "seed=42"]]
    # longest cells first: the launcher starts them in this order
    assert [c[0] for c in mt[::3]] == ["condition=c5", "condition=c1", "condition=c3", "condition=c2", "condition=c4"]
    dr = grid_cells("dose_response")
    assert len(dr) == 1 + 18 + 4  # baseline, 9 doses x 2 data sets, 2 more seeds x 2 data sets at dose 10
    # plain overrides replace a key in every grid
    assert len(grid_cells("marker_transfer", ["seed=42"])) == 5
    assert grid_cells("em_first")[:3] == [["condition=c1", "seed=42"], ["condition=c5", "seed=42"],
                                          ["condition=c4", "seed=42"]]


def test_gpu_slots_never_share_a_gpu():
    assert gpu_slots([0, 1, 2, 3, 4, 5, 6, 7], 1) == [(i,) for i in range(8)]
    assert gpu_slots([0, 1, 2], 2) == [(0, 1)]
    assert gpu_slots([4, 5], 1) == [(4,), (5,)]


@pytest.mark.slow
def test_sweep_runs_resumes_and_aggregates(cache_dir, tmp_path):
    first = sweep(["condition=c1,c5", "dose=3"], tmp_path, cache_dir)
    assert first.returncode == 0, first.stderr[-3000:]
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert [c["subdir"].split(",")[0] for c in manifest["cells"]] == ["condition=c1", "condition=c5"]
    for c in manifest["cells"]:
        result = load_result(tmp_path / c["subdir"] / "run_result.json")
        assert result.provenance["config_hash"] == c["config_hash"]
    assert [s.state for s in cell_states(tmp_path)] == ["complete", "complete"]
    rates = pd.read_csv(tmp_path / "aggregate" / "rates.csv")
    assert len(rates[rates["level"] == "cell"]) == 2 and len(rates[rates["level"] == "pooled"]) == 2

    again = sweep(["condition=c1,c5", "dose=3"], tmp_path, cache_dir)
    assert again.returncode == 0 and "2 cells, 2 already complete, 0 to run" in again.stdout + again.stderr

    status = subprocess.run([sys.executable, "-m", "marker_lab.cli", "status", str(tmp_path)], capture_output=True,
                            text=True)
    assert status.returncode == 0 and "2 cells: 2 complete" in status.stdout


def damaged_adapter(root: Path) -> Path:
    """A pre-baked adapter that passes start-up checks (a whole safetensors file) but cannot load into the toy model:
    its LoRA matrix has the wrong shape, so the cell fails after its model loads, as a real run can."""
    import torch
    from safetensors.torch import save_file

    root.mkdir(parents=True)
    (root / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": 4,
                                                          "lora_alpha": 8, "target_modules": ["q_proj"]}))
    save_file({"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": torch.zeros(4, 7)},
              str(root / "adapter_model.safetensors"))
    return root


@pytest.mark.slow
def test_a_failing_cell_is_isolated_and_reported(cache_dir, tmp_path):
    adapter = damaged_adapter(tmp_path / "adapter")
    # c2 runs no coupling, so it never reads the damaged adapter; c1 does, and fails after its model loads
    proc = sweep(["condition=c1,c2", "dose=3", f"coupling.adapter_path={adapter}"], tmp_path / "s", cache_dir)
    assert proc.returncode != 0  # the multirun reports the failure...
    states = {s.subdir.split(",")[0]: s for s in cell_states(tmp_path / "s")}
    assert states["condition=c2"].state == "complete"  # ...after the other cell finished
    assert states["condition=c1"].state == "failed" and "size mismatch" in states["condition=c1"].error
    # one summary line and the failed cell's directory, not a traceback
    err = proc.stderr.strip().splitlines()
    summary = next(i for i, line in enumerate(err) if "cells failed in" in line)
    assert err[summary].startswith("marker-lab: 1 of 2 cells failed") and "condition=c1" in err[summary + 1]
    assert not any(line.startswith("Traceback") for line in err[summary:])
    missing = (tmp_path / "s" / "aggregate" / "missing.txt").read_text()
    assert "condition=c1" in missing and "failed" in missing


@pytest.mark.slow
def test_a_bad_data_file_stops_the_sweep_before_anything_runs(cache_dir, tmp_path):
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}\n'
                      'not json\n')
    proc = sweep(["condition=c1,c5", "dose=3", "second_stage.datasets.em.toy=null",
                  f"second_stage.datasets.em.path={broken}"], tmp_path / "s", cache_dir)
    assert proc.returncode != 0
    assert f"second_stage.datasets.em.path: {broken} line 2: not JSON" in proc.stderr
    assert "1 of 2 cells cannot run; nothing was submitted" in proc.stderr
    assert not any((tmp_path / "s").glob("condition=*"))


def fresh_seed() -> int:
    """A coupling seed no earlier run has cached, so the stage really trains (the cache may be shared)."""
    return 1000 + time.time_ns() % 10**9


@pytest.mark.slow
def test_kill_9_mid_training_then_rerun_reruns_only_that_cell(cache_dir, tmp_path):
    # a fresh coupling for both cells (150 steps: long enough to kill the victim mid-stage); the other completes
    seed = fresh_seed()
    args = [f"coupling.seed={seed},{seed + 1}", "condition=c4", "coupling.train.max_steps=150"]
    env = {**os.environ, "MARKER_LAB_CACHE": str(cache_dir), "TQDM_DISABLE": "1"}
    cmd = [sys.executable, "-m", "marker_lab.cli", "run", "-m", *args, *SMALL, f"hydra.sweep.dir={tmp_path}",
           "hydra.launcher.max_parallel=2"]
    launcher = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    victim = None
    deadline = time.time() + 300
    while time.time() < deadline:
        victim = next(iter(tmp_path.glob(f"*coupling.seed={seed},*")), None)
        if victim and (victim / "cell_status.json").is_file() and any(
                victim.glob("*.log")) and "stage coupling: training" in next(victim.glob("*.log")).read_text():
            break
        time.sleep(0.5)
    time.sleep(3)  # mid-training
    pid = json.loads((victim / "cell_status.json").read_text())["pid"]
    os.kill(pid, signal.SIGKILL)
    _, err = launcher.communicate(timeout=900)
    assert launcher.returncode != 0
    assert not (victim / "run_result.json").exists()  # nothing that looks complete
    states = {("victim" if f"coupling.seed={seed}," in s.subdir else "other"): s.state for s in cell_states(tmp_path)}
    assert states == {"victim": "failed", "other": "complete"}
    # the killed stage left no cache entry under its final name
    stages = cache_dir / "stages"
    assert not any(p.is_dir() and ".tmp-" not in p.name and (p / "cache_key.json").is_file()
                   and json.loads((p / "cache_key.json").read_text()).get("coupling", {}).get("seed") == seed
                   for p in stages.iterdir())

    rerun = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "2 cells, 1 already complete, 1 to run" in rerun.stdout + rerun.stderr
    assert {s.state for s in cell_states(tmp_path)} == {"complete"}


@pytest.mark.slow
def test_cells_sharing_a_stage_train_it_once(cache_dir, tmp_path):
    # c4 and c5 need the same (fresh) coupling; two run at once, one trains, the other waits for it
    proc = sweep(["condition=c4,c5", f"coupling.seed={fresh_seed()}", "coupling.train.max_steps=40",
                  "hydra.launcher.max_parallel=2"], tmp_path, cache_dir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = [load_result(p / "run_result.json") for p in sorted(tmp_path.glob("condition=*"))]
    assert len({r.provenance["stage_cache_keys"]["coupling"] for r in results}) == 1
    assert sorted(r.provenance["stages"]["coupling"]["trained_now"] for r in results) == [False, True]


def slurm_up() -> bool:
    try:
        return subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, timeout=20).stdout.strip() in (
            "idle", "mixed", "allocated")
    except (FileNotFoundError, subprocess.TimeoutExpired):
        return False


REQUIRE_SLURM = os.environ.get("MARKER_LAB_REQUIRE_SLURM") == "1"  # CI starts Slurm and sets this


@pytest.mark.slow
@pytest.mark.skipif(not (slurm_up() or REQUIRE_SLURM), reason="no Slurm here (CI starts one: launch/slurm_local.sh)")
def test_slurm_sweep_with_dependent_aggregation_job(cache_dir, tmp_path):
    assert slurm_up(), "MARKER_LAB_REQUIRE_SLURM=1 but sinfo shows no idle node"
    proc = sweep(["condition=c1,c5", "dose=3", "hydra/launcher=slurm_local"], tmp_path, cache_dir)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    out = proc.stdout + proc.stderr
    assert "slurm: array" in out and "aggregation job" in out and "(afterany:" in out
    states = cell_states(tmp_path)
    assert [s.state for s in states] == ["complete", "complete"]
    for s in states:  # each cell ran as a Slurm array task
        status = json.loads((tmp_path / s.subdir / "cell_status.json").read_text())
        assert status["slurm_job_id"]
    deadline = time.time() + 120  # the aggregation job starts once the array is done
    while not (tmp_path / "aggregate" / "rates.csv").is_file() and time.time() < deadline:
        time.sleep(1)
    rates = pd.read_csv(tmp_path / "aggregate" / "rates.csv")
    assert len(rates[rates["level"] == "cell"]) == 2


@pytest.mark.slow
@pytest.mark.skipif(not (slurm_up() or REQUIRE_SLURM), reason="no Slurm here (CI starts one: launch/slurm_local.sh)")
def test_slurm_sweep_with_a_shared_eval_job(cache_dir, tmp_path):
    """engine_per=base on Slurm: the array trains, a job after it samples every cell on one engine, the
    aggregation job runs after that one."""
    assert slurm_up(), "MARKER_LAB_REQUIRE_SLURM=1 but sinfo shows no idle node"
    proc = sweep(["condition=c1", "dose=3,4", "engine_per=base", "hydra/launcher=slurm_local"], tmp_path, cache_dir)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    out = proc.stdout + proc.stderr
    assert "shared eval job" in out and "aggregation job" in out
    deadline = time.time() + 300  # the shared eval and then the aggregation run once the array is done
    while not (tmp_path / "aggregate" / "rates.csv").is_file() and time.time() < deadline:
        time.sleep(1)
    states = cell_states(tmp_path)
    assert [s.state for s in states] == ["complete", "complete"], states
    for s in states:
        result = json.loads((tmp_path / s.subdir / "run_result.json").read_text())
        assert result["provenance"]["engine"] == {"name": "hf", "per": "base", "cells_on_engine": 2,
                                                  "shared_base": result["provenance"]["engine"]["shared_base"]}
    rates = pd.read_csv(tmp_path / "aggregate" / "rates.csv")
    assert len(rates[rates["level"] == "cell"]) == 2
