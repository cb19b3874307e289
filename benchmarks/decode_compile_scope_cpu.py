# Reproduces docs/benchmarks.md, the CPU tables of the decode compile scopes (seventh and tenth sessions).
"""How long the static loop's decode step takes to compile, as one whole-model graph, per decoder layer, or as one
graph for all layers, on CPU.

    python benchmarks/decode_compile_scope_cpu.py            # the three scopes, each in a fresh process with an empty compile cache

A Qwen2 of the 7B's depth (28 layers) at a toy width, random weights: the compile's cost (dynamo tracing,
AOTAutograd, Inductor lowering and code generation) grows with the number of layers the graph holds, the kernels'
run time with the width. Inductor writes C++ on CPU and Triton on a GPU, so the seconds are not a GPU's; the ratio
between the scopes is what this measures. One request of 2 batches: the first compiles, the second is steady.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time


def one(scope: str) -> dict:
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from marker_lab.engines.hf import _cache_kwarg
    from marker_lab.engines.static_decode import sample_static

    torch.manual_seed(0)
    torch.set_num_threads(1)
    cfg = Qwen2Config(vocab_size=1024, hidden_size=128, intermediate_size=256, num_hidden_layers=28,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
    model = Qwen2ForCausalLM(cfg).eval()
    ids = torch.randint(3, 1024, (8, 16))
    mask = torch.ones_like(ids)
    cache, seconds = None, []
    for _ in range(2):
        t0 = time.perf_counter()
        _, cache = sample_static(model, ids, mask, 4, 1.0, 1.0, 32, [], 0, _cache_kwarg(model), cache,
                                 check_every=32, compile_scope=scope)
        seconds.append(round(time.perf_counter() - t0, 2))
    from torch._dynamo.utils import compile_times, counters

    names, values = compile_times(repr="csv", aggregate=True)  # seconds per compile phase, summed over the graphs
    phases = dict(zip(names, (round(float(v), 1) for v in values)))
    return {"scope": scope, "first_request_s": seconds[0], "second_request_s": seconds[1],
            "dynamo_graphs": counters["stats"]["unique_graphs"],
            "fx_cache": {k: v for k, v in counters["inductor"].items() if k.startswith("fxgraph_cache")},
            "compile_s": {k: phases.get(k) for k in ("_compile.compile_inner", "bytecode_tracing",
                                                    "create_aot_dispatcher_function", "compile_fx_inner",
                                                    "GraphLowering.codegen", "PyCodeCache.load_by_key_path")}}


if __name__ == "__main__":
    if len(sys.argv) > 1:
        print(json.dumps(one(sys.argv[1])))
        sys.exit()
    for scope in ("model", "layers", "shared_layers"):
        with tempfile.TemporaryDirectory() as cache_dir:  # cold: nothing compiled before
            env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache_dir}
            t0 = time.perf_counter()
            out = subprocess.run([sys.executable, __file__, scope], env=env, capture_output=True, text=True)
            line = out.stdout.strip().splitlines()[-1] if out.returncode == 0 else out.stderr[-600:]
            print(line, f"(process {time.perf_counter() - t0:.1f} s)")
