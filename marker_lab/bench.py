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
import os
import platform
import random
import time
from dataclasses import replace
from pathlib import Path

import torch
from omegaconf import OmegaConf

from marker_lab.config.schema import LoraConfig, ModelConfig, TrainConfig
from marker_lab.data.chat import IGNORE, Encoded
from marker_lab.engines.base import SamplingParams
from marker_lab.engines.hf import HFEngine
from marker_lab.bench_workload import QUICK, Workload, length_mix, synthetic_examples
from marker_lab.results.bench_report import format_report, summarise

log = logging.getLogger("marker_lab.bench")
PROJECTIONS = ("qkv", "o", "mlp")


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
    stamps: dict[int, float] = {}
    peft_model = apply_lora(model, cfg.lora, seed=0)
    total = w.warmup_steps + w.timed_steps
    first_timed = w.warmup_steps or 1  # the stamp the timed steps count from

    def stamp(step: int) -> None:
        # only where the timing reads a stamp: a sync after every step would drain the GPU's queue, which the
        # training loop itself no longer does (it reads each loss a step late)
        if step in (1, first_timed, total):
            _sync(device)
            stamps[step] = time.perf_counter()

    t0 = time.perf_counter()
    try:
        stats = train(peft_model, examples, cfg, steps=total, seed=0, pad_id=0, desc="bench train", on_step=stamp)
        step_s = (stamps[total] - stamps[first_timed]) / max(1, total - first_timed)
        per_step_tokens = sum(len(e.input_ids) for e in examples) / len(examples) * w.examples_per_step
        return {"step_s": round(step_s, 4), "tokens_per_s": round(per_step_tokens / step_s),
                "first_step_s": round(stamps[1] - t0, 2), "peak_gb": _peak_gb(device),
                "losses": [round(x, 5) for x in stats.losses]}
    except torch.cuda.OutOfMemoryError:
        return {"error": "out of memory", "peak_gb": _peak_gb(device)}
    except Exception as e:  # e.g. a compile failure: recorded in the report, the other measurements stand
        log.exception("bench train failed")
        return {"error": f"{type(e).__name__}: {str(e)[:300]}"}
    finally:
        peft_model.unload()
        _reset_peak(device)


def time_generation(model, prompts: list[list[int]], params: SamplingParams, batch: int, cache: str,
                    stop_ids: list[int], device: torch.device, static_generate: bool = False,
                    compile_scope: str = "model") -> dict:
    """Wall time and new tokens/s of `HFEngine.generate_ids` (first-batch compile included in the wall time);
    `static_generate`: the static cache through transformers' generate instead of the engine's own loop;
    `compile_scope`: the loop's decode step compiled as one graph or per layer. The dynamic cache is stock
    generate; the static engine prefills each prompt once for its samples, as in a cell."""
    _reset_peak(device)
    engine = HFEngine(model, None, batch_size=batch, cache=cache, shared_prefill=cache == "static",
                      static_generate=static_generate, compile_scope=compile_scope)
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


def run_bench(model_name: str, w: Workload, device: torch.device, skip: set[str], out: Path | None = None,
              compile_cache: dict | None = None, extra: frozenset[str] = frozenset()) -> dict:
    """Every measurement of the report, in one process, on one device (saved to `out` after each phase);
    `compile_cache`: where torch.compile's caches are and whether they held entries at the start; `extra`: the
    opt-in generation arms to time too (`flex_decode`, `decode_layers`, `decode_shared_layers`)."""
    cfg = model_config(model_name)
    report: dict = {"model": model_name, "random_init": True, "workload": w.__dict__, "env": environment(device),
                    "compile_cache": compile_cache}
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
    report["train"] = {} if "train" in skip else time_training_arms(model, fixed, mixed, ref, w, device, skip)
    _save(report, out)

    from marker_lab.train.sft import apply_lora

    rng = random.Random(4)
    prompts = [[rng.randrange(1, vocab) for _ in range(rng.randint(*w.prompt_len))] for _ in range(w.eval_prompts)]
    report["generate"] = {}
    if "during" not in skip and "generate" not in skip:  # evals during training: on the LoRA model, not merged
        peft_model = apply_lora(model, lora, seed=0)
        report["generate"] = time_series_arms(peft_model, prompts[:w.series_prompts], w, vocab, device)
        peft_model.unload()
        _save(report, out)

    _reset_peak(device)
    t0 = time.perf_counter()
    model = apply_lora(model, lora, seed=0).merge_and_unload()
    _sync(device)
    report["merge"] = {"seconds": round(time.perf_counter() - t0, 2)}
    if "generate" not in skip:
        report["generate"].update(time_generation_arms(model, prompts, w, vocab, device, report, out, skip, extra))
    if "probe" not in skip:
        report["probe"] = time_probe_states(model, prompts, w, device)
    if "train" not in skip and "liger" not in skip:  # last: Liger patches the model's classes for good
        report["train"]["peer_liger_fixed"] = time_liger_peer(model, fixed, ref, w, device)
    report["summary"] = summarise(report, w)
    _save(report, out)
    return report


