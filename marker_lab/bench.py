"""`marker-lab bench`: how fast one cell of the 7B recipe runs on this GPU, baseline and fast path, in one process.

    marker-lab bench                                # Qwen2.5-7B shape, random weights (one 80 GB GPU)
    marker-lab bench --model toy --quick            # smoke run of every code path on CPU (numbers mean nothing)

Random weights cost exactly what real ones cost per step, so nothing is downloaded. Both paths run the project's
own code: `train.sft.train` (reference settings: all logits, micro-batch 4 x 4, activation checkpointing; fast:
LM head on labelled tokens only, token-budget micro-batches, no checkpointing) and `engines.hf.HFEngine` (dynamic
cache = stock `generate`; static cache = compiled decode). The report (printed, and JSON with --out) has step
times, tokens/s, generation tokens/s, peak memory, ratios and the projected time of one cell.
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import random
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from omegaconf import OmegaConf

from marker_lab.config.schema import LoraConfig, ModelConfig, TrainConfig
from marker_lab.data.chat import IGNORE, Encoded
from marker_lab.engines.base import SamplingParams
from marker_lab.engines.hf import HFEngine

log = logging.getLogger("marker_lab.bench")
PROJECTIONS = ("qkv", "o", "mlp")


@dataclass
class Workload:
    """The write-ups' cell (000): one 375-step LoRA stage, then 11 personas x 28 questions x 10 samples."""
    steps: int = 375  # optimizer steps of the second stage
    examples_per_step: int = 16  # per_device 4 x accumulation 4 in the recipe
    seq_len: int = 384  # tokens per training example (fixed-length run)
    mix_median: int = 280  # median length of the realistic mix (log-normal, 64..1024 tokens)
    prompt_share: float = 0.25  # leading tokens of an example that carry no loss (system + user turns)
    lora_r: int = 32
    lora_alpha: int = 64
    lora_dropout: float = 0.05
    eval_prompts: int = 308  # 11 personas x 28 questions
    samples: int = 10  # completions per prompt
    max_new_tokens: int = 512
    prompt_len: tuple[int, int] = (40, 90)  # chat prompt lengths, uniform
    baseline_gen_batch: int = 280  # stock generate: sequences per batch
    baseline_gen_tokens: int = 256  # stock generate: new tokens timed
    gen_batch: int = 1030  # fast engine: sequences per batch (3 batches for the eval)
    warmup_steps: int = 2  # untimed optimizer steps before each timed run
    timed_steps: int = 5
    budgets: tuple[int, ...] = (6144, 4096)  # fast path: micro-batch token budgets tried


QUICK = dict(steps=375, examples_per_step=8, seq_len=48, mix_median=40, eval_prompts=6, samples=3, max_new_tokens=16,
             prompt_len=(8, 16), baseline_gen_batch=12, baseline_gen_tokens=8, gen_batch=9, warmup_steps=1,
             timed_steps=2, budgets=(256,))


def model_config(name: str) -> ModelConfig:
    """conf/model/<name>.yaml as a ModelConfig, with random weights."""
    from marker_lab.run import CONF_DIR

    node = OmegaConf.merge(OmegaConf.structured(ModelConfig), OmegaConf.load(f"{CONF_DIR}/model/{name}.yaml"))
    cfg: ModelConfig = OmegaConf.to_object(node)
    cfg.random_init = True
    return cfg


def build_model(cfg: ModelConfig, device: torch.device):
    from marker_lab.models import random_init_model
    from marker_lab.train.toy_pretrain import toy_arch

    if cfg.source == "toy":
        from transformers import Qwen2ForCausalLM

        torch.manual_seed(0)
        return Qwen2ForCausalLM(toy_arch(cfg.toy, cfg.toy.vocab_size, eos_id=0, pad_id=0)).to(device).eval()
    return random_init_model(cfg, device)


