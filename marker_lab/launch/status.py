"""`marker-lab status <sweep_dir>`: every expected cell of a sweep, from the cells' own files.

Submitit's job states are not used: without Slurm accounting they read UNKNOWN. A cell is
- complete: its run_result.json is complete and carries the manifest's config hash;
- failed: its process recorded an exception (the error line is shown), or it died (a 'running' record whose
  process is gone on this host);
- running: its process says so and, on this host, is alive;
- pending: nothing yet.
"""

from __future__ import annotations

import json
import os
import socket
from dataclasses import dataclass
from pathlib import Path

from marker_lab.launch.cells import read_manifest
from marker_lab.results import contract


@dataclass
class CellState:
    subdir: str
    state: str  # pending | running | complete | failed | stale (a result of another config)
    log: str  # where to look
    error: str = ""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def cell_states(sweep_dir: Path) -> list[CellState]:
    sweep_dir = Path(sweep_dir)
    out = []
    for cell in read_manifest(sweep_dir)["cells"]:
        d = sweep_dir / cell["subdir"]
        log = str(next(iter(sorted(d.glob("*.log"))), d))
        result = contract.load_result(d / contract.RESULT_FILE)
        status = {}
        if (d / contract.STATUS_FILE).is_file():
            status = json.loads((d / contract.STATUS_FILE).read_text())
        if result is not None:
            ok = result["provenance"]["config_hash"] == cell["config_hash"]
            out.append(CellState(cell["subdir"], "complete" if ok else "stale", log,
                                 "" if ok else "result is from another config; rerun the sweep to replace it"))
        elif status.get("state") == "failed":
            out.append(CellState(cell["subdir"], "failed", log, status.get("error", "")))
        elif status.get("state") == "running":
            if status.get("host") == socket.gethostname() and not _alive(int(status.get("pid", 0))):
                out.append(CellState(cell["subdir"], "failed", log, "process died without a result (killed?)"))
            else:
                out.append(CellState(cell["subdir"], "running", log))
        else:
            out.append(CellState(cell["subdir"], "pending", log))
    return out


def format_status(sweep_dir: Path) -> str:
    states = cell_states(sweep_dir)
    width = max([len(s.subdir) for s in states] + [4])
    lines = [f"{'cell':<{width}}  {'state':<8}  log / error"]
    for s in states:
        lines.append(f"{s.subdir:<{width}}  {s.state:<8}  {s.log}")
        if s.error:
            lines.append(f"{'':<{width}}  {'':<8}  error: {s.error}")
    counts = {k: sum(s.state == k for s in states) for k in ("complete", "running", "pending", "failed", "stale")}
    lines.append(f"{len(states)} cells: " + ", ".join(f"{v} {k}" for k, v in counts.items() if v))
    return "\n".join(lines)
