"""Time `marker-lab aggregate` on a large sweep: N result files made from one real result.

    python -m marker_lab.bench.aggregate <a run_result.json> [N=10000]

The copies vary condition, dose and seed (5 conditions x N/500 doses x 100 seeds) with counts redrawn per
copy; the timing is what matters, not the numbers. Prints the seconds for load_sweep and for the whole
aggregation (tables, comparisons, gates, figures, report).
"""

from __future__ import annotations

import copy
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from marker_lab.results.sweep import MANIFEST
from marker_lab.results.aggregate import aggregate, load_sweep


def make_sweep(template: dict, n: int, root: Path) -> None:
    rng = np.random.default_rng(0)
    cells = []
    doses = max(1, n // 500)
    for i in range(n):
        cond, dose, seed = ["c1", "c2", "c3", "c4", "c5"][i % 5], (i // 5) % doses + 1, i // (5 * doses)
        r = copy.deepcopy(template)
        r["cell"].update(condition=cond, dose=dose, seed=seed, second_stage="em" if cond != "c5" else "benign")
        for c in r["metrics"]["marker"]["per_persona"].values():
            c["k"] = int(rng.binomial(c["n"], 0.5))
            c["rate"] = c["k"] / c["n"]
        sub = f"condition={cond},dose={dose},seed={seed}"
        (root / sub).mkdir(parents=True)
        (root / sub / "run_result.json").write_text(json.dumps(r))
        cells.append({"index": i, "overrides": [], "subdir": sub, "config_hash": r["provenance"]["config_hash"],
                      "complete": True})
    (root / MANIFEST).write_text(json.dumps({"schema_version": 1, "cells": cells}))


def main() -> None:
    template = json.loads(Path(sys.argv[1]).read_text())
    n = int(sys.argv[2]) if len(sys.argv) > 2 else 10_000
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        make_sweep(template, n, root)
        t0 = time.perf_counter()
        df = load_sweep(root)
        t1 = time.perf_counter()
        aggregate(root)
        t2 = time.perf_counter()
    print(f"{n} result files, {len(df)} rows: load_sweep {t1 - t0:.1f} s, whole aggregation {t2 - t0:.1f} s")


if __name__ == "__main__":
    main()