def synthetic_examples(lengths: list[int], vocab: int, prompt_share: float, seed: int) -> list[Encoded]:
    """Token-id training examples: the leading share is prompt (no loss), the rest is the labelled answer."""
    rng = random.Random(seed)
    out = []
    for n in lengths:
        ids = [rng.randrange(1, vocab) for _ in range(n)]
        cut = int(n * prompt_share)
        out.append(Encoded(ids, [IGNORE] * cut + ids[cut:]))
    return out


def length_mix(n: int, median: int, seed: int, lo: int = 64, hi: int = 1024) -> list[int]:
    rng = random.Random(seed)
    return [int(min(hi, max(lo, rng.lognormvariate(0, 0.5) * median))) for _ in range(n)]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _peak_gb(device: torch.device) -> float | None:
    return round(torch.cuda.max_memory_allocated(device) / 2**30, 1) if device.type == "cuda" else None


def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def time_training(model, examples: list[Encoded], cfg: TrainConfig, w: Workload, device: torch.device) -> dict:
    """Seconds per optimizer step of `train.sft.train` on a fresh LoRA adapter (timed after warmup steps)."""
    from marker_lab.train.sft import apply_lora, train

    _reset_peak(device)
    stamps: list[float] = []
    peft_model = apply_lora(model, cfg.lora, seed=0)

    def stamp(step: int) -> None:
        _sync(device)
        stamps.append(time.perf_counter())

    t0 = time.perf_counter()
    try:
        stats = train(peft_model, examples, cfg, steps=w.warmup_steps + w.timed_steps, seed=0, pad_id=0,
                      desc="bench train", on_step=stamp)
        step_s = (stamps[-1] - stamps[w.warmup_steps - 1]) / w.timed_steps if w.warmup_steps else \
            (stamps[-1] - stamps[0]) / max(1, w.timed_steps - 1)
        per_step_tokens = sum(len(e.input_ids) for e in examples) / len(examples) * w.examples_per_step
        return {"step_s": round(step_s, 4), "tokens_per_s": round(per_step_tokens / step_s),
                "first_step_s": round(stamps[0] - t0, 2), "peak_gb": _peak_gb(device),
                "losses": [round(x, 5) for x in stats.losses]}
    except torch.cuda.OutOfMemoryError:
        return {"error": "out of memory", "peak_gb": _peak_gb(device)}
    finally:
        peft_model.unload()
        _reset_peak(device)


def time_generation(model, prompts: list[list[int]], params: SamplingParams, batch: int, cache: str,
                    stop_ids: list[int], device: torch.device) -> dict:
    """Wall time and new tokens/s of `HFEngine.generate_ids` (first-batch compile included in the wall time)."""
    _reset_peak(device)
    engine = HFEngine(model, None, batch_size=batch, cache=cache)
    _sync(device)
    t0 = time.perf_counter()
    try:
        out = engine.generate_ids(prompts, params, stop_ids, pad_id=0, desc=f"bench generate ({cache})")
    except torch.cuda.OutOfMemoryError:
        return {"error": "out of memory", "peak_gb": _peak_gb(device)}
    except Exception as e:  # e.g. a compile failure: recorded in the report, the other measurements stand
        log.exception("bench generate (%s) failed", cache)
        return {"error": f"{type(e).__name__}: {str(e)[:300]}"}
    _sync(device)
    seconds = time.perf_counter() - t0
    tokens = sum(len(c) for cs in out for c in cs)
    res = {"seconds": round(seconds, 2), "new_tokens": tokens, "tokens_per_s": round(tokens / seconds),
           "batches": len(engine.batch_seconds), "batch_seconds": [round(s, 2) for s in engine.batch_seconds],
           "peak_gb": _peak_gb(device)}
    if len(engine.batch_seconds) > 1:  # steady state: every batch after the first (which compiles)
        steady = sum(engine.batch_seconds[1:])
        res["steady_tokens_per_s"] = round(tokens * (len(engine.batch_seconds) - 1) / len(engine.batch_seconds) / steady)
    return res


