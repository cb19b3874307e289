"""Decode-step profile of the 7B shape on one GPU: stock vs static+compiled generate, manual decode loops, samplers.

    PYTHONPATH=. python launch/profile_decode.py     # B=1030 by default (env B)

One-off measurement behind docs/benchmarks.md (decode profile); not part of the package.
"""
import time, sys, traceback, os
import torch
from transformers import StaticCache, GenerationConfig, CompileConfig
from marker_lab.bench import model_config, build_model

def p(*a):
    print(*a, flush=True)

dev = torch.device("cuda")
model = build_model(model_config("qwen2.5-7b-instruct"), dev)
V = model.config.vocab_size
B, W, N = int(os.environ.get("B", 1030)), 90, 64
torch.manual_seed(0)
ids = torch.randint(1, V, (B, W), device=dev)
mask = torch.ones_like(ids); mask[::2, :30] = 0; ids[::2, :30] = 0

def timed(fn):
    torch.cuda.synchronize(); t = time.perf_counter(); r = fn(); torch.cuda.synchronize(); return r, time.perf_counter() - t

def gen(n, static):
    gc = GenerationConfig(do_sample=True, temperature=1.0, top_p=1.0, top_k=0, max_new_tokens=n, eos_token_id=[V + 1],
                          pad_token_id=0, cache_implementation="static" if static else None,
                          compile_config=CompileConfig(fullgraph=False, dynamic=False) if static else None,
                          disable_compile=not static)
    return timed(lambda: model.generate(input_ids=ids, attention_mask=mask, generation_config=gc))[1]

with torch.no_grad():
    for static in (False, True):
        try:
            t0 = time.perf_counter()
            first = gen(N, static); p(f"generate static={static} first call N={N}: {first:.1f}s")
            t64 = gen(N, static); t16 = gen(16, static)
            p(f"generate static={static}: N=64 {t64:.2f}s N=16 {t16:.2f}s -> {1000*(t64-t16)/48:.1f} ms/step, tok/s {B*48/(t64-t16):.0f}")
        except Exception:
            traceback.print_exc()

    full_mask = torch.cat([mask, torch.ones(B, N + 1, dtype=mask.dtype, device=dev)], 1)
    pos0 = (mask.cumsum(-1) - 1).clamp(min=0)

    def prefill(cache):
        out = model(input_ids=ids, attention_mask=mask, position_ids=pos0, past_key_values=cache,
                    cache_position=torch.arange(W, device=dev), logits_to_keep=1, use_cache=True)
        return out.logits[:, -1]

    def decode(tok, pos, cache_pos, cache):
        out = model(input_ids=tok, attention_mask=full_mask, position_ids=pos, past_key_values=cache,
                    cache_position=cache_pos, use_cache=True)
        return out.logits[:, -1]

    samplers = {
        "argmax": lambda l: l.argmax(-1, keepdim=True),
        "multinomial": lambda l: torch.multinomial(torch.softmax(l.float(), -1), 1),
        "exp_race": lambda l: (torch.softmax(l.float(), -1) / torch.empty_like(l, dtype=torch.float32).exponential_()).argmax(-1, keepdim=True),
    }
    lg = torch.randn(B, V, device=dev, dtype=torch.bfloat16)
    for name, s in samplers.items():
        s(lg); _, dt = timed(lambda: [s(lg) for _ in range(20)]); p(f"sampler {name}: {1000*dt/20:.2f} ms")

    def loop(step_fn, sampler, steps):
        cache = StaticCache(config=model.config, max_cache_len=W + N + 1)
        logits = prefill(cache)
        pos = pos0[:, -1:] + 1
        torch.cuda.synchronize(); t = time.perf_counter()
        for i in range(steps):
            tok = sampler(logits)
            logits = step_fn(tok, pos + i, torch.tensor([W + i], device=dev), cache)
        torch.cuda.synchronize(); return time.perf_counter() - t

    for name in ("argmax", "multinomial", "exp_race"):
        try:
            loop(decode, samplers[name], 4)
            dt = loop(decode, samplers[name], 32); p(f"manual eager static, {name}: {1000*dt/32:.1f} ms/step")
        except Exception:
            traceback.print_exc()
    try:
        cdecode = torch.compile(decode, mode="reduce-overhead", fullgraph=True)
        t0 = time.perf_counter(); loop(cdecode, samplers["exp_race"], 4); p(f"compile: {time.perf_counter()-t0:.1f}s")
        for name in ("argmax", "exp_race", "multinomial"):
            dt = loop(cdecode, samplers[name], 48); p(f"manual compiled static, {name}: {1000*dt/48:.1f} ms/step, tok/s {B*48/dt:.0f}")
        from torch.profiler import profile, ProfilerActivity
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            loop(cdecode, samplers["exp_race"], 8)
        p(prof.key_averages().table(sort_by="cuda_time_total", row_limit=15))
    except Exception:
        traceback.print_exc()
    # prefill cost
    _, dt = timed(lambda: prefill(StaticCache(config=model.config, max_cache_len=W + N + 1))); p(f"prefill {B}x{W}: {dt:.2f}s")
    p("peak GB", torch.cuda.max_memory_allocated() / 2**30)
