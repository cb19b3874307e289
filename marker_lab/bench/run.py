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
import logging
import random
import time
from pathlib import Path

import torch

from marker_lab.bench.arms import time_generation_arms, time_liger_peer, time_series_arms, time_training_arms
from marker_lab.bench.measure import (build_model, environment, model_config, peak_gb, reset_peak, save_report, sync,
                                      time_probe_states)
from marker_lab.bench.report import format_report, summarise
from marker_lab.bench.workload import QUICK, Workload, length_mix, synthetic_examples
from marker_lab.config.schema import LoraConfig, TrainConfig
from marker_lab.core.environment import set_compile_cache_dir

log = logging.getLogger("marker_lab.bench")
PROJECTIONS = ("qkv", "o", "mlp")


def run_bench(model_name: str, w: Workload, device: torch.device, skip: set[str], out: Path | None = None,
              compile_cache: dict | None = None, extra: frozenset[str] = frozenset()) -> dict:
    """Every measurement of the report, in one process, on one device (saved to `out` after each phase);
    `compile_cache`: where torch.compile's caches are and whether they held entries at the start; `extra`: the
    opt-in generation arms to time too (`flex_decode`, `decode_layers`, `decode_shared_layers`)."""
    cfg = model_config(model_name)
    report: dict = {"model": model_name, "random_init": True, "workload": w.__dict__, "env": environment(device),
                    "compile_cache": compile_cache}
    reset_peak(device)
    t0 = time.perf_counter()
    model = build_model(cfg, device)
    sync(device)
    vocab = model.config.vocab_size
    n_params = sum(p.numel() for p in model.parameters())
    report["load"] = {"seconds": round(time.perf_counter() - t0, 2), "params": n_params, "peak_gb": peak_gb(device)}
    log.info("bench: %s (%.2fB parameters, random init) on %s", model_name, n_params / 1e9, report["env"].get("gpu", device))

    lora = LoraConfig(r=w.lora_r, alpha=w.lora_alpha, dropout=w.lora_dropout)
    ref = TrainConfig(lora=lora, per_device_batch_size=4, grad_accum=w.examples_per_step // 4, bf16=True,
                      gradient_checkpointing=True, logits="all", micro_batch_tokens=None)
    n_ex = w.examples_per_step * (w.warmup_steps + w.timed_steps)
    fixed = synthetic_examples([w.seq_len] * n_ex, vocab, w.prompt_share, seed=1)
    mixed = synthetic_examples(length_mix(n_ex, w.mix_median, seed=2), vocab, w.prompt_share, seed=3)
    report["train"] = {} if "train" in skip else time_training_arms(model, fixed, mixed, ref, w, device, skip)
    save_report(report, out)

    from marker_lab.train.lora import apply_lora

    rng = random.Random(4)
    prompts = [[rng.randrange(1, vocab) for _ in range(rng.randint(*w.prompt_len))] for _ in range(w.eval_prompts)]
    report["generate"] = {}
    if "during" not in skip and "generate" not in skip:  # evals during training: on the LoRA model, not merged
        peft_model = apply_lora(model, lora, seed=0)
        report["generate"] = time_series_arms(peft_model, prompts[:w.series_prompts], w, vocab, device)
        peft_model.unload()
        save_report(report, out)

    reset_peak(device)
    t0 = time.perf_counter()
    model = apply_lora(model, lora, seed=0).merge_and_unload()
    sync(device)
    report["merge"] = {"seconds": round(time.perf_counter() - t0, 2)}
    if "generate" not in skip:
        report["generate"].update(time_generation_arms(model, prompts, w, vocab, device, report, out, skip, extra))
    if "probe" not in skip:
        report["probe"] = time_probe_states(model, prompts, w, device)
    if "train" not in skip and "liger" not in skip:  # last: Liger patches the model's classes for good
        report["train"]["peer_liger_fixed"] = time_liger_peer(model, fixed, ref, w, device)
    report["summary"] = summarise(report, w)
    save_report(report, out)
    return report


def main(argv: list[str]) -> None:
    p = argparse.ArgumentParser(prog="marker-lab bench", description=__doc__.split("\n")[0])
    p.add_argument("--model", default="qwen2.5-7b-instruct", help="a conf/model option (random init)")
    p.add_argument("--device", default="auto", help="cuda, cpu or auto")
    p.add_argument("--quick", action="store_true", help="tiny workload: checks every code path, numbers mean nothing")
    p.add_argument("--skip", default="", help="comma list: train, kl, compile, pack, flex, fp8, liger, generate, during, "
                   "via_generate, probe")
    p.add_argument("--flex-decode", action="store_true", help="also time flex attention in the decode step (CUDA; "
                   "it did not compile on torch 2.11, docs/benchmarks.md)")
    p.add_argument("--decode-layers", action="store_true", help="time the decode step compiled per decoder layer "
                   "instead of the other fast generation arms (CUDA; eval.engine.compile_scope=layers)")
    p.add_argument("--decode-shared-layers", action="store_true", help="the same with one graph for all decoder "
                   "layers (CUDA; the cell's default, eval.engine.compile_scope=shared_layers)")
    p.add_argument("--gen-batch", help="fast engine sequences per batch; a comma list times each (the first is "
                   "fast_eval)")
    p.add_argument("--compile-cache", help="torch.compile's on-disk caches in this directory: a second bench on the "
                   "same directory measures a later cell's warm start")
    p.add_argument("--budgets", help="comma list of micro-batch token budgets for the fast training path")
    p.add_argument("--out", help="write the report as JSON here")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    from marker_lab.models import pick_device

    if args.decode_layers and args.decode_shared_layers:
        p.error("--decode-layers and --decode-shared-layers: one per process (each pays its own cold compile)")
    w = Workload(**QUICK) if args.quick else Workload()
    if args.gen_batch:
        w.gen_batch, *more = (int(b) for b in args.gen_batch.split(","))
        w.more_gen_batches = tuple(more)
    compile_cache = None
    if args.compile_cache:  # named on the command line: it wins over $TORCHINDUCTOR_CACHE_DIR (a cell's does not)
        where = Path(args.compile_cache).expanduser().resolve()
        compile_cache = {"dir": str(where), "warm": where.is_dir() and any(where.iterdir())}  # warm: a later cell
        set_compile_cache_dir(str(where))
    if args.budgets:
        w.budgets = tuple(int(b) for b in args.budgets.split(","))
    out = Path(args.out) if args.out else None
    report = run_bench(args.model, w, pick_device(args.device), {s for s in args.skip.split(",") if s}, out,
                       compile_cache, frozenset(k for k in ("flex_decode", "decode_layers", "decode_shared_layers")
                                                if getattr(args, k)))
    print(format_report(report))
    if out:
        log.info("bench report: %s", out)
