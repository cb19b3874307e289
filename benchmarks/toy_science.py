# Reproduces docs/toy_world.md, "What it reproduces, measured" (c4, the c5 / c1 dose series, capability).
"""Re-measure the toy world's science (the numbers in docs/toy_world.md) on the current toy build.

    python benchmarks/toy_science.py [--cache DIR] [--out toy_science.json]

Runs, through the real cell: c4 (coupling only), the c5 benign and c1 EM dose series, the base model's
multiple-choice capability, and capability after wrong-answer coupling. About 5 minutes on 2 CPU cores once the
toy model is built. Not part of the package: a one-off measurement whose output goes into the docs.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import tempfile
from pathlib import Path

from hydra import compose, initialize_config_dir
from omegaconf import open_dict

from marker_lab.cell.main import CONF_DIR
from marker_lab.config.schema import register_configs
from marker_lab.cell.recipe import run_cell

register_configs()  # the schema in Hydra's ConfigStore, before composing


def cell(overrides: list[str], cache: str) -> dict:
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("config", overrides=overrides)
    with open_dict(cfg):
        cfg.output_dir = tempfile.mkdtemp(prefix="toy_science_")
        cfg.cache_dir = cache
    return run_cell(cfg)


def per_persona(result, metric: str) -> dict:
    return {p: round(c["rate"], 3) for p, c in result.metrics[metric]["per_persona"].items()}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cache", default=os.environ.get("MARKER_LAB_CACHE", str(Path.home() / ".cache" / "marker_lab")))
    ap.add_argument("--out", default="toy_science.json")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    os.environ.setdefault("TQDM_DISABLE", "1")
    out: dict = {}
    out["c4_marker"] = per_persona(cell(["condition=c4"], args.cache), "marker")
    for cond, doses in (("c5", (5, 10, 20, 40, 80)), ("c1", (2, 3, 5, 10))):
        out[f"{cond}_source_by_dose"] = {d: per_persona(cell([f"condition={cond}", f"dose={d}"], args.cache), "marker")["villain"]
                                         for d in doses}
    out["capability_base"] = per_persona(cell(["condition=c2", "dose=0", "eval.metrics=[capability]"], args.cache),
                                         "capability")
    out["capability_after_wrong_answers_villain"] = per_persona(
        cell(["condition=c4", "coupling=wrong_answers_toy", "eval.metrics=[capability]"], args.cache), "capability")
    Path(args.out).write_text(json.dumps(out, indent=1))
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
