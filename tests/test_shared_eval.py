"""engine_per=base: a sweep's cells train, then one engine per shared base samples for all of them
(marker_lab/cell/shared.py). The results must be the per-cell eval's, number for number; the job must resume
after a kill, and refuse stale or damaged cells."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import compose_cfg
from marker_lab.core.cache import CHECKSUMS
from marker_lab.core.files import resolve_path
from marker_lab.results import contract
from marker_lab.results.contract import load_pending, load_result
from marker_lab.results.sweep import format_status, status_record, write_manifest
from marker_lab.cell.recipe import run_cell

FAST_EVAL = ["persona_set.eval_personas=[villain,assistant]"]  # 2 x 28 x 10 completions
CLI = [sys.executable, "-m", "marker_lab.cli"]


def _same_result(shared, per_cell) -> None:
    """Everything a per-cell eval records, except where the two runs differ by construction: their output
    directory and engine_per in the config, whether a stage was trained in this process, the times, and the
    engine record (per: base vs cell)."""
    assert shared.metrics == per_cell.metrics
    assert shared.cell == per_cell.cell
    assert shared.config_hash == per_cell.config_hash
    skip = {"resolved_config", "stages", "engine"}
    assert {k: v for k, v in shared.provenance.items() if k not in skip} == \
        {k: v for k, v in per_cell.provenance.items() if k not in skip}
    strip = lambda c: {k: v for k, v in c.items() if k not in ("output_dir", "engine_per")}  # noqa: E731
    assert strip(shared.resolved_config) == strip(per_cell.resolved_config)
    assert shared.provenance["engine"]["per"] == "base" and per_cell.provenance["engine"]["per"] == "cell"


@pytest.mark.slow
def test_a_sweep_on_one_engine_gives_the_per_cell_numbers(cache_dir, tmp_path):
    """Through the CLI: a 3-cell sweep (two doses share the coupled model, c4 has the base model) with
    engine_per=base; the launcher runs the shared eval; each result equals a per-cell run of the same cell."""
    sweep = tmp_path / "sweep"
    proc = subprocess.run([*CLI, "run", "-m", "condition=c1", "dose=3,6", "engine_per=base", *FAST_EVAL,
                           f"hydra.sweep.dir={sweep}", "hydra.launcher.max_parallel=1"],
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "shared eval" in proc.stderr + proc.stdout
    assert "2 cells evaluated" in (sweep / "shared_eval.log").read_text()
    assert "2 complete" in format_status(sweep)
    results = {}
    for cell_dir in sorted(p.parent for p in sweep.rglob(contract.RESULT_FILE)):
        results[load_result(cell_dir / contract.RESULT_FILE).cell.dose] = load_result(cell_dir / contract.RESULT_FILE)
        assert not (cell_dir / contract.PENDING_FILE).exists()
    assert sorted(results) == [3, 6]
    for dose, shared in results.items():
        assert shared.provenance["engine"]["cells_on_engine"] == 2
        # the shared sampling is inside the cell's eval: the cell's time counts it once
        assert 0 < shared.timing.parts["eval.shared"] <= shared.timing.phases["eval"]
        assert contract.cell_seconds(shared) == pytest.approx(sum(shared.timing.phases.values()))
        per_cell = run_cell(compose_cfg(["condition=c1", f"dose={dose}", *FAST_EVAL], tmp_path / f"cell{dose}",
                                        cache_dir))
        _same_result(shared, per_cell)
    assert (sweep / "aggregate" / "report.md").is_file()


def _trained(cache_dir, root: Path, name: str, overrides: list[str]) -> Path:
    """A cell trained as a sweep job with engine_per=base would be: its pending eval written, no result."""
    out = run_cell(compose_cfg(["engine_per=base", *FAST_EVAL, *overrides], root / name, cache_dir), in_sweep=True)
    assert isinstance(out, contract.PendingEval) and not (root / name / contract.RESULT_FILE).exists()
    return root / name


@pytest.mark.slow
def test_the_shared_eval_resumes_after_a_kill_and_refuses_stale_cells(cache_dir, tmp_path):
    root = tmp_path / "sweep"
    questions = tmp_path / "questions.yaml"
    shutil.copy(resolve_path(compose_cfg([]).eval.questions), questions)
    cells = [_trained(cache_dir, root, f"d{d}", ["condition=c1", f"dose={d}"]) for d in (2, 4, 7)]
    edited = _trained(cache_dir, root, "edited", ["condition=c1", "dose=2", f"eval.questions={questions}"])
    questions.write_text(questions.read_text() + "\n# edited after training\n")  # the input changes

    # a pending cell that is still current is not trained again by a rerun of its job
    again = run_cell(compose_cfg(["engine_per=base", *FAST_EVAL, "condition=c1", "dose=2"], cells[0], cache_dir),
                     in_sweep=True)
    assert isinstance(again, contract.PendingEval) and again.partial.timing == load_pending(
        cells[0] / contract.PENDING_FILE).partial.timing

    # marker-lab status reads a trained cell as waiting for the shared eval and says what runs next; the edited
    # one is stale
    write_manifest(root, [{"index": i, "overrides": [], "subdir": c.name, "complete": False,
                           "config_hash": load_pending(c / contract.PENDING_FILE).partial.config_hash}
                          for i, c in enumerate([*cells, edited])], "local")
    status = format_status(root)
    assert "3 awaiting_eval" in status and "1 stale" in status and f"next: marker-lab eval {root}" in status

    job = subprocess.Popen([*CLI, "eval", str(root)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 300
    while not any((c / contract.RESULT_FILE).exists() for c in cells) and job.poll() is None:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    os.kill(job.pid, signal.SIGKILL)
    job.wait()
    done = [c for c in cells if (c / contract.RESULT_FILE).exists()]
    assert 1 <= len(done) < len(cells), "the kill landed after the first cell's result and before the last"
    for c in cells:  # every cell has exactly one of: a complete result, a pending eval
        assert (load_result(c / contract.RESULT_FILE) is not None) != (c / contract.PENDING_FILE).exists()
    first = {c: (c / contract.RESULT_FILE).stat().st_mtime_ns for c in done}

    proc = subprocess.run([*CLI, "eval", str(root)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 1  # the stale cell is not evaluated
    assert f"{len(cells) - len(done)} cells evaluated" in proc.stdout
    assert "stale (input eval.questions changed" in proc.stderr and str(edited) in proc.stderr
    assert all(load_result(c / contract.RESULT_FILE) is not None for c in cells)
    assert {c: (c / contract.RESULT_FILE).stat().st_mtime_ns for c in done} == first  # not redone
    assert not (edited / contract.RESULT_FILE).exists()

    # the numbers are the per-cell eval's
    per_cell = run_cell(compose_cfg([*FAST_EVAL, "condition=c1", "dose=7"], tmp_path / "cell7", cache_dir))
    _same_result(load_result(cells[2] / contract.RESULT_FILE), per_cell)


@pytest.mark.slow
def test_a_damaged_adapter_drops_the_cell_back_to_training(cache_dir, tmp_path):
    """A cached adapter altered after its cell trained: the shared eval refuses it in one line and drops the
    pending record, so rerunning the sweep trains the cell again (the cache rebuilds the damaged entry)."""
    cache = tmp_path / "cache"  # its own cache (the toy model ships): the damage must not reach other tests
    cell = _trained(cache, tmp_path / "sweep", "c4", ["condition=c4"])
    adapter = Path(load_pending(cell / contract.PENDING_FILE).last.path)
    weights = adapter / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])  # truncated
    assert (Path(load_pending(cell / contract.PENDING_FILE).last.entry) / CHECKSUMS).is_file()
    proc = subprocess.run([*CLI, "eval", str(tmp_path / "sweep")], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 1
    assert "is damaged" in proc.stderr and "rerun the sweep" in proc.stderr
    assert not (cell / contract.PENDING_FILE).exists() and not (cell / contract.RESULT_FILE).exists()
    assert status_record(cell)["state"] == "failed"


@pytest.mark.slow
def test_an_unreachable_judge_fails_only_the_cells_that_need_it(cache_dir, tmp_path, monkeypatch, dropping_endpoint):
    """Three cells on one engine: two score alignment with a judge whose endpoint drops every connection, one
    scores the marker only. The marker cell gets its result; each judged cell fails in one line naming the endpoint
    and keeps its pending record, so `marker-lab eval` can retry it; and the endpoint is asked once in all: the
    first judged cell's queued requests are cancelled, and the second judged cell is not sent there again."""
    url, accepted = dropping_endpoint
    monkeypatch.setenv("FAULT_KEY", "k")
    judged = ["eval.metrics=[marker,alignment]", "judge=openai", f"judge.base_url={url}",
              "judge.api_key_env=FAULT_KEY", "judge.max_retries=0", "judge.timeout_s=5", "judge.concurrency=1"]
    root = tmp_path / "sweep"
    a = _trained(cache_dir, root, "a_judged", ["condition=c1", "dose=2", *judged])
    b = _trained(cache_dir, root, "b_judged", ["condition=c1", "dose=4", *judged])
    c = _trained(cache_dir, root, "c_marker", ["condition=c1", "dose=2"])
    proc = subprocess.run([*CLI, "eval", str(root)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert load_result(c / contract.RESULT_FILE) is not None and not (c / contract.PENDING_FILE).exists()
    lines = [ln for ln in proc.stderr.splitlines() if "cannot connect" in ln]
    assert [ln.split(": ")[0].strip() for ln in lines] == [str(a), str(b)], proc.stderr[-3000:]
    assert all(f"openai judge at {url}: cannot connect after 0 retries" in ln for ln in lines)
    for cell in (a, b):
        assert (cell / contract.PENDING_FILE).exists() and not (cell / contract.RESULT_FILE).exists()
    # of 560 requests: the one that failed and at most the one the single worker had already taken up; none for
    # the second judged cell (without the judge's memory of it, it sends as many again)
    assert 1 <= len(accepted) <= 2


@pytest.mark.slow
def test_two_evals_on_one_sweep(cache_dir, tmp_path):
    """A second `marker-lab eval` on a sweep whose shared eval is running stops at once naming the holder; with
    --wait (what a sweep's launcher runs) it waits, then evaluates what is left. The holder here is this test."""
    from marker_lab.launch.lock import EVAL_LOCK_FILE, SweepLock

    root = tmp_path / "sweep"
    cells = [_trained(cache_dir, root, f"d{d}", ["condition=c1", f"dose={d}"]) for d in (2, 4)]
    with SweepLock(root, EVAL_LOCK_FILE):
        second = subprocess.run([*CLI, "eval", str(root)], capture_output=True, text=True, timeout=120)
        assert second.returncode != 0
        line = second.stderr.strip().splitlines()[-1]
        assert line.startswith(f"marker-lab eval: the shared eval of {root} is in use by pid {os.getpid()} on "
                               f"{socket.gethostname()} since ") and line.endswith("wait for it to end or stop it")
        assert all((c / contract.PENDING_FILE).exists() and not (c / contract.RESULT_FILE).exists() for c in cells)
        waiting = subprocess.Popen([*CLI, "eval", "--wait", str(root)], stdout=subprocess.PIPE,
                                   stderr=subprocess.STDOUT, text=True)
        first = waiting.stdout.readline()  # the lock is its first step: it says it waits, then blocks
        assert "a shared eval of" in first and f"pid {os.getpid()}" in first and "waiting for it to end" in first
        time.sleep(3)
        assert waiting.poll() is None and not any((c / contract.RESULT_FILE).exists() for c in cells)
    out, _ = waiting.communicate(timeout=300)
    assert waiting.returncode == 0, out[-3000:]
    assert "2 cells evaluated" in out
    assert all(load_result(c / contract.RESULT_FILE) is not None for c in cells)


def test_engine_per_base_needs_merged_stages(tmp_path):
    proc = subprocess.run([*CLI, "run", "engine_per=base", "merge_between_stages=false",
                           f"hydra.run.dir={tmp_path / 'run'}"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2  # a config error
    assert proc.stderr.strip().splitlines()[-1].startswith("marker-lab: config error: engine_per=base with "
                                                           "merge_between_stages=false")
