"""Timing report of a sweep run through `local_gpus`: wall time, each cell's span and GPU, the GPU busy fraction
(time with a cell running / (wall x GPUs)) and the aggregation's time, as JSON (issue 10's figures).

    python launch/grid_report.py <sweep_dir> <n_gpus> <sweep_start_epoch_s> <sweep_end_epoch_s> [aggregate_s]
"""

from __future__ import annotations

import datetime
import json
import re
import sys
from pathlib import Path


def log_span(run_log: Path) -> tuple[float, float]:
    """(first, last) timestamp of a cell's run.log, as epoch seconds (UTC, the loggers' format)."""
    stamps = [datetime.datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S,%f").replace(tzinfo=datetime.timezone.utc).timestamp()
              for line in run_log.read_text().splitlines() if (m := re.match(r"\[([^\]]+)\]", line))]
    return stamps[0], stamps[-1]


def report(sweep: Path, n_gpus: int, start: float, end: float, aggregate_s: float | None) -> dict:
    cells = []
    for cell in json.loads((sweep / "manifest.json").read_text())["cells"]:
        d = sweep / cell["subdir"]
        if not (d / "run.log").is_file():
            cells.append({"cell": cell["subdir"], "state": "not started"})
            continue
        first, last = log_span(d / "run.log")
        result = json.loads((d / "run_result.json").read_text()) if (d / "run_result.json").is_file() else None
        cells.append({"cell": cell["subdir"], "state": "complete" if result else "incomplete",
                      "start_s": round(first - start, 1), "end_s": round(last - start, 1), "seconds": round(last - first, 1),
                      "device": result and result["provenance"]["device"], "timing": result and result["timing"],
                      "villain_marker": result and result["metrics"]["marker"]["per_persona"]["villain"]["rate"]})
    wall = end - start
    busy = sum(c.get("seconds", 0) for c in cells)
    return {"sweep": str(sweep), "gpus": n_gpus, "wall_s": round(wall, 1), "cells": cells,
            "cell_seconds_sum": round(busy, 1), "gpu_busy_fraction": round(busy / (wall * n_gpus), 3),
            "aggregate_s": aggregate_s}


if __name__ == "__main__":
    a = sys.argv[1:]
    print(json.dumps(report(Path(a[0]), int(a[1]), float(a[2]), float(a[3]), float(a[4]) if len(a) > 4 else None), indent=1))
