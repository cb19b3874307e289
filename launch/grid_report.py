"""Timing report of a sweep run through `local_gpus`, from the launcher's own log lines (a cell's start on its
GPU, and "done / failed after N s"): wall time, each cell's span and GPU, the GPU busy fraction (time with a cell
running, in GPU-seconds / (wall x GPUs); a cell cut off by a time limit counts until the end) and the aggregation's time, as JSON (issue 10's figures).

    python launch/grid_report.py <sweep_log> <sweep_dir> <n_gpus> <wall_s> [aggregate_s]
"""

from __future__ import annotations

import datetime
import json
import re
import sys
from pathlib import Path

STAMP = r"\[(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+)\]"
START = re.compile(STAMP + r".*\t#(\d+) on (GPU [\d,]+|CPU): (.*) \(pid")
END = re.compile(STAMP + r".*#(\d+) (?:done|failed) on (?:GPU [\d,]+|CPU) after ([\d.]+) s")


def _t(stamp: str) -> float:
    return datetime.datetime.strptime(stamp, "%Y-%m-%d %H:%M:%S,%f").timestamp()


def report(sweep_log: Path, sweep: Path, n_gpus: int, wall: float, aggregate_s: float | None) -> dict:
    cells, first = {}, None
    for line in sweep_log.read_text(errors="replace").splitlines():
        if m := START.match(line):
            first = first if first is not None else _t(m.group(1))
            cells[m.group(2)] = {"cell": m.group(4), "where": m.group(3), "start_s": round(_t(m.group(1)) - first, 1),
                                 "gpus": len(m.group(3).split(",")) if m.group(3).startswith("GPU") else 1}
        elif (m := END.match(line)) and m.group(2) in cells:
            cells[m.group(2)].update(seconds=float(m.group(3)), failed="failed" in line)
    for c in cells.values():  # cut off by a time limit: busy until the end of the sweep
        if "seconds" not in c:
            c.update(seconds=round(wall - c["start_s"], 1), unfinished=True)
    subdirs = {str(c["index"]): c["subdir"] for c in json.loads((sweep / "manifest.json").read_text())["cells"]}
    for index, c in cells.items():
        result = sweep / subdirs[index] / "run_result.json"
        if result.is_file():
            r = json.loads(result.read_text())
            source = r["metrics"].get("marker", {}).get("per_persona", {}).get(r["cell"]["source_persona"], {})
            c.update(timing=r["timing"], source_marker=source.get("rate"))
    busy = sum(c["seconds"] * c["gpus"] for c in cells.values())  # GPU-seconds
    return {"sweep": str(sweep), "gpus": n_gpus, "wall_s": wall, "cells": list(cells.values()),
            "cell_seconds_sum": round(busy, 1), "gpu_busy_fraction": round(busy / (wall * n_gpus), 3) if wall else None,
            "aggregate_s": aggregate_s}


if __name__ == "__main__":
    a = sys.argv[1:]
    print(json.dumps(report(Path(a[0]), Path(a[1]), int(a[2]), float(a[3]), float(a[4]) if len(a) > 4 else None), indent=1))
