"""Ctrl-C, sent for real (SIGINT to the command's process group, as a terminal does) to a single run and to a sweep:
one line, exit code 130, no traceback, `cell_status.json` says `interrupted` with the phase, and rerunning the same
command resumes and completes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from marker_lab.results.contract import RESULT_FILE, STATUS_FILE
from marker_lab.results.sweep import format_status


def _command(args: list[str], cache: Path) -> tuple[list[str], dict]:
    env = {**os.environ, "MARKER_LAB_CACHE": str(cache), "TQDM_DISABLE": "1"}
    env.pop("HYDRA_FULL_ERROR", None)
    return [sys.executable, "-m", "marker_lab.cli", *args], env


def _cell_args() -> list[str]:
    seed = 7000 + time.time_ns() % 10**6  # a coupling nobody cached: the cell trains a while, to be interrupted
    return ["condition=c4", f"coupling.seed={seed}", "coupling.train.max_steps=60", "persona_set.eval_personas=[villain]",
            "eval.generation.samples_per_question=1", "eval.generation.max_tokens=16"]


def _wait_for_phase(status_files, phase: str, proc: subprocess.Popen, timeout: float = 300) -> Path:
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert proc.poll() is None, "the command ended before it could be interrupted"
        for f in status_files():
            try:
                if json.loads(f.read_text()).get("phase") == phase:
                    return f
            except (json.JSONDecodeError, OSError):  # being replaced
                pass
        time.sleep(0.1)
    raise AssertionError(f"no cell reached phase {phase}")


def _ctrl_c(proc: subprocess.Popen) -> tuple[int, str]:
    time.sleep(1.0)  # well inside the phase
    os.killpg(proc.pid, signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    return proc.returncode, err


@pytest.mark.slow
def test_ctrl_c_on_a_single_run(cache_dir, tmp_path):
    run_dir = tmp_path / "run"
    cmd, env = _command(["run", *_cell_args(), f"hydra.run.dir={run_dir}"], cache_dir)
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    _wait_for_phase(lambda: [run_dir / STATUS_FILE] if (run_dir / STATUS_FILE).is_file() else [], "coupling", proc)
    rc, err = _ctrl_c(proc)
    assert rc == 130, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    last = err.strip().splitlines()[-1]
    assert last.startswith("marker-lab: interrupted: cell ") and "during the coupling stage" in last, last
    assert "rerun the same command to resume" in last
    status = json.loads((run_dir / STATUS_FILE).read_text())
    assert status["state"] == "interrupted" and status["phase"] == "coupling"
    assert not (run_dir / RESULT_FILE).exists()

    again = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert again.returncode == 0, again.stderr[-3000:]
    assert (run_dir / RESULT_FILE).is_file()
    assert json.loads((run_dir / STATUS_FILE).read_text())["state"] == "complete"


@pytest.mark.slow
def test_ctrl_c_on_a_sweep(cache_dir, tmp_path):
    sweep = tmp_path / "sweep"
    cmd, env = _command(["run", "-m", *_cell_args(), "seed=1,2", f"hydra.sweep.dir={sweep}",
                         "hydra.launcher.max_parallel=1"], cache_dir)
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    stopped = _wait_for_phase(lambda: list(sweep.glob(f"*/{STATUS_FILE}")), "coupling", proc)
    rc, err = _ctrl_c(proc)
    assert rc == 130, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    last = err.strip().splitlines()[-1]
    assert last.startswith(f"marker-lab: interrupted: sweep {sweep}: 0 of 2 cells complete"), last
    assert f"interrupted: {stopped.parent.name}" in last and "rerun the same command to resume" in last
    status = json.loads(stopped.read_text())
    assert status["state"] == "interrupted" and status["phase"] == "coupling"
    shown = format_status(sweep)
    assert "1 interrupted" in shown and "stopped by Ctrl-C during coupling" in shown

    again = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "2 complete" in format_status(sweep)