def time_training_arms(model, fixed: list[Encoded], mixed: list[Encoded], ref: TrainConfig, w: Workload,
                       device: torch.device, skip: set[str]) -> dict:
    """The training arms: stock settings, then the fast path at each micro-batch budget, on fixed-length examples
    and on the length mix; then KL and compiled variants of the best budget."""
    train_rep: dict = {}
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
        if "pack" not in skip:  # padding-free: each micro-batch one row of whole examples (train.pack)
            packed = replace(fast, pack=True)
            train_rep["fast_packed_mix"] = time_training(model, mixed, packed, w, device)
            # train.attention=varlen: each example attends within itself by its offsets, no mask (flash's varlen
            # kernel on CUDA; on CPU the per-example reference)
            varlen = replace(packed, attention="varlen")
            train_rep["fast_packed_varlen_mix"] = time_training(model, mixed, varlen, w, device)
            if "compile" not in skip:
                train_rep["fast_compiled_packed_mix"] = time_training(model, mixed, replace(packed, compile=True),
                                                                      w, device)
                train_rep["fast_compiled_packed_varlen_mix"] = time_training(model, mixed,
                                                                             replace(varlen, compile=True), w, device)
                for b in w.pack_budgets:
                    train_rep[f"fast_compiled_packed_varlen_mix_{b}"] = time_training(
                        model, mixed, replace(varlen, compile=True, micro_batch_tokens=b), w, device)
                if device.type == "cuda" and "flex" not in skip:  # flex attention has no backward on CPU
                    # train.attention: block-sparse document masks instead of sdpa's dense mask
                    train_rep["fast_compiled_packed_flex_mix"] = time_training(
                        model, mixed, replace(packed, compile=True, attention="flex_attention"), w, device)
        if "fp8" not in skip:  # train.fp8_base: the frozen base's matrix multiplies in FP8 (summarised apart)
            compiled = device.type == "cuda" and "compile" not in skip
            name = "fast_compiled_fp8_fixed" if compiled else f"fast_fp8_fixed_{budget}"  # its bf16 twin minus _fp8
            train_rep[name] = time_training(model, fixed, replace(fast, compile=compiled, fp8_base=True), w, device)
            if compiled and "pack" not in skip:
                train_rep["fast_compiled_packed_varlen_fp8_mix"] = time_training(
                    model, mixed, replace(varlen, compile=True, fp8_base=True), w, device)
    train_rep["mix_mean_tokens"] = round(sum(len(e.input_ids) for e in mixed) / len(mixed), 1)
    return train_rep


def time_liger_peer(model, examples: list[Encoded], ref: TrainConfig, w: Workload, device: torch.device) -> dict:
    """The best known peer recipe, timed in this process: Liger kernels on the transformers model (RMSNorm, RoPE,
    SwiGLU, fused linear cross-entropy: no logits held), no activation checkpointing, all of a step's examples in
    one padded micro-batch, the loss from `labels` as a Trainer computes it. Liger patches transformers' Qwen2
    classes for the rest of the process, so this arm runs last."""
    try:
        from liger_kernel.transformers import _apply_liger_kernel_to_instance
    except ImportError:
        return {"skipped": "liger-kernel is not installed"}
    from marker_lab.train.sft import apply_lora, collate

    _apply_liger_kernel_to_instance(model=model)
    _reset_peak(device)
    peft_model = apply_lora(model, ref.lora, seed=0)
    params = [p for p in peft_model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=ref.optimizer.lr, fused=device.type == "cuda")
    steps = w.warmup_steps + w.timed_steps
    per = w.examples_per_step
    stamps, losses = [], []
    peft_model.train()
    try:
        for step in range(steps):
            batch = collate(examples[step * per:(step + 1) * per], 0, device)
            labels = batch["labels"].masked_fill(batch["attention_mask"] == 0, IGNORE)
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda"):
                loss = peft_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                  labels=labels, use_cache=False).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses.append(loss.item())
            stamps.append(time.perf_counter())
        step_s = (stamps[-1] - stamps[w.warmup_steps - 1]) / w.timed_steps
        return {"step_s": round(step_s, 4), "peak_gb": _peak_gb(device), "losses": [round(x, 5) for x in losses]}
    except torch.cuda.OutOfMemoryError:
        return {"error": "out of memory", "peak_gb": _peak_gb(device)}
    finally:
        peft_model.unload()
        _reset_peak(device)


