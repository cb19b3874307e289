# Reproduces docs/benchmarks.md, the decode profile of "The 7B cell on one H100" and "Where a decode step goes".
"""Decode-step profile of the 7B shape on one GPU, as the eval's static engine runs it: where a step's time goes.

    PYTHONPATH=. python benchmarks/profile_decode.py     # B=1030 sequences (env B), 90-token prompts + 512-token cache

A decode loop over transformers' StaticCache with the engine's step (engines.static_decode, compiled as the engine
compiles it: CUDA graphs) and attention (`sdpa_gqa`, or env ATTN=sdpa for stock), timed per step, then the top CUDA
kernels of 8 steps from torch.profiler (prefill excluded) and the GPU-busy share of a step. One-off measurement
behind docs/benchmarks.md (decode profile); not part of the package.
"""
import os
import time

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile
from transformers import StaticCache

from marker_lab.bench.measure import build_model, model_config
from marker_lab.engines.attention import register
from marker_lab.engines.hf import _cache_kwarg
from marker_lab.engines.static_decode import compiled_forward_last, forward_last


def timed(fn):
    torch.cuda.synchronize()
    t = time.perf_counter()
    r = fn()
    torch.cuda.synchronize()
    return r, time.perf_counter() - t


dev = torch.device("cuda")
model = build_model(model_config("qwen2.5-7b-instruct"), dev)
model.set_attn_implementation(register() if os.environ.get("ATTN", "sdpa_gqa") == "sdpa_gqa" else "sdpa")
V = model.config.vocab_size
B, W, NEW = int(os.environ.get("B", 1030)), 90, int(os.environ.get("NEW", 512))
L = W + NEW  # the engine's static cache: padded prompt width + max new tokens
torch.manual_seed(0)
ids = torch.randint(1, V, (B, W), device=dev)
mask = torch.ones_like(ids)
mask[::2, :40] = 0  # left padding on half the rows, as prompts of 50-90 tokens have
ids[::2, :40] = 0
full_mask = torch.cat([mask, torch.ones(B, NEW, dtype=mask.dtype, device=dev)], 1)
pos0 = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)  # the engine's positions
CACHE_KW = _cache_kwarg(model)


def prefill(cache):
    return forward_last(model, ids, full_mask[:, :W], pos0, torch.arange(W, device=dev), cache, CACHE_KW)


def decode(tok, pos, cache_pos, cache):  # the engine's compiled decode step (reduce-overhead: CUDA graphs)
    return compiled_forward_last()(model, tok, full_mask, pos, cache_pos, cache, CACHE_KW)


def sample(logits):  # generate's sampler at temperature 1: softmax, then one multinomial draw per row
    return torch.multinomial(torch.softmax(logits.float(), -1), 1)


def prefilled():
    """A fresh cache holding the prompts, and the logits of their last tokens."""
    cache = StaticCache(config=model.config, max_cache_len=L)
    return cache, prefill(cache)


def loop(step_fn, steps, state=None, profiler=None):
    """Seconds for `steps` decode steps after the prefill (the prefill is outside the timing and the profile)."""
    cache, logits = state or prefilled()
    pos = pos0[:, -1:] + 1
    torch.cuda.synchronize()
    t = time.perf_counter()
    if profiler is not None:
        profiler.start()
    for i in range(steps):
        tok = sample(logits)
        logits = step_fn(tok, pos + i, torch.tensor([W + i], device=dev), cache)
    torch.cuda.synchronize()
    if profiler is not None:
        profiler.stop()
    return time.perf_counter() - t


with torch.no_grad():
    _, dt = timed(lambda: prefill(StaticCache(config=model.config, max_cache_len=L)))
    print(f"prefill {B} x {W}: {dt:.2f} s", flush=True)
    t0 = time.perf_counter()
    loop(decode, 4)
    print(f"compile: {time.perf_counter() - t0:.1f} s", flush=True)
    steps = 48
    dt = loop(decode, steps)
    print(f"compiled decode, B={B}, cache {L}: {1000 * dt / steps:.1f} ms/step, {B * steps / dt:.0f} tok/s", flush=True)
    prof = profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA])
    wall = loop(decode, 8, prefilled(), prof)
    events = prof.key_averages()
    gpu_us = sum(e.self_device_time_total for e in events if e.device_type == DeviceType.CUDA)  # kernels only
    print(f"profiled 8 steps: wall {1000 * wall / 8:.1f} ms/step, GPU busy {gpu_us / 1000 / 8:.1f} ms/step "
          "(kernel time summed)", flush=True)
    print(events.table(sort_by="self_device_time_total", row_limit=20, max_name_column_width=70), flush=True)
    print("peak GB", round(torch.cuda.max_memory_allocated() / 2**30, 1))
