"""head_loss.py: the LM head's summed cross-entropy with its input gradient computed in the forward equals autograd's
through the plain head (loss and gradient), in several chunks, eager and compiled, with and without grad."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from marker_lab.train.head_loss import applies_to, head_cross_entropy_sum


def _reference(head: nn.Linear, h: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Loss and dLoss/dh through autograd: the head's logits upcast to float32, cross-entropy summed."""
    h = h.detach().requires_grad_(True)
    loss = F.cross_entropy(head(h).float(), t, reduction="sum")
    loss.backward()
    return loss.detach(), h.grad


def _head_and_rows(rows: int = 37, hidden: int = 24, vocab: int = 101, bias: bool = False, seed: int = 0):
    torch.manual_seed(seed)
    head = nn.Linear(hidden, vocab, bias=bias).requires_grad_(False)
    return head, torch.randn(rows, hidden) * 2, torch.randint(0, vocab, (rows,))


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
@pytest.mark.parametrize("bias", [False, True], ids=["no_bias", "bias"])
def test_the_loss_and_its_input_gradient_equal_autograds(compiled, bias):
    head, h, t = _head_and_rows(bias=bias)
    ref_loss, ref_grad = _reference(head, h, t)
    x = h.clone().requires_grad_(True)
    loss = head_cross_entropy_sum(head, x, t, chunk_rows=16, compiled=compiled)  # chunks of 16, 16 and 5 rows
    (loss * 0.25).backward()  # the loop divides by the step's token count: the gradient scales with it
    assert loss.item() == pytest.approx(ref_loss.item(), rel=1e-6)
    assert torch.allclose(x.grad, 0.25 * ref_grad, rtol=1e-5, atol=1e-7)
    assert head.weight.grad is None  # the frozen head gets none


def test_in_bf16_the_gradient_keeps_the_loops_scale():
    """The loop backpropagates loss / token count. In bf16 that factor must not be rounded to bf16 (1/3 would
    become 0.33398, every gradient 0.2% too large): the gradient's overall scale matches autograd's to 1e-3."""
    head, h, t = _head_and_rows(rows=300, hidden=64, vocab=500)
    head, h = head.to(torch.bfloat16), h.to(torch.bfloat16)
    ref = h.detach().clone().requires_grad_(True)
    (F.cross_entropy(head(ref).float(), t, reduction="sum") / 3).backward()
    x = h.detach().clone().requires_grad_(True)
    (head_cross_entropy_sum(head, x, t, chunk_rows=128) / 3).backward()
    a, b = x.grad.double(), ref.grad.double()
    assert (a * b).sum() / (b * b).sum() == pytest.approx(1.0, abs=1e-3)


def test_without_grad_it_is_the_loss_alone():
    head, h, t = _head_and_rows()
    with torch.no_grad():
        loss = head_cross_entropy_sum(head, h, t, chunk_rows=8)
    assert not loss.requires_grad and loss.item() == pytest.approx(_reference(head, h, t)[0].item(), rel=1e-6)


def test_it_applies_to_frozen_plain_heads_only():
    head = nn.Linear(8, 16, bias=False).requires_grad_(False)
    assert applies_to(head)
    assert not applies_to(nn.Linear(8, 16, bias=False))  # trained: its weight needs a gradient this path skips
    assert not applies_to(nn.Sequential(head))  # wrapped (a LoRA on the head, say): token_loss_sum's other path


@pytest.mark.skipif(not torch.cuda.is_available(), reason="bf16 autocast and Inductor's GPU kernels need CUDA")
def test_compiled_under_bf16_autocast_equals_autograd_on_gpu():
    """The training path's numerics on a GPU: bf16 logits under autocast, softmax in float32, the gradient in bf16;
    against autograd through the same bf16 head."""
    head, h, t = _head_and_rows(rows=3000, hidden=256, vocab=32000)
    head, h, t = head.cuda().to(torch.bfloat16), h.cuda().to(torch.bfloat16), t.cuda()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        ref_loss, ref_grad = _reference(head, h, t)
        x = h.clone().requires_grad_(True)
        loss = head_cross_entropy_sum(head, x, t, chunk_rows=2048, compiled=True)
    loss.backward()
    assert loss.item() == pytest.approx(ref_loss.item(), rel=1e-4)
    assert x.grad.dtype == torch.bfloat16
    assert torch.allclose(x.grad.float(), ref_grad.float(), rtol=2e-2, atol=1e-3)
