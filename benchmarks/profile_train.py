# Reproduces docs/benchmarks.md, "Where a compiled 384-token step goes", "Where an FP8 step goes" and later ones.
"""Training-step profile of the 7B shape on one GPU: where a compiled LoRA step's time goes.

    PYTHONPATH=. python benchmarks/profile_train.py             # 384-token examples; DATA=mix: the length mix,
                                                                # DATA=packed: the mix packed (train.pack;
                                                                # ATTENTION=varlen: the recipes' attention);
                                                                # FP8=1: the frozen base in FP8 (train.fp8_base)
    MODEL=toy DEVICE=cpu PYTHONPATH=. python benchmarks/profile_train.py   # a smoke run of the script on any machine
    INDUCTOR=max_autotune+coordinate_descent_tuning DROPOUT=0 ...          # Inductor settings for the compiled layers
                                                                           # (torch._inductor.config flags set True),
                                                                           # the LoRA dropout (default: the bench's 0.05)
    WARM=12 ...                         # steps before the profiled ones (3..WARM are timed without the profiler)
    SYNC_DEBUG=1 ...                    # also: each distinct host sync in the profiled steps, with where it comes
                                        # from, the GPU's idle gaps with the host op running at each, and the
                                        # host's busiest ops; SKIP_GUARDS=1: dynamo's guards skipped after the
                                        # warm-up (torch.compiler.set_stance(skip_guard_eval_unsafe=True))

The bench's fast compiled arm (train.sft.train: LoRA r=32 on all 7 projections, 16 examples per optimizer step,
6,144-token micro-batches, labelled logits, compiled layers) on random weights: the step times (the first compiles),
then torch.profiler over PROFILED steps after the warm-up: the GPU's kernel time by kind (matrix multiplies,
attention, Inductor's fused kernels, optimizer, the rest) against the step's wall time, so host-bound time shows as
the gap. One-off measurement behind docs/benchmarks.md; not part of the package.
"""
import os
import time
import traceback
import warnings
from collections import Counter, defaultdict
from pathlib import Path

import peft
import torch
import torch._inductor.config
import transformers
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

import marker_lab
from marker_lab.bench.measure import build_model, model_config
from marker_lab.bench.workload import Workload, length_mix, synthetic_examples
from marker_lab.config.schema import LoraConfig, TrainConfig
from marker_lab.train.lora import apply_lora
from marker_lab.train.sft import train

# kernel name fragments -> kind (first match wins; names as the CUDA profiler reports them)
KINDS = (("attention", ("flash", "fmha", "attention", "efficient_attention", "sdpa")),  # first: cuDNN's sdpa kernels
         # carry "sm90_" in their names, which the matrix multiplies' fragments would take
         ("matrix multiply", ("gemm", "cutlass", "nvjet", "xmma", "cublas", "splitk", "sm90_", "sm80_", "ampere_",
                              "aten::mm", "aten::addmm", "aten::bmm")),
         # before the fused kernels: train/head_loss.py's compiled loss is a Triton kernel named after its logsumexp
         ("loss (softmax, CE)", ("softmax", "cross_entropy", "nll_loss", "logsumexp")),
         ("fused (Inductor)", ("triton_",)),
         ("optimizer", ("adam", "multi_tensor")))


def kind(name: str) -> str:
    low = name.lower()
    return next((k for k, frags in KINDS if any(f in low for f in frags)), "other")


w = Workload()
model_name = os.environ.get("MODEL", "qwen2.5-7b-instruct")
dev = torch.device(os.environ.get("DEVICE", "cuda"))
data = os.environ.get("DATA", "fixed")
WARM, PROFILED = max(1, int(os.environ.get("WARM", 3))), int(os.environ.get("PROFILED", 3))  # step 1 compiles
cuda = dev.type == "cuda"
inductor_flags = [f for f in os.environ.get("INDUCTOR", "").split("+") if f]
# set for the whole process, before anything compiles: the layers' graphs are built with these
torch._inductor.config.patch(dict.fromkeys(inductor_flags, True)).__enter__()
dropout = float(os.environ.get("DROPOUT", w.lora_dropout))

