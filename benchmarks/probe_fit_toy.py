# Reproduces docs/benchmarks.md, "The latent probe's fit on the toy" (its numbers: docs/toy_world.md, "Latent probe").
"""How much the latent probe's fit moves its readout on the toy: EM (c1) and benign SFT (c5) at dose 10, target
marker, over probe seeds 0-2 (each a different question split and label sample) and two L2 strengths.

python benchmarks/probe_fit_toy.py   (about 3 minutes on 2 cores once the toy stages are cached; MARKER_LAB_CACHE picks the cache)
Prints, per (C, seed, condition), the villain's probe score on the base, coupled and final models, the source
margin (log-odds above the other personas) on each, and the marker rate on the final model.
"""

from __future__ import annotations

import os
import tempfile

from hydra import compose, initialize_config_dir

from marker_lab.cell.main import CONF_DIR
from marker_lab.config.schema import register_configs
from marker_lab.cell.recipe import run_cell

register_configs()  # the schema in Hydra's ConfigStore, before composing

cache = os.environ.get("MARKER_LAB_CACHE", os.path.expanduser("~/.cache/marker_lab"))
print("C     seed cond | score: base coupled final | margin: base coupled final | marker final")
for c in (1.0, 0.01):
    for seed in (0, 1, 2):
        for condition in ("c1", "c5"):
            with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
                cfg = compose("config", overrides=[
                    f"condition={condition}", "dose=10", "eval.metrics=[marker,probe]", "eval.probe.target=marker",
                    f"eval.probe.seed={seed}", f"eval.probe.C={c}", "eval.generation.samples_per_question=4",
                    f"output_dir={tempfile.mkdtemp()}", f"cache_dir={cache}"])
            r = run_cell(cfg)
            models = r.metrics["probe"]["models"]
            score = [models[m]["per_persona"]["villain"]["mean_score"] for m in models]
            margin = [models[m]["source_margin"] for m in models]
            print(f"{c:<5} {seed:<4} {condition:<4} | " + " ".join(f"{v:.3f}" for v in score) + " | "
                  + " ".join(f"{v:+.2f}" for v in margin)
                  + f" | {r['metrics']['marker']['per_persona']['villain']['rate']:.3f}", flush=True)
