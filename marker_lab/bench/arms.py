"""The bench's arms: each setting it times, built from the measurements in `bench.measure` (training: stock, the
fast path at each budget, KL, compiled, packed, FP8, the Liger peer; generation: stock, the static engine, the
opt-in decode arms, one eval during training)."""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path

import torch

from marker_lab.bench.measure import peak_gb, reset_peak, save_report, time_generation, time_training
from marker_lab.bench.workload import Workload
from marker_lab.config.schema import TrainConfig
from marker_lab.data.chat import IGNORE, Encoded
from marker_lab.engines.base import SamplingParams


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
    from marker_lab.train.batches import collate
    from marker_lab.train.lora import apply_lora

    _apply_liger_kernel_to_instance(model=model)
    reset_peak(device)
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
        return {"step_s": round(step_s, 4), "peak_gb": peak_gb(device), "losses": [round(x, 5) for x in losses]}
    except torch.cuda.OutOfMemoryError:
        return {"error": "out of memory", "peak_gb": peak_gb(device)}
    finally:
        peft_model.unload()
        reset_peak(device)


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
    save_report({**report, "generate": gen}, out)
    full = SamplingParams(n=w.samples, temperature=1.0, max_tokens=w.max_new_tokens)
    per_layer = [scope for scope in ("layers", "shared_layers") if f"decode_{scope}" in extra]
    if device.type == "cuda" and per_layer:
        # alone and first, so it pays the cold compile a first cell pays
        gen[f"fast_eval_{per_layer[0]}"] = time_generation(model, prompts, full, w.gen_batch, "static", stop_ids,
                                                           device, compile_scope=per_layer[0])
        save_report({**report, "generate": {**report["generate"], **gen}}, out)
        return gen
    # the whole-model graph (eval.engine.compile_scope=model): the arms' figures since issue 21; the first batch
    # size is `fast_eval`; the per-layer scopes (the cell's default: shared_layers) are the opt-in arms above
    for batch in (w.gen_batch, *w.more_gen_batches):
        name = "fast_eval" if batch == w.gen_batch else f"fast_eval_{batch}"
        gen[name] = time_generation(model, prompts, full, batch, "static", stop_ids, device)
        save_report({**report, "generate": {**report["generate"], **gen}}, out)
    if "via_generate" not in skip:  # the same static cache and compile through generate: what the loop replaced
        gen["fast_eval_via_generate"] = time_generation(model, prompts, full, w.gen_batch, "static", stop_ids, device,
                                                        static_generate=True)
        save_report({**report, "generate": {**report["generate"], **gen}}, out)
    if device.type == "cuda" and "flex_decode" in extra:
        # the decode step under flex attention: its block mask skips the static cache's blocks past each step's
        # position (sdpa reads the whole cache every step) and it reads each key/value head once (GQA)
        from marker_lab.train.model_setup import attention_implementation

        with attention_implementation(model, "flex_attention"):
            gen["fast_eval_flex"] = time_generation(model, prompts, full, w.gen_batch, "static", stop_ids, device)
        save_report({**report, "generate": {**report["generate"], **gen}}, out)
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