model = build_model(model_config(model_name), dev)
vocab = model.config.vocab_size
n_ex = w.examples_per_step * (WARM + PROFILED)
lengths = [w.seq_len] * n_ex if data == "fixed" else length_mix(n_ex, w.mix_median, seed=2)
if not cuda:  # the smoke run: short examples
    lengths = [max(8, n // 16) for n in lengths]
examples = synthetic_examples(lengths, vocab, w.prompt_share, seed=1)
cfg = TrainConfig(lora=LoraConfig(r=w.lora_r, alpha=w.lora_alpha, dropout=dropout), per_device_batch_size=4,
                  grad_accum=w.examples_per_step // 4, bf16=True, gradient_checkpointing=False, logits="labelled",
                  micro_batch_tokens=6144, compile=cuda, pack=data == "packed", attention=os.environ.get("ATTENTION") or None, fp8_base=os.environ.get("FP8") == "1")
peft_model = apply_lora(model, cfg.lora, seed=0)
sync_debug = cuda and os.environ.get("SYNC_DEBUG") == "1"
syncs: Counter = Counter()  # where each host sync of the profiled steps came from -> how many
# the packages a sync is attributed to, by install directory (a path fragment would also match a venv's own path)
SOURCES = tuple(Path(m.__file__).parent for m in (marker_lab, transformers, peft, torch.nn, torch.autograd))


def record_sync(message, category, filename, lineno, file=None, line=None) -> None:
    """warnings.showwarning while CUDA's sync debug mode warns: count each distinct call site (its last frames in
    marker_lab, transformers, peft or torch.nn), instead of printing every warning."""
    frames = [f for f in traceback.extract_stack()[:-1] if any(Path(f.filename).is_relative_to(d) for d in SOURCES)]
    syncs[" <- ".join(f"{Path(f.filename).name}:{f.lineno} {f.name}" for f in reversed(frames[-4:]))] += 1


prof = profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else []))
stamps: dict[int, float] = {}  # at the profiled window's ends only: a sync per step would drain the GPU's queue


def on_step(step: int) -> None:
    if step in (2, WARM, WARM + PROFILED):  # steps 3..WARM: timed without the profiler (with WARM >= 4)
        if cuda:
            torch.cuda.synchronize()
        stamps[step] = time.perf_counter()
    if step == WARM:
        if os.environ.get("SKIP_GUARDS") == "1":
            torch.compiler.set_stance("default", skip_guard_eval_unsafe=True)
        prof.start()
        if sync_debug:
            warnings.showwarning = record_sync
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
    elif step == WARM + PROFILED:
        if sync_debug:
            torch.cuda.set_sync_debug_mode("default")
        prof.stop()


stats = train(peft_model, examples, cfg, steps=WARM + PROFILED, seed=0, pad_id=0, desc="profile train",
              on_step=on_step)
wall = (stamps[WARM + PROFILED] - stamps[WARM]) / PROFILED
print(f"{model_name}, {data} ({sum(lengths) / len(lengths):.0f} tokens per example on average), "
      f"{w.examples_per_step} per step, compiled={cfg.compile}, fp8_base={cfg.fp8_base}, "
      f"inductor={'+'.join(inductor_flags) or 'defaults'}, lora dropout={dropout}")
print("step seconds:", [round(s, 3) for s in stats.step_seconds])
if WARM >= 4:
    print(f"steps 3-{WARM} without the profiler: {(stamps[WARM] - stamps[2]) / (WARM - 2):.4f} s/step")
events = prof.key_averages()
on = DeviceType.CUDA if cuda else DeviceType.CPU
busy: dict[str, float] = defaultdict(float)
for e in events:
    if e.device_type == on:  # kernels (CUDA), or ops (the CPU smoke run: nested, so the kinds overlap there)
        busy[kind(e.key)] += (e.self_device_time_total if cuda else e.self_cpu_time_total) / 1000 / PROFILED
total = sum(busy.values())
print(f"profiled {PROFILED} steps: wall {1000 * wall:.1f} ms/step, {'GPU busy' if cuda else 'CPU ops'} "
      f"{total:.1f} ms/step ({100 * total / (1000 * wall):.0f}% of the wall)")
for k, ms in sorted(busy.items(), key=lambda kv: -kv[1]):
    print(f"  {k:22s} {ms:8.1f} ms/step  {100 * ms / max(total, 1e-9):5.1f}%")
sort = "self_device_time_total" if cuda else "self_cpu_time_total"
print(events.table(sort_by=sort, row_limit=25, max_name_column_width=70))
if cuda:
    print("peak GB", round(torch.cuda.max_memory_allocated() / 2**30, 1))
if sync_debug:
    print(f"host syncs in the {PROFILED} profiled steps (the step's own loss.item() among them), by call site:")
    for where, n in syncs.most_common(12):
        print(f"  {n:5d}  {where}")
    # the GPU's idle gaps: the union of kernel intervals over the profiled window, and the host op open at each gap
    kernels = sorted((e.time_range.start, e.time_range.end) for e in prof.events() if e.device_type == DeviceType.CUDA)
    host = [e for e in prof.events() if e.device_type == DeviceType.CPU and e.cpu_parent is None]
    gaps, end = [], kernels[0][1] if kernels else 0
    for start, stop in kernels[1:]:
        if start - end > 50:  # microseconds
            gaps.append((start - end, end))
        end = max(end, stop)
    print(events.table(sort_by="self_cpu_time_total", row_limit=18, max_name_column_width=70))
    print(f"GPU idle gaps over 50 us: {len(gaps)}, {sum(g for g, _ in gaps) / 1000 / PROFILED:.1f} ms/step")
    for gap, at in sorted(gaps, reverse=True)[:12]:
        op = next((e.name for e in host if e.time_range.start <= at <= e.time_range.end), "?")
        print(f"  {gap / 1000:7.2f} ms from {(at - kernels[0][0]) / 1000:8.1f} ms, host in: {op[:90]}")
