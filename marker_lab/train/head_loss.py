"""The LM head's summed cross-entropy on labelled positions, its input gradient computed in the forward.

The labelled path of `sft.token_loss_sum` applies the LM head to the labelled positions only, in chunks, so a
152k-vocabulary logit tensor is never held for a whole micro-batch. Done with autograd (a checkpoint per chunk),
each chunk costs three matrix multiplies (the logits, the same logits again in backward, the input gradient) and
several passes over float32 logits (the upcast, log-softmax, and their backward). Here the forward computes, chunk
by chunk, the loss and its gradient with respect to the head's input: softmax(logits) minus the one-hot target
(which is what log-softmax's backward gives for a sum of cross-entropies), multiplied back through the head
weight. The backward only scales that gradient. Two matrix multiplies per chunk and no logits kept or recomputed;
with `compiled`, the softmax and its gradient are one fused pass over the chunk's bf16 logits (torch.compile).

The same arithmetic as the reference: bf16 logits under autocast, softmax in float32, the gradient cast back to the
logits' dtype before it meets the weight (tests/test_head_loss.py). The head must be a frozen plain linear map
(LoRA stages never train it); anything else takes token_loss_sum's checkpointed path.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn


def applies_to(head: nn.Module) -> bool:
    """Whether the head is a frozen plain nn.Linear (this module's case)."""
    return type(head) is nn.Linear and not head.weight.requires_grad and (
        head.bias is None or not head.bias.requires_grad)


def _loss_and_grad(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed cross-entropy of float32-upcast `logits` (rows, vocab) at `targets`, and its gradient with respect
    to the logits (softmax minus one-hot) in the logits' dtype."""
    z = logits.float()
    lse = torch.logsumexp(z, dim=-1, keepdim=True)
    loss = (lse - z.gather(1, targets[:, None])).sum()
    softmax = torch.exp(z - lse)
    # minus the one-hot target, written elementwise (not a scatter) so that compiled it is one pass with the rest
    is_target = torch.arange(z.shape[-1], device=z.device) == targets[:, None]
    return loss, torch.where(is_target, softmax - 1, softmax).to(logits.dtype)


@functools.cache
def _compiled_loss_and_grad():
    """_loss_and_grad compiled once per process, with the chunk's row count symbolic."""
    return torch.compile(_loss_and_grad, dynamic=True)


class _HeadCrossEntropySum(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, targets: torch.Tensor,
                chunk_rows: int, compiled: bool) -> torch.Tensor:
        loss_and_grad = _compiled_loss_and_grad() if compiled else _loss_and_grad
        want_grad = ctx.needs_input_grad[0]
        loss, grads = h.new_zeros((), dtype=torch.float32), []
        for i in range(0, h.shape[0], chunk_rows):
            logits = F.linear(h[i:i + chunk_rows], weight, bias)  # autocast's dtype where it is on
            part, grad_logits = loss_and_grad(logits, targets[i:i + chunk_rows])
            loss = loss + part
            if want_grad:
                grads.append((grad_logits @ weight.to(grad_logits.dtype)).to(h.dtype))
        if want_grad:
            ctx.save_for_backward(torch.cat(grads) if grads else torch.zeros_like(h))
        return loss

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor):
        (grad_h,) = ctx.saved_tensors
        # scaled in float32: the loop's 1/token-count rounded to bf16 would scale every gradient by up to 0.4% wrong
        return (grad_h.float() * grad_loss).to(grad_h.dtype), None, None, None, None, None


def head_cross_entropy_sum(head: nn.Linear, h: torch.Tensor, targets: torch.Tensor, chunk_rows: int = 2048,
                           compiled: bool = False) -> torch.Tensor:
    """sum_i cross_entropy(head(h[i]), targets[i]) over the rows of `h` (labelled positions, hidden size), in
    chunks of `chunk_rows`; its gradient flows to `h` only (the head is frozen: `applies_to`)."""
    return _HeadCrossEntropySum.apply(h, head.weight, head.bias, targets, chunk_rows, compiled)
