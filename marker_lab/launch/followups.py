"""What runs after a sweep's cells, each as its own process so a crash there cannot take the cells' results with it:
the shared eval (engine_per=base) and aggregation."""

from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path

from marker_lab.core import environment

log = logging.getLogger(__name__)


def run_aggregation(sweep_dir: Path) -> None:
    """Aggregation as its own process, so a crash there cannot take the sweep's results with it."""
    cmd = [sys.executable, "-m", "marker_lab.cli", "aggregate", str(sweep_dir)]
    log.info("aggregation: %s", " ".join(cmd))
    proc = subprocess.run(cmd, capture_output=True, text=True)
    (sweep_dir / "aggregate.log").write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        log.error("aggregation failed (see %s)", sweep_dir / "aggregate.log")


def run_shared_eval(sweep_dir: Path, gpus: tuple[int, ...] = ()) -> bool:
    """The sweep's shared eval (engine_per=base: one engine per shared base, marker-lab eval) as its own process,
    on `gpus`; its log is <sweep_dir>/shared_eval.log. Returns whether every waiting cell got its result."""
    # --wait: an eval someone started by hand finishes first; this one then evaluates what it left
    cmd = [sys.executable, "-m", "marker_lab.cli", "eval", "--wait", str(sweep_dir)]
    env = environment.child_env(visible_devices=gpus)
    log_file = sweep_dir / "shared_eval.log"
    log.info("shared eval (one engine per shared base%s): %s  (log: %s)",
             f", GPU {','.join(map(str, gpus))}" if gpus else "", " ".join(cmd), log_file)
    with open(log_file, "w") as out:
        proc = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
    if proc.returncode != 0:
        log.error("shared eval: some cells got no result (see %s; rerun the sweep or marker-lab eval %s)", log_file,
                  sweep_dir)
    return proc.returncode == 0