def time_generation_arms(model, prompts: list[list[int]], w: Workload, vocab: int, device: torch.device,
                         report: dict, out: Path | None, skip: set[str] = frozenset(),
                         extra: frozenset[str] = frozenset()) -> dict:
    """Stock generate on a share of the eval workload, then the fast path on all of it (saved between the two);
    then the static cache through generate (arm `via_generate`). Opt-in arms on CUDA (`extra`): `decode_layers`
    or `decode_shared_layers`, the decode step compiled per decoder layer or as one graph for all layers (instead
    of the other fast arms: see below), and `flex_decode`, flex attention in the decode step."""
    stop_ids = [vocab + 1]  # never sampled: every completion runs to max_tokens, like the baseline measurement
    gen: dict = {}
    n_base = max(1, w.baseline_gen_batch // w.samples)
    # untimed warmup: the first generate of a process pays one-off CUDA/cuBLAS setup (~10 s on an H100)
    time_generation(model, prompts[:n_base], SamplingParams(n=w.samples, max_tokens=2), w.baseline_gen_batch,
                    "dynamic", stop_ids, device)
    gen["baseline"] = time_generation(
        model, prompts[:n_base], SamplingParams(n=w.samples, temperature=1.0, max_tokens=w.baseline_gen_tokens),
        w.baseline_gen_batch, "dynamic", stop_ids, device)
    _save({**report, "generate": gen}, out)
    full = SamplingParams(n=w.samples, temperature=1.0, max_tokens=w.max_new_tokens)
    per_layer = [scope for scope in ("layers", "shared_layers") if f"decode_{scope}" in extra]
    if device.type == "cuda" and per_layer:
        # alone and first, so it pays the cold compile a first cell pays
        gen[f"fast_eval_{per_layer[0]}"] = time_generation(model, prompts, full, w.gen_batch, "static", stop_ids,
                                                           device, compile_scope=per_layer[0])
        _save({**report, "generate": {**report["generate"], **gen}}, out)
        return gen
    # the whole-model graph (eval.engine.compile_scope=model): the arms' figures since issue 21; the first batch
    # size is `fast_eval`; the per-layer scopes (the cell's default: shared_layers) are the opt-in arms above
    for batch in (w.gen_batch, *w.more_gen_batches):
        name = "fast_eval" if batch == w.gen_batch else f"fast_eval_{batch}"
        gen[name] = time_generation(model, prompts, full, batch, "static", stop_ids, device)
        _save({**report, "generate": {**report["generate"], **gen}}, out)
    if "via_generate" not in skip:  # the same static cache and compile through generate: what the loop replaced
        gen["fast_eval_via_generate"] = time_generation(model, prompts, full, w.gen_batch, "static", stop_ids, device,
                                                        static_generate=True)
        _save({**report, "generate": {**report["generate"], **gen}}, out)
    if device.type == "cuda" and "flex_decode" in extra:
        # the decode step under flex attention: its block mask skips the static cache's blocks past each step's
        # position (sdpa reads the whole cache every step) and it reads each key/value head once (GQA)
        from marker_lab.train.sft import attention_implementation

        with attention_implementation(model, "flex_attention"):
            gen["fast_eval_flex"] = time_generation(model, prompts, full, w.gen_batch, "static", stop_ids, device)
        _save({**report, "generate": {**report["generate"], **gen}}, out)
    return gen


def time_series_arms(peft_model, prompts: list[list[int]], w: Workload, vocab: int, device: torch.device) -> dict:
    """One point of an eval during training, on the training LoRA model (eval mode, not merged): stock generate,
    then the static engine twice (the first point of a stage compiles, later points reuse the graphs)."""
    stop_ids = [vocab + 1]
    params = SamplingParams(n=w.samples, temperature=1.0, max_tokens=w.series_tokens)
    batch = len(prompts) * w.samples  # a point's completions in one batch
    peft_model.eval()
    arms = {"during_training_stock": time_generation(peft_model, prompts, params, min(batch, w.baseline_gen_batch),
                                                     "dynamic", stop_ids, device)}
    for name in ("during_training_static_first", "during_training_static_later"):
        arms[name] = time_generation(peft_model, prompts, params, batch, "static", stop_ids, device)
    return arms


def _save(report: dict, out: Path | None) -> None:
    if out is not None:
        from marker_lab.results.contract import write_json_atomic

        write_json_atomic(out, report)


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
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(where)
    if args.budgets:
        w.budgets = tuple(int(b) for b in args.budgets.split(","))
    out = Path(args.out) if args.out else None
    report = run_bench(args.model, w, pick_device(args.device), {s for s in args.skip.split(",") if s}, out,
                       compile_cache, frozenset(k for k in ("flex_decode", "decode_layers", "decode_shared_layers")
                                                if getattr(args, k)))
    print(format_report(report))
    if out:
        log.info("bench report: %s", out)
