# Reproduces docs/benchmarks.md, thirteenth session, "3. What a new token count costs the host".
"""The host's time per bf16 matrix multiply on one GPU, by the token count M of the micro-batch (its rows).

    python benchmarks/matmul_host_cost.py        # one GPU; prints microseconds of host time per torch.mm call
    BLAS=cublaslt python benchmarks/matmul_host_cost.py   # the same through cuBLASLt (preferred_blas_library)

Why: in the packed length mix every micro-batch has a token count of its own, and the profile of a training step
(benchmarks/profile_train.py) showed aten::mm taking 4-5x the host time it takes on fixed 384-token examples, enough to
leave the GPU waiting. This times the 7B shape's LoRA-step products (base projection, LoRA A and B, their input
gradients and the LoRA weights' gradients) at token counts that are multiples of 128, of 8, and at odd ones, each
shape called many times in a row (as 28 layers call it), and with the token count changing between rounds (as
micro-batches do). One-off measurement behind docs/benchmarks.md; not part of the package.
"""
import os
import random
import time

import torch

H, I, R = 3584, 18944, 32  # Qwen2.5-7B hidden and MLP widths, LoRA rank
dev = torch.device("cuda")
weights = {(a, b): torch.randn(a, b, device=dev, dtype=torch.bfloat16) for a, b in
           ((H, H), (H, I), (I, H), (H, R), (R, H), (I, R), (R, I))}


def products(m: int):
    """(left, right) operand pairs of one layer's LoRA products at m tokens: forward, input gradient, weight
    gradient (a transposed left operand: the sum runs over the tokens)."""
    x, xi, z = (torch.randn(m, n, device=dev, dtype=torch.bfloat16) for n in (H, I, R))
    return [(x, weights[H, H]), (x, weights[H, I]), (xi, weights[I, H]),  # base projections
            (x, weights[H, R]), (z, weights[R, H]), (z, weights[R, I]), (xi, weights[I, R]),  # LoRA A, B
            (z.t(), x), (x.t(), z)]  # LoRA weight gradients (R x H, H x R), summed over the m tokens


def host_us(m: int, calls: int = 28) -> float:
    """Host microseconds per torch.mm call: each product `calls` times in a row, GPU work left queued."""
    pairs = products(m)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for a, b in pairs:
        for _ in range(calls):
            torch.mm(a, b)
    t1 = time.perf_counter()
    torch.cuda.synchronize()
    return 1e6 * (t1 - t0) / (calls * len(pairs))


if os.environ.get("BLAS"):  # BLAS=cublaslt: torch.backends.cuda.preferred_blas_library's other choice
    torch.backends.cuda.preferred_blas_library(os.environ["BLAS"])
for m in (6144, 6144, 5120):  # warm-up: cuBLAS handles, the allocator
    host_us(m)
print(f"torch {torch.__version__}, {torch.cuda.get_device_name()}")
for label, ms in (("fixed 6144, repeated", [6144] * 4), ("multiples of 128", [5248, 4992, 5504, 5120]),
                  ("multiples of 64", [5184, 5056, 5440, 5312]), ("multiples of 16", [5200, 5040, 5456, 5328]),
                  ("multiples of 8", [5208, 5032, 5464, 5320]), ("odd", [5217, 5031, 5463, 5319]),
                  ("odd, seen before", [5217, 5031, 5463, 5319])):
    print(f"{label:22s} " + " ".join(f"M={m}: {host_us(m):6.1f}" for m in ms) + "  us/call")

# a run's micro-batches: a token count of its own each (4,000-6,144), rounded up to a multiple of `grain` (the
# packed row padded), 40 in a row: the host's time per call over the first 10 and the last 30
rng = random.Random(0)
counts = [rng.randint(4000, 6144) for _ in range(40)]
for grain in (int(g) for g in os.environ.get("GRAINS", "1,64,256,512").split(",")):  # GRAINS=64: that one alone
    us = [host_us(-(-m // grain) * grain) for m in counts]
    print(f"a run, token counts rounded up to {grain:3d}: {len({-(-m // grain) for m in counts})} distinct; host "
          f"{sum(us[:10]) / 10:6.1f} us/call over micro-batches 1-10, {sum(us[10:]) / 30:6.1f} over 11-40")