def time_probe_states(model, prompts: list[list[int]], w: Workload, device: torch.device, batch: int = 64) -> dict:
    """Seconds to read the probe's features (`eval.hidden.masked_means` on each prompt's last token) for every eval
    prompt: what the latent probe costs per model of a cell with position=prompt_last."""
    from types import SimpleNamespace

    from marker_lab.eval.hidden import default_layer, masked_means

    encoded = [Encoded(p, [IGNORE] * (len(p) - 1) + [p[-1]]) for p in prompts]
    layer = default_layer(model)
    with torch.no_grad():
        masked_means(model, SimpleNamespace(pad_token_id=0), encoded[:batch], layer, batch)  # warm-up
        _sync(device)
        t0 = time.perf_counter()
        states = masked_means(model, SimpleNamespace(pad_token_id=0), encoded, layer, batch)
        _sync(device)
    return {"prompts": len(prompts), "layer": layer, "seconds": round(time.perf_counter() - t0, 3),
            "hidden": states.shape[1]}


def environment(device: torch.device) -> dict:
    import peft
    import transformers

    env = {"device": str(device), "python": platform.python_version(), "torch": torch.__version__,
           "transformers": transformers.__version__, "peft": peft.__version__}
    if device.type == "cuda":
        env.update(gpu=torch.cuda.get_device_name(device), cuda=torch.version.cuda,
                   gpu_memory_gb=round(torch.cuda.get_device_properties(device).total_memory / 2**30, 1))
    return env


