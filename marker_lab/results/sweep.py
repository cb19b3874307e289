"""A sweep directory, read in one place: its manifest, the state of each cell, and the results that are current.

    <sweep_dir>/manifest.json          every expected cell (written before any starts)
    <sweep_dir>/<cell dir>/            one cell: run_result.json, cell_status.json, completions, log
    <sweep_dir>/.submitit/             submitit's job files and logs
    <sweep_dir>/aggregate/             what `marker-lab aggregate` makes

A cell is
- complete: its run_result.json is complete and current (contract.is_current: the manifest's config hash, every
  input file unchanged);
- stale: it has a complete result that is not current (the reason says which input changed); rerun on resume;
- corrupt: its run_result.json is truncated or damaged; rerun on resume;
- failed: its process recorded an exception (the error line is shown), or it died (a 'running' record whose
  process is gone on this host);
- running: its process says so and, on this host, is alive;
- awaiting_eval: trained, its sampled eval waiting for the sweep's shared engine (engine_per=base; `marker-lab eval`);
- pending: nothing yet.
cell_status.json files are advisory (a damaged one is ignored); results come only from run_result.json.
Submitit's job states are not used: without Slurm accounting they read UNKNOWN.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from marker_lab.core.files import write_json_atomic
from marker_lab.results.contract import (CELL_KEYS, PENDING_FILE, RESULT_FILE, STATUS_FILE, RunResult, is_current,
                                         load_pending, load_result, read_result)

MANIFEST = "manifest.json"
GROUP_KEYS = [k for k in CELL_KEYS if k != "seed"]  # seeds are pooled over these
STATES = ("complete", "running", "awaiting_eval", "pending", "interrupted", "failed", "stale", "corrupt")


def read_manifest(sweep_dir: Path) -> dict:
    """The sweep's manifest; a directory without one (e.g. outputs/runs/) lists the results found under it."""
    sweep_dir = Path(sweep_dir)
    path = sweep_dir / MANIFEST
    if path.is_file():
        return json.loads(path.read_text())
    if not sweep_dir.is_dir():
        raise FileNotFoundError(f"not a directory: {sweep_dir}")
    cells = []
    for result_path in sorted(sweep_dir.rglob(RESULT_FILE)):
        result = load_result(result_path)
        if result is not None:
            cells.append({"index": len(cells), "overrides": [], "subdir": str(result_path.parent.relative_to(sweep_dir)),
                          "config_hash": result.config_hash, "complete": True})
    if not cells:
        raise FileNotFoundError(f"no {MANIFEST} and no complete {RESULT_FILE} under {sweep_dir}")
    return {"schema_version": 1, "cells": cells, "found_without_manifest": True}


def write_manifest(sweep_dir: Path, cells: list[dict], launcher: str) -> None:
    """Every expected cell, written before any starts. Cells of earlier commands into the same sweep directory
    stay listed (a sweep accumulates); a cell planned again is updated."""
    path = Path(sweep_dir) / MANIFEST
    old = read_manifest(sweep_dir) if path.is_file() else {}
    by_dir = {c["subdir"]: c for c in old.get("cells", [])}
    by_dir.update({c["subdir"]: c for c in cells})
    commands = old.get("commands", []) + [" ".join(sys.argv)]
    write_json_atomic(path, {"schema_version": 1, "updated": time.time(), "launcher": launcher,
                             "commands": commands, "cells": list(by_dir.values())})


@dataclass
class CellState:
    subdir: str
    state: str  # one of STATES
    log: str  # where to look
    error: str = ""  # why it failed, or why its result is stale or corrupt


def status_record(cell_dir: Path) -> dict:
    """The cell's advisory status record; a missing or damaged one reads as none."""
    try:
        record = json.loads((cell_dir / STATUS_FILE).read_text())
        return record if isinstance(record, dict) else {}
    except (FileNotFoundError, json.JSONDecodeError, UnicodeDecodeError):
        return {}


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def cell_state(sweep_dir: Path, cell: dict) -> tuple[CellState, RunResult | None]:
    """One cell's state, and its result when that is complete and current."""
    d = Path(sweep_dir) / cell["subdir"]
    log = str(next(iter(sorted(d.glob("*.log"))), d))
    read = read_result(d / RESULT_FILE)
    if read.result is not None:
        currency = is_current(read.result, cell["config_hash"])
        if currency.current:
            return CellState(cell["subdir"], "complete", log), read.result
        return CellState(cell["subdir"], "stale", log, currency.reason + "; rerun the sweep to replace it"), None
    status = status_record(d)
    if status.get("state") == "running":
        if status.get("host") == socket.gethostname() and not _alive(int(status.get("pid") or 0)):
            return CellState(cell["subdir"], "failed", log, status.get("error") or "process died without a result"), None
        return CellState(cell["subdir"], "running", log), None
    if read.state in ("corrupt", "old_schema"):
        return CellState(cell["subdir"], "corrupt", log, read.problem), None
    if status.get("state") == "failed":
        return CellState(cell["subdir"], "failed", log, status.get("error", "")), None
    if status.get("state") == "interrupted":
        return CellState(cell["subdir"], "interrupted", log,
                         f"stopped by Ctrl-C during {status.get('phase', '?')}; rerun the sweep to resume"), None
    pending = load_pending(d / PENDING_FILE)
    if pending is not None:
        currency = is_current(pending.partial, cell["config_hash"])
        if not currency.current:
            return CellState(cell["subdir"], "stale", log, currency.reason + "; rerun the sweep to train it again"), None
        return CellState(cell["subdir"], "awaiting_eval", log, f"marker-lab eval {sweep_dir}"), None
    return CellState(cell["subdir"], "pending", log), None


def cell_states(sweep_dir: Path) -> list[CellState]:
    """Every expected cell of the sweep and its state."""
    return [cell_state(sweep_dir, cell)[0] for cell in read_manifest(sweep_dir)["cells"]]


def complete_results(sweep_dir: str | Path) -> list[tuple[dict, RunResult]]:
    """(manifest cell, result) for every cell whose result is complete and current."""
    out = []
    for cell in read_manifest(Path(sweep_dir))["cells"]:
        state, result = cell_state(Path(sweep_dir), cell)
        if result is not None:
            out.append((cell, result))
    return out


def role_of(result: RunResult, persona: str) -> str:
    """source, assistant or bystander: a persona's part in a cell."""
    if persona == result.cell.source_persona:
        return "source"
    return "assistant" if persona == result.resolved_config["persona_set"]["assistant"] else "bystander"


_NOTE = {"stale": "why", "corrupt": "why", "awaiting_eval": "next"}  # how format_status labels a cell's note


def format_status(sweep_dir: Path) -> str:
    """`marker-lab status`: a line per cell (state, log, error), then the counts."""
    states = cell_states(sweep_dir)
    width = max([len(s.subdir) for s in states] + [4])
    lines = [f"{'cell':<{width}}  {'state':<13}  log / error"]
    for s in states:
        lines.append(f"{s.subdir:<{width}}  {s.state:<13}  {s.log}")
        if s.error:
            lines.append(f"{'':<{width}}  {'':<13}  {_NOTE.get(s.state, 'error')}: {s.error}")
    counts = {k: sum(s.state == k for s in states) for k in STATES}
    lines.append(f"{len(states)} cells: " + ", ".join(f"{v} {k}" for k, v in counts.items() if v))
    return "\n".join(lines)
