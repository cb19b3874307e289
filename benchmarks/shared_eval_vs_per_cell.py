# Reproduces docs/benchmarks.md, "One engine per shared base": on CPU with vLLM, and on one H200 (issue 21).
"""What one engine per shared base saves: the same cells evaluated per cell and on the sweep's shared engine.

    python benchmarks/shared_eval_vs_per_cell.py --out /tmp/mse condition=c1 dose=2,4,6,8 eval.engine.name=vllm

The overrides are one cell's, except that one key may list several values (comma-separated: one cell each).
Each cell is trained once (stages cached) as a sweep job would train it with engine_per=base, then evaluated
(1) on the shared engine (`marker-lab eval`, one process) and (2) per cell (`marker-lab run`, engine_per=cell,
one process per cell as a sweep runs it: load, merge the cached adapters, its own engine). Each arm starts with
an empty torch compile cache of its own (TORCHINDUCTOR_CACHE_DIR), as a fresh machine would. Prints both wall
times and whether the metrics agree (equal for hf).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

from hydra import compose, initialize_config_dir
from omegaconf import open_dict

from marker_lab.cell.main import CONF_DIR
from marker_lab.config.schema import register_configs
from marker_lab.cell.recipe import run_cell

register_configs()  # the schema in Hydra's ConfigStore, before composing


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
    from marker_lab.results.contract import COMPLETIONS_FILE, load_result, read_completions

    grid = cells(args.overrides)
    t0 = time.perf_counter()
    for i, o in enumerate(grid):
        run_cell(config([*o, "engine_per=base"], args.out / "shared" / f"cell{i}"), in_sweep=True)
    train = time.perf_counter() - t0

    def timed(cmd: list[str], arm: str) -> float:
        env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(args.out / f"inductor_{arm}")}
        t = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "marker_lab.cli", *cmd], env=env, capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr[-2000:]
        return time.perf_counter() - t

    shared = timed(["eval", str(args.out / "shared")], "shared")
    per_cell_each = [timed(["run", *o, f"hydra.run.dir={args.out / 'per_cell' / f'cell{i}'}"], "per_cell")
                     for i, o in enumerate(grid)]
    per_cell = sum(per_cell_each)
    rows = []
    for i, o in enumerate(grid):
        a, b = (load_result(args.out / kind / f"cell{i}" / "run_result.json") for kind in ("shared", "per_cell"))
        rates = {p: (a.metrics["marker"]["per_persona"][p]["k"], c["k"])
                 for p, c in b.metrics["marker"]["per_persona"].items()}
        same = None
        if (args.out / "shared" / f"cell{i}" / COMPLETIONS_FILE).is_file():  # eval.save_completions=true
            x, y = (read_completions(args.out / kind / f"cell{i}" / COMPLETIONS_FILE) for kind in ("shared", "per_cell"))
            same = sum(r["completion"] == q["completion"] for r, q in zip(x, y)) / max(1, len(y))
        rows.append({"cell": " ".join(o), "equal_metrics": a.metrics == b.metrics, "marker_k_shared_vs_cell": rates,
                     "identical_completions": same,
                     "shared_eval_s": a.timing.parts["eval.shared"], "per_cell_process_s": round(per_cell_each[i], 1),
                     "per_cell_timing": b.timing.to_json()})
    summary = {"cells": len(grid), "train_and_model_metrics_s": round(train, 1),
               "shared_eval_process_s": round(shared, 1),
               "per_cell_processes_s (load, merge, engine, generate)": round(per_cell, 1),
               "shared_engine_setup_s": rows and load_result(args.out / "shared" / "cell0" / "run_result.json")
               .timing.parts["eval.shared_engine_setup"], "rows": rows}
    (args.out / "summary.json").write_text(json.dumps(summary, indent=1))
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
