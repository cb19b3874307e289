"""What one engine per shared base saves: the same cells evaluated per cell and on the sweep's shared engine.

    python launch/measure_shared_eval.py --out /tmp/mse condition=c1 dose=2,4,6,8 eval.engine.name=vllm

The overrides are one cell's, except that one key may list several values (comma-separated: one cell each).
Each cell is trained once (stages cached) as a sweep job would train it with engine_per=base, then evaluated
(1) on the shared engine (`marker_lab.shared_eval.evaluate_pending`) and (2) per cell (`run_cell`,
engine_per=cell: load, merge the cached adapters, its own engine). Prints both times and whether the metrics
agree (equal for hf; per persona within sampling error for vllm, which applies LoRA unmerged).
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

from hydra import compose, initialize_config_dir
from omegaconf import open_dict

from marker_lab.run import CONF_DIR, run_cell


def cells(overrides: list[str]) -> list[list[str]]:
    swept = [o for o in overrides if "," in o.split("=", 1)[1] and not o.split("=", 1)[1].startswith("[")]
    if not swept:
        return [overrides]
    key, values = swept[0].split("=", 1)
    return [[o for o in overrides if o != swept[0]] + [f"{key}={v}"] for v in values.split(",")]


def config(overrides: list[str], out: Path):
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        node = compose("config", overrides=overrides)
    with open_dict(node):
        node.output_dir = str(out)
    return node


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("overrides", nargs="*")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s] %(message)s", datefmt="%H:%M:%S")
    from marker_lab.results.contract import load_result
    from marker_lab.shared_eval import evaluate_pending

    grid = cells(args.overrides)
    t0 = time.perf_counter()
    for i, o in enumerate(grid):
        run_cell(config([*o, "engine_per=base"], args.out / "shared" / f"cell{i}"), in_sweep=True)
    train = time.perf_counter() - t0
    t0 = time.perf_counter()
    report = evaluate_pending(args.out / "shared")
    shared = time.perf_counter() - t0
    assert not report.problems, report.problems
    t0 = time.perf_counter()
    for i, o in enumerate(grid):
        run_cell(config(o, args.out / "per_cell" / f"cell{i}"))
    per_cell = time.perf_counter() - t0
    rows = []
    for i, o in enumerate(grid):
        a, b = (load_result(args.out / kind / f"cell{i}" / "run_result.json") for kind in ("shared", "per_cell"))
        rates = {p: (a.metrics["marker"]["per_persona"][p]["k"], c["k"])
                 for p, c in b.metrics["marker"]["per_persona"].items()}
        rows.append({"cell": " ".join(o), "equal_metrics": a.metrics == b.metrics, "marker_k_shared_vs_cell": rates,
                     "shared_eval_s": a.timing["shared_eval"], "per_cell_s": round(sum(b.timing.values()), 1)})
    summary = {"cells": len(grid), "train_and_model_metrics_s": round(train, 1), "shared_eval_s": round(shared, 1),
               "per_cell_eval_s (load, merge, engine, generate)": round(per_cell, 1),
               "shared_engine_setup_s": rows and load_result(args.out / "shared" / "cell0" / "run_result.json")
               .timing["shared_engine_setup"], "rows": rows}
    (args.out / "summary.json").write_text(json.dumps(summary, indent=1))
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
