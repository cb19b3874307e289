"""Ctrl-C during a local sweep: the cells hear it and record where they stopped; the sweep waits for them and ends
with one line naming them (exit code 130)."""

from __future__ import annotations

import os
import signal
import sys
import time
from contextlib import contextmanager
from pathlib import Path

from marker_lab.launch.sweep_plan import PlannedCell
from marker_lab.results.contract import RESULT_FILE, load_result


@contextmanager
def ignoring_sigint():
    """Processes started inside inherit SIGINT ignored: submitit's local controller then sits out a Ctrl-C (it would
    print its own traceback and SIGKILL the cell a second later) while the cell, which installs Python's handler
    again (run.cell_main), records where it stopped."""
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def stop_after_interrupt(sweep_dir: Path, plans: list[PlannedCell], running: list) -> None:
    """Ctrl-C during a sweep: the running cells got the same SIGINT from the terminal (it goes to the whole
    foreground process group) and record where they stopped; they get 30 s for it, then their controllers are
    sent SIGTERM (which they pass on). The sweep ends with one line naming them (exit 130); finished cells stay
    finished, and rerunning the same command resumes."""
    deadline = time.monotonic() + 30
    while any(not job.done() for job, *_ in running) and time.monotonic() < deadline:
        time.sleep(0.2)
    for job, *_ in running:
        if not job.done():  # Ctrl-C reached the launcher only (kill -INT <pid>): stop the cell all the same
            try:
                os.kill(int(job.job_id), signal.SIGTERM)  # a local job's id is its controller's pid
            except (OSError, ValueError):
                pass
    stopped = [plan.subdir for _, plan, *_ in running]
    done = sum(1 for pl in plans if load_result(sweep_dir / pl.subdir / RESULT_FILE) is not None)
    print(f"marker-lab: interrupted: sweep {sweep_dir}: {done} of {len(plans)} cells complete"
          + (f"; interrupted: {', '.join(stopped)}" if stopped else "")
          + "; rerun the same command to resume", file=sys.stderr, flush=True)
    raise SystemExit(130)