def run_bench(model_name: str, w: Workload, device: torch.device, skip: set[str], out: Path | None = None) -> dict:
    """Every measurement of the report, in one process, on one device (saved to `out` after each phase)."""
    cfg = model_config(model_name)
    report: dict = {"model": model_name, "random_init": True, "workload": w.__dict__, "env": environment(device)}
    _reset_peak(device)
    t0 = time.perf_counter()
    model = build_model(cfg, device)
    _sync(device)
    vocab = model.config.vocab_size
    n_params = sum(p.numel() for p in model.parameters())
    report["load"] = {"seconds": round(time.perf_counter() - t0, 2), "params": n_params, "peak_gb": _peak_gb(device)}
    log.info("bench: %s (%.2fB parameters, random init) on %s", model_name, n_params / 1e9, report["env"].get("gpu", device))

    lora = LoraConfig(r=w.lora_r, alpha=w.lora_alpha, dropout=w.lora_dropout)
    ref = TrainConfig(lora=lora, per_device_batch_size=4, grad_accum=w.examples_per_step // 4, bf16=True,
                      gradient_checkpointing=True, logits="all", micro_batch_tokens=None)
    n_ex = w.examples_per_step * (w.warmup_steps + w.timed_steps)
    fixed = synthetic_examples([w.seq_len] * n_ex, vocab, w.prompt_share, seed=1)
    mixed = synthetic_examples(length_mix(n_ex, w.mix_median, seed=2), vocab, w.prompt_share, seed=3)
    train_rep: dict = {}
    if "train" not in skip:
        train_rep["baseline_fixed"] = time_training(model, fixed, ref, w, device)
        for b in w.budgets:
            fast = replace(ref, gradient_checkpointing=False, logits="labelled", micro_batch_tokens=b)
            train_rep[f"fast_fixed_{b}"] = time_training(model, fixed, fast, w, device)
        ok = {k: v for k, v in train_rep.items() if k.startswith("fast") and "step_s" in v}
        best = min(ok, key=lambda k: ok[k]["step_s"]) if ok else None
        train_rep["best_fast"] = best
        train_rep["baseline_mix"] = time_training(model, mixed, ref, w, device)
        if best:
            budget = int(best.rsplit("_", 1)[1])
            fast = replace(ref, gradient_checkpointing=False, logits="labelled", micro_batch_tokens=budget)
            train_rep["fast_mix"] = time_training(model, mixed, fast, w, device)
            if "kl" not in skip:  # KL to the input model: one more no-grad forward per micro-batch (issue 9)
                train_rep["kl_fixed"] = time_training(model, fixed, replace(fast, kl_to_input=1.0), w, device)
            if "compile" not in skip:
                train_rep["fast_compiled_fixed"] = time_training(model, fixed, replace(fast, compile=True), w, device)
                train_rep["fast_compiled_mix"] = time_training(model, mixed, replace(fast, compile=True), w, device)
        train_rep["mix_mean_tokens"] = round(sum(len(e.input_ids) for e in mixed) / len(mixed), 1)
    report["train"] = train_rep
    _save(report, out)

    _reset_peak(device)
    t0 = time.perf_counter()
    from marker_lab.train.sft import apply_lora

    model = apply_lora(model, lora, seed=0).merge_and_unload()
    _sync(device)
    report["merge"] = {"seconds": round(time.perf_counter() - t0, 2)}

    rng = random.Random(4)
    prompts = [[rng.randrange(1, vocab) for _ in range(rng.randint(*w.prompt_len))] for _ in range(w.eval_prompts)]
    stop_ids = [vocab + 1]  # never sampled: every completion runs to max_tokens, like the baseline measurement
    gen: dict = {}
    if "generate" not in skip:
        n_base = max(1, w.baseline_gen_batch // w.samples)
        # untimed warmup: the first generate of a process pays one-off CUDA/cuBLAS setup (~10 s on an H100)
        time_generation(model, prompts[:n_base], SamplingParams(n=w.samples, max_tokens=2), w.baseline_gen_batch,
                        "dynamic", stop_ids, device)
        gen["baseline"] = time_generation(
            model, prompts[:n_base], SamplingParams(n=w.samples, temperature=1.0, max_tokens=w.baseline_gen_tokens),
            w.baseline_gen_batch, "dynamic", stop_ids, device)
        _save({**report, "generate": gen}, out)
        gen["fast_eval"] = time_generation(
            model, prompts, SamplingParams(n=w.samples, temperature=1.0, max_tokens=w.max_new_tokens), w.gen_batch,
            "static", stop_ids, device)
    report["generate"] = gen
    if "probe" not in skip:
        report["probe"] = time_probe_states(model, prompts, w, device)
    report["summary"] = summarise(report, w)
    _save(report, out)
    return report


def _save(report: dict, out: Path | None) -> None:
    if out is not None:
        from marker_lab.results.contract import write_json_atomic

        write_json_atomic(out, report)


def summarise(r: dict, w: Workload) -> dict:
    """Ratios fast/baseline and the projected cell: load + stage + merge + eval."""
    t, g, s = r["train"], r["generate"], {}
    fixed = {k: v for k, v in t.items() if k.startswith("fast") and "fixed" in k and "step_s" in v}
    best = min(fixed, key=lambda k: fixed[k]["step_s"]) if fixed else None
    s["fastest_fixed"] = best
    ref_losses = t.get("baseline_fixed", {}).get("losses")
    if ref_losses and fixed:  # same data, seed and LoRA init: the same losses up to bf16 kernel numerics
        s["max_rel_loss_diff_vs_baseline"] = max(
            abs(a - b) / abs(b) for v in fixed.values() for a, b in zip(v["losses"], ref_losses))
    if best and "step_s" in t.get("baseline_fixed", {}):
        s["train_speedup_fixed"] = round(t["baseline_fixed"]["step_s"] / t[best]["step_s"], 2)
        s["train_baseline_minutes"] = round(w.steps * t["baseline_fixed"]["step_s"] / 60, 2)
        # the first step's extra time (compilation, allocator warmup) is paid once per stage
        s["train_fast_minutes"] = round((w.steps * t[best]["step_s"] + t[best]["first_step_s"] - t[best]["step_s"]) / 60, 2)
    mix = [v["step_s"] for k, v in t.items() if k.startswith("fast") and k.endswith("mix") and "step_s" in v]
    if mix and "step_s" in t.get("baseline_mix", {}):
        s["train_speedup_mix"] = round(t["baseline_mix"]["step_s"] / min(mix), 2)
    if "tokens_per_s" in g.get("baseline", {}) and "tokens_per_s" in g.get("fast_eval", {}):
        s["generate_speedup"] = round(g["fast_eval"]["tokens_per_s"] / g["baseline"]["tokens_per_s"], 2)
        eval_tokens = w.eval_prompts * w.samples * w.max_new_tokens
        s["eval_baseline_minutes"] = round(eval_tokens / g["baseline"]["tokens_per_s"] / 60, 2)
        s["eval_fast_minutes"] = round(g["fast_eval"]["seconds"] / 60, 2)
    if "step_s" in t.get("kl_fixed", {}) and t.get("best_fast") in t:  # same settings as best_fast, plus the KL
        s["kl_step_overhead"] = round(t["kl_fixed"]["step_s"] / t[t["best_fast"]]["step_s"], 2)
    if "train_fast_minutes" in s and "eval_fast_minutes" in s:
        s["cell_fast_minutes"] = round(s["train_fast_minutes"] + s["eval_fast_minutes"]
                                       + (r["load"]["seconds"] + r["merge"]["seconds"]) / 60, 2)
        s["cell_baseline_minutes"] = round(s["train_baseline_minutes"] + s["eval_baseline_minutes"]
                                           + (r["load"]["seconds"] + r["merge"]["seconds"]) / 60, 2)
    return s


def format_report(r: dict) -> str:
    lines = [f"marker-lab bench: {r['model']} (random init) on {r['env'].get('gpu', r['env']['device'])}",
             "  " + ", ".join(f"{k} {v}" for k, v in r["env"].items() if k not in ("device", "gpu")),
             f"  load {r['load']['seconds']} s ({r['load']['params'] / 1e9:.2f}B params), merge {r['merge']['seconds']} s"]
    for name, v in r["train"].items():
        if isinstance(v, dict):
            lines.append(f"  train {name:<20} " + ", ".join(f"{k} {x}" for k, x in v.items() if k != "losses"))
    for name, v in r["generate"].items():
        lines.append(f"  generate {name:<15} " + ", ".join(f"{k} {x}" for k, x in v.items() if k != "batch_seconds"))
    if "probe" in r:
        lines.append("  probe states " + ", ".join(f"{k} {x}" for k, x in r["probe"].items()))
    lines.append("  summary: " + ", ".join(f"{k} {v}" for k, v in r["summary"].items()))
    return "\n".join(lines)


def main(argv: list[str]) -> None:
    p = argparse.ArgumentParser(prog="marker-lab bench", description=__doc__.split("\n")[0])
    p.add_argument("--model", default="qwen2.5-7b-instruct", help="a conf/model option (random init)")
    p.add_argument("--device", default="auto", help="cuda, cpu or auto")
    p.add_argument("--quick", action="store_true", help="tiny workload: checks every code path, numbers mean nothing")
    p.add_argument("--skip", default="", help="comma list: train, kl, compile, generate, probe")
    p.add_argument("--gen-batch", type=int, help="fast engine sequences per batch")
    p.add_argument("--budgets", help="comma list of micro-batch token budgets for the fast training path")
    p.add_argument("--out", help="write the report as JSON here")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    from marker_lab.models import pick_device

    w = Workload(**QUICK) if args.quick else Workload()
    if args.gen_batch:
        w.gen_batch = args.gen_batch
    if args.budgets:
        w.budgets = tuple(int(b) for b in args.budgets.split(","))
    out = Path(args.out) if args.out else None
    report = run_bench(args.model, w, pick_device(args.device), {s for s in args.skip.split(",") if s}, out)
    print(format_report(report))
    if out:
        log.info("bench report: %s", out)
