# Reproduces docs/benchmarks.md, "A newcomer's first hour", the row "the same rebuild on another machine".
"""How far a fresh build of the toy model is from the shipped one: rebuild with the project's script (optionally
another seed) and print each tensor's relative difference (docs/benchmarks.md; tests/test_engines.py bounds it).

    python benchmarks/toy_rebuild_diff.py           # the default settings: float rounding only (2.1e-3 at most seen)
    python benchmarks/toy_rebuild_diff.py --seed 1  # the same recipe from another seed, for scale
"""

import argparse
import dataclasses
import tempfile
import time
from pathlib import Path

from safetensors.torch import load_file

from marker_lab.config.schema import ModelConfig
from marker_lab.core.cache import StageCache
from marker_lab.models import toy_model_dir
from marker_lab.train.toy_pretrain import build_toy_model

parser = argparse.ArgumentParser()
parser.add_argument("--seed", type=int, default=None, help="pretraining seed (default: the shipped build's)")
args = parser.parse_args()
out = Path(tempfile.mkdtemp())
shipped, _ = toy_model_dir(ModelConfig(), StageCache(out / "cache"))
toy = ModelConfig().toy if args.seed is None else dataclasses.replace(ModelConfig().toy, seed=args.seed)
t0 = time.perf_counter()
build_toy_model(toy, out / "rebuilt")
print(f"rebuilt in {time.perf_counter() - t0:.0f} s")
print("tokenizer.json identical:", (shipped / "tokenizer.json").read_bytes() == (out / "rebuilt" / "tokenizer.json").read_bytes())
a, b = load_file(shipped / "model.safetensors"), load_file(out / "rebuilt" / "model.safetensors")
for k in a:
    print(f"{k:55s} {((a[k] - b[k]).norm() / a[k].norm()).item():.2e}")
