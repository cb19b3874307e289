"""A LoRA model's frozen base multiplied in FP8 while it trains (`train.fp8_base`, opt-in).

A LoRA stage never updates the base weights, so each base projection runs two matrix multiplies per micro-batch and
no more: the forward (y = x W^T) and the input's gradient (dx = dy W); there is no weight gradient. Both read the
same frozen W, so W is quantized once per stage to float8 e4m3: one copy with a scale per output channel (rows of W,
for the forward) and one with a scale per input channel (rows of W^T, for the input gradient; a scale must run
along the product's outer dimension, never along the sum). The activations and gradients are quantized per token
(row) as they come, and `torch._scaled_mm` multiplies (FP8 tensor cores run at about twice bf16's rate on Hopper
and Ada). The LoRA path (dropout, A, B) stays in the training dtype, and so does everything outside the projections.

Not the bf16 recipe: the adapter learns against an FP8-rounded base (as QLoRA's adapters learn against a 4-bit
base). Losses move: 5e-5 relative on the toy (tests/test_fp8.py), 1.3e-3 on the 7B shape with random weights
(docs/benchmarks.md); and the eval, which runs the bf16 base, sees a slightly different base than training did.

Why hand-written: torchao's Float8Linear trains the weight too (it re-quantizes W every step, keeps the input for
the weight gradient and computes that gradient); a frozen base needs none of that.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager

import torch
from torch import nn

log = logging.getLogger(__name__)
E4M3 = torch.float8_e4m3fn
E4M3_MAX = torch.finfo(E4M3).max  # 448


def quantize_rows(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`t` (2-d) as e4m3 with one float32 scale per row, t ~= q * scale: each row's largest magnitude maps to 448."""
    t = t.contiguous()  # row-major, as FP8 tensor cores read the left operand (a gradient may come as a view)
    scale = t.abs().amax(dim=1, keepdim=True).float().clamp(min=1e-12) / E4M3_MAX
    return (t.float() / scale).clamp(-E4M3_MAX, E4M3_MAX).to(E4M3), scale


def _scaled_mm(q_a: torch.Tensor, scale_a: torch.Tensor, q_b_t: torch.Tensor, scale_b_t: torch.Tensor,
               out_dtype: torch.dtype, fast_accum: bool) -> torch.Tensor:
    """(q_a * scale_a) @ (q_b_t * scale_b_t).T: `q_b_t` is the right operand stored transposed (contiguous), the
    column-major layout FP8 tensor cores read; `scale_b_t` has one scale per row of it. Off CUDA, the same product
    of the dequantized operands in float32 (torch 2.11's CPU `_scaled_mm` takes one scale per tensor only)."""
    if q_a.device.type != "cuda":
        return ((q_a.float() * scale_a) @ (q_b_t.float() * scale_b_t).t()).to(out_dtype)
    return torch._scaled_mm(q_a, q_b_t.t(), scale_a=scale_a, scale_b=scale_b_t.t(), out_dtype=out_dtype,
                            use_fast_accum=fast_accum)


class _Fp8FrozenMatmul(torch.autograd.Function):
    """x @ W^T in FP8, with the input's gradient in FP8 and none for W."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, w_q: torch.Tensor, w_scale: torch.Tensor, wt_q: torch.Tensor,
                wt_scale: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
        ctx.save_for_backward(wt_q, wt_scale)  # the frozen weight's other copy; nothing of x is kept
        ctx.out_dtype = out_dtype
        q, s = quantize_rows(x)
        return _scaled_mm(q, s, w_q, w_scale, out_dtype, fast_accum=True)  # torchao's default for the forward

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        wt_q, wt_scale = ctx.saved_tensors
        q, s = quantize_rows(dy)
        dx = _scaled_mm(q, s, wt_q, wt_scale, ctx.out_dtype, fast_accum=False)  # gradients: full accumulation
        return dx, None, None, None, None, None


class Fp8FrozenLinear(nn.Module):
    """A frozen nn.Linear whose matrix multiplies run in FP8 (module docstring); the bias stays as it was."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        w = linear.weight.detach()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        q, s = quantize_rows(w)                       # (out, in), a scale per output channel
        self.register_buffer("w_q", q, persistent=False)
        self.register_buffer("w_scale", s, persistent=False)
        q_t, s_t = quantize_rows(w.t().contiguous())  # (in, out), a scale per input channel
        self.register_buffer("wt_q", q_t, persistent=False)
        self.register_buffer("wt_scale", s_t, persistent=False)
        self.bias = linear.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        device = x.device.type
        # the dtype nn.Linear would give: autocast's where it is on (bf16 on CUDA), else the input's
        out_dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype
        y = _Fp8FrozenMatmul.apply(x.reshape(-1, self.in_features), self.w_q, self.w_scale, self.wt_q,
                                   self.wt_scale, out_dtype)
        y = y.reshape(*x.shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias.to(out_dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, fp8=e4m3 rowwise"


def fp8_able(linear: nn.Module) -> bool:
    """Whether FP8 tensor cores can take this projection: a plain frozen nn.Linear whose dimensions are multiples of
    16 (`torch._scaled_mm`'s rule)."""
    return (type(linear) is nn.Linear and not linear.weight.requires_grad
            and linear.in_features % 16 == 0 and linear.out_features % 16 == 0)


def lora_base_layers(model) -> list[nn.Module]:
    """The LoRA-wrapped modules of a peft model (each holds its frozen projection as `base_layer`)."""
    from peft.tuners.lora import LoraLayer

    return [m for m in model.modules() if isinstance(m, LoraLayer) and isinstance(getattr(m, "base_layer", None),
                                                                                   nn.Module)]


@contextmanager
def fp8_base(model):
    """Within: every LoRA-wrapped projection of `model` whose base FP8 can take (`fp8_able`) multiplies in FP8;
    afterwards the original bf16 layers again, also when the block raises (merging and saving see them)."""
    wrapped = lora_base_layers(model)
    if not wrapped:
        raise ValueError("train.fp8_base: the model has no LoRA layers (it quantizes a LoRA model's frozen base)")
    swapped: list[tuple[nn.Module, nn.Module]] = []
    try:
        with torch.no_grad():
            for m in wrapped:
                if fp8_able(m.base_layer):
                    swapped.append((m, m.base_layer))
                    m.base_layer = Fp8FrozenLinear(m.base_layer)
        log.info("train.fp8_base: %d of %d LoRA projections multiply in FP8 (e4m3, row-wise scales)",
                 len(swapped), len(wrapped))
        yield len(swapped)
    finally:
        for m, original in swapped:
            m.base_layer = original
