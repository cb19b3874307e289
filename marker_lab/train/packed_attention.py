"""Attention for packed training rows (`train.pack=true`, `train.attention=varlen`): each example attends only to
itself, through the examples' offsets in the row, with no mask tensor at all.

A packed micro-batch is one row of whole examples back to back (batches.collate_packed). With sdpa, transformers keeps
them apart with a dense block-diagonal mask, which takes sdpa off its flash kernel; flex attention makes the mask
block-sparse but compiles for about a minute per stage (docs/benchmarks.md). A variable-length kernel needs neither:
it takes the offsets (`cu_seq_lens`, which collate_packed adds) and runs causal attention within each example.

- On CUDA in bf16/fp16: PyTorch's flash-attention varlen kernel (`torch.nn.attention.varlen.varlen_attn`).
  Under autocast, q/k/v go to the autocast dtype first (sdpa would do the same); in float32 it refuses.
- On CPU: causal sdpa on each example in turn. Same arithmetic, no kernel: the CPU tests' reference.
"""

from __future__ import annotations

import inspect
import itertools

import torch
import torch.nn.functional as F
from transformers import AttentionInterface

try:
    from torch.nn.attention.varlen import varlen_attn
except ImportError:  # torch before 2.9 has no varlen kernel: the per-example path only
    varlen_attn = None

NAME = "varlen"
# the kernel's keywords, read once here: its causal switch changed after torch 2.10, and a compiled layer must not
# trace `inspect` at every call
KERNEL_PARAMS = frozenset(inspect.signature(varlen_attn).parameters) if varlen_attn else frozenset()


def offsets(lengths: list[int], device) -> torch.Tensor:
    """Where each example of a packed row starts, and the row's end: [0, n1, n1 + n2, ...] (int32, as the kernel
    takes them)."""
    return torch.tensor([0, *itertools.accumulate(lengths)], dtype=torch.int32).to(device, non_blocking=True)


def varlen_attention_forward(module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                             attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                             **kwargs) -> tuple[torch.Tensor, None]:
    """transformers attention interface on one packed row: query (1, H, T, D), key/value (1, KV, T, D) -> output
    (1, T, H, D). The row's example offsets come as `cu_seq_lens_q` (batches.collate_packed)."""
    cu = kwargs.get("cu_seq_lens_q")
    if cu is None or query.shape[0] != 1:
        raise ValueError("attention 'varlen' runs packed rows only: train.pack=true (the offsets come from "
                         "collate_packed)")
    unsupported = {k: kwargs[k] for k in ("sliding_window", "softcap", "s_aux") if kwargs.get(k) is not None}
    if dropout or unsupported:
        raise ValueError(f"attention 'varlen': plain causal attention only, got dropout={dropout} {unsupported}")
    q, k, v = (t[0].transpose(0, 1) for t in (query, key, value))  # (T, heads, D)
    if q.is_cuda:
        if torch.is_autocast_enabled("cuda"):  # rotary embeddings leave q and k in float32 under autocast
            q, k, v = (t.to(torch.get_autocast_dtype("cuda")) for t in (q, k, v))
        if q.dtype not in (torch.bfloat16, torch.float16) or varlen_attn is None:
            raise ValueError(f"attention 'varlen' on CUDA runs the flash varlen kernel: bf16 or fp16 (train.bf16=true "
                             f"or model.dtype), and torch >= 2.9; got {q.dtype}, torch {torch.__version__}")
        out = _flash_varlen(q, k, v, cu, scaling)
    else:
        out = _per_example(q, k, v, cu, scaling)
    return out.unsqueeze(0), None


def _flash_varlen(q, k, v, cu: torch.Tensor, scaling: float | None) -> torch.Tensor:
    params = KERNEL_PARAMS
    groups = q.shape[1] // k.shape[1]
    if groups > 1 and "enable_gqa" not in params:  # transformers' layout: query head h reads key/value head h // groups
        k, v = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
    kw = {"enable_gqa": True} if groups > 1 and "enable_gqa" in params else {}
    # causal within each example; the keyword changed after torch 2.10
    kw.update({"window_size": (-1, 0)} if "window_size" in params else {"is_causal": True})
    if "scale" in params:
        kw["scale"] = scaling
    elif scaling is not None and abs(scaling - q.shape[-1] ** -0.5) > 1e-9:
        raise ValueError(f"attention 'varlen': this torch's varlen_attn takes no scale, and the model's is {scaling}")
    # the longest example is at most the row (its length is already a compiled graph's symbolic size, so no
    # recompile when the longest example changes; the kernel skips the blocks past each example's end)
    longest = q.shape[0]
    return varlen_attn(q, k, v, cu, cu, longest, longest, **kw)


@torch.compiler.disable  # reads the offsets on the host: under compile, a graph break here, not a recompile per count
def _per_example(q, k, v, cu: torch.Tensor, scaling: float | None) -> torch.Tensor:
    bounds = cu.tolist()
    parts = []
    for start, end in zip(bounds[:-1], bounds[1:]):
        part = [t[start:end].transpose(0, 1) for t in (q, k, v)]  # (heads, n, D)
        parts.append(F.scaled_dot_product_attention(*part, is_causal=True, scale=scaling,
                                                    enable_gqa=k.shape[1] != q.shape[1]).transpose(0, 1))
    return torch.cat(parts)


def register() -> str:
    """Register `varlen` with transformers (idempotent); returns its name for `set_attn_implementation`. No mask
    function is registered: transformers then builds no mask for it, which is the point."""
    AttentionInterface.register(NAME, varlen_attention_forward)
    return NAME
