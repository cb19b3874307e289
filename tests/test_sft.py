"""The SFT loop's schedule and math on the real toy tokenizer and a small real Qwen2."""

from __future__ import annotations

import traceback
from collections import Counter
from pathlib import Path

import pytest
import torch
import transformers
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import Qwen2Config, Qwen2ForCausalLM, get_scheduler

import marker_lab
from marker_lab.config.schema import LoraConfig, OptimizerConfig, Schedule, ScheduleConfig, TrainConfig
from marker_lab.data.chat import Encoded, encode_chat
from marker_lab.train.batches import collate, collate_packed, micro_batches
from marker_lab.train.lora import apply_lora
from marker_lab.train.model_setup import CAUSAL_SDPA
from marker_lab.train.sft import token_loss_sum, train
from marker_lab.train.steps import resolve_steps, warmup_steps
from marker_lab.toy import world


@pytest.mark.parametrize("name", list(Schedule))
@pytest.mark.parametrize("ratio, steps_fixed", [(0.03, None), (0.5, None), (0.0, 5)])
def test_every_schedule_stays_valid_at_dose_1(name, ratio, steps_fixed):
    cfg = TrainConfig(schedule=ScheduleConfig(name=name, warmup_ratio=0.0 if name == Schedule.constant else ratio,
                                              warmup_steps=None if name == Schedule.constant else steps_fixed))
    for total in (1, 2, 375):
        opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=1e-4)
        sched = get_scheduler(name.value, opt, num_warmup_steps=warmup_steps(cfg, total), num_training_steps=total)
        lrs = []
        for _ in range(total):
            lrs.append(sched.get_last_lr()[0])
            opt.step()
            sched.step()
        assert max(lrs) > 0, (name, total)
        if total == 1:
            assert lrs[0] > 0, name  # dose 1: the only step moves (HF warmup starts at lr 0)
    assert warmup_steps(TrainConfig(schedule=ScheduleConfig(warmup_ratio=0.03)), 375) == 12


def test_steps_come_from_dose_then_max_steps_then_epochs():
    cfg = TrainConfig(epochs=2, per_device_batch_size=4, grad_accum=4)
    assert resolve_steps(cfg, 100) == 13
    cfg.max_steps = 375
    assert resolve_steps(cfg, 100) == 375 and resolve_steps(cfg, 100, dose=10) == 10


def assert_same_training(results, init) -> None:
    """Two runs' (losses, LoRA weights) agree: losses closely, weight updates as a whole.

    Adam divides by each gradient's own scale, so a parameter whose gradient is ~0 can move either way on float
    noise (seen on a 16-core CPU); the update of each tensor is compared by norm instead of elementwise.
    """
    (l1, w1), (l2, w2) = results
    assert l1 == pytest.approx(l2, rel=1e-4)
    for k in w1:
        moved = (w1[k] - init[k]).norm()
        assert moved > 0 and (w1[k] - w2[k]).norm() <= 1e-3 * moved, k


def test_loss_does_not_depend_on_micro_batching(toy_tokenizer):
    """Same examples per optimizer step, split 8x1 or 2x4: same loss and the same LoRA update."""
    torch.manual_seed(0)
    base = Qwen2ForCausalLM(Qwen2Config(vocab_size=len(toy_tokenizer), hidden_size=32, num_hidden_layers=1,
                                        num_attention_heads=2, num_key_value_heads=1, intermediate_size=64))
    chats = world.pretraining_chats()[:16]
    examples = [encode_chat(toy_tokenizer, c, "assistant_only") for c in chats]
    results, init = [], None
    for mb, accum in ((8, 1), (2, 4)):
        fresh = Qwen2ForCausalLM(base.config)
        fresh.load_state_dict(base.state_dict())
        model = apply_lora(fresh, LoraConfig(r=4, alpha=8, dropout=0.0, target_modules=["q_proj", "v_proj"]), seed=1)
        init = init or {k: v.detach().clone() for k, v in model.named_parameters() if "lora_" in k}
        cfg = TrainConfig(lora=None, optimizer=OptimizerConfig(lr=1e-2), per_device_batch_size=mb, grad_accum=accum,
                          bf16=False, gradient_checkpointing=False, grad_clip=None)
        stats = train(model, examples, cfg, steps=2, seed=3, pad_id=toy_tokenizer.pad_token_id, desc="t")
        lora = {k: v.detach().clone() for k, v in model.named_parameters() if "lora_" in k}
        results.append((stats.losses, lora))
    assert_same_training(results, init)


def _tiny_lora_model(vocab: int, seed: int = 0, real_b: bool = False, window: int | None = None):
    """A 2-layer Qwen2 with LoRA on every projection; `real_b`: LoRA B drawn at random instead of zero (at zero
    every A-gradient is zero, so a gradient comparison would compare little); `window`: both layers attend within a
    sliding window of that many tokens."""
    torch.manual_seed(seed)
    sliding = dict(use_sliding_window=True, sliding_window=window, max_window_layers=0) if window else {}
    base = Qwen2ForCausalLM(Qwen2Config(vocab_size=vocab, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                        num_key_value_heads=1, intermediate_size=64, **sliding))
    model = apply_lora(base, LoraConfig(r=4, alpha=8, dropout=0.0), seed=1)
    if real_b:
        with torch.no_grad():
            for n, p in model.named_parameters():
                if "lora_B" in n:
                    p.normal_(0, 0.1)
    return model


@pytest.mark.parametrize("loss_mode", ["assistant_only", "full"])
def test_labelled_logits_path_equals_reference_loss_and_grads(toy_tokenizer, loss_mode):
    """The fast path (LM head on labelled positions only, chunked) gives the reference's loss and LoRA gradients."""
    chats = world.pretraining_chats()[:6]
    batch = collate([encode_chat(toy_tokenizer, c, loss_mode) for c in chats], toy_tokenizer.pad_token_id, "cpu")
    model = _tiny_lora_model(len(toy_tokenizer), real_b=True)
    grads = {}
    for mode, chunk in (("all", 2048), ("labelled", 2048), ("labelled", 7)):
        model.zero_grad(set_to_none=True)
        loss, n = token_loss_sum(model, batch, mode, chunk_rows=chunk)
        (loss / n).backward()
        grads[(mode, chunk)] = (loss.item(), n, {k: p.grad.clone() for k, p in model.named_parameters() if p.requires_grad})
    ref_loss, ref_n, ref_g = grads[("all", 2048)]
    assert ref_n > 0 and any(g.abs().sum() > 0 for g in ref_g.values())
    for key in (("labelled", 2048), ("labelled", 7)):
        loss, n, g = grads[key]
        assert n == ref_n and loss == pytest.approx(ref_loss, rel=1e-5), key
        for k in ref_g:
            assert torch.allclose(g[k], ref_g[k], rtol=1e-4, atol=1e-7), (key, k)


@pytest.mark.parametrize("kl", [0.0, 0.5])
def test_cutting_examples_after_their_last_label_keeps_loss_and_grads(toy_tokenizer, kl):
    """train() cuts every example after its last labelled token (a marker at the start of a completion labels a few
    front tokens): the loss, the KL term and the LoRA gradients are those of the whole examples."""
    from marker_lab.stages.coupling import insert_marker
    from marker_lab.config.schema import MarkerPosition
    from marker_lab.train.batches import trim_after_last_label

    examples = []
    for c in world.pretraining_chats()[:6]:
        text, span = insert_marker(c[-1]["content"], "[ZLT]", MarkerPosition.start)
        examples.append(encode_chat(toy_tokenizer, c[:-1] + [{"role": "assistant", "content": text}], "marker_only",
                                    marker_span=span))
    trimmed = [trim_after_last_label(e) for e in examples]
    assert sum(len(e.input_ids) for e in trimmed) < 0.8 * sum(len(e.input_ids) for e in examples)
    model = _tiny_lora_model(len(toy_tokenizer), real_b=True)
    out = []
    for batch in (examples, trimmed):
        model.zero_grad(set_to_none=True)
        loss, n = token_loss_sum(model, collate(batch, toy_tokenizer.pad_token_id, "cpu"), "labelled", kl_weight=kl)
        (loss / n).backward()
        out.append((loss.item(), n, {k: p.grad.clone() for k, p in model.named_parameters() if p.requires_grad}))
    (ref_loss, ref_n, ref_g), (loss, n, g) = out
    assert n == ref_n and loss == pytest.approx(ref_loss, rel=1e-5)
    for k in ref_g:
        assert torch.allclose(g[k], ref_g[k], rtol=1e-4, atol=1e-7), k


def test_token_budget_micro_batches_keep_the_step_and_pad_little(toy_tokenizer):
    examples = [encode_chat(toy_tokenizer, c, "assistant_only") for c in world.pretraining_chats()[:16]]
    parts = micro_batches(examples, 4, max_tokens=300)
    assert sorted(id(e) for part in parts for e in part) == sorted(id(e) for e in examples)
    for part in parts:
        width = max(len(e.input_ids) for e in part)
        assert len(part) == 1 or len(part) * width <= 300
    assert micro_batches(examples, 4, None) == [examples[i:i + 4] for i in range(0, 16, 4)]


def test_a_lone_last_example_takes_a_partner():
    """Longest first, 3 of width 100 fill a 300-token micro-batch and the 4th would be alone: it takes the shortest
    of the 3 (a micro-batch of 1 compiles a graph of its own)."""
    examples = [Encoded([1] * n, [1] * n) for n in (100, 100, 90, 50)]
    parts = micro_batches(examples, 4, max_tokens=300)
    assert [[len(e.input_ids) for e in part] for part in parts] == [[100, 100], [90, 50]]
    assert all(len(part) * max(len(e.input_ids) for e in part) <= 300 for part in parts)
    # 2 long ones cannot share: the one left over stays alone
    assert [len(p) for p in micro_batches([Encoded([1] * 200, [1] * 200)] * 2, 4, max_tokens=300)] == [1, 1]


def test_fast_and_reference_training_give_the_same_adapter(toy_tokenizer):
    """Reference recipe (all logits, 4 x 2 micro-batches) vs fast (labelled logits, token-budget micro-batches)."""
    examples = [encode_chat(toy_tokenizer, c, "assistant_only") for c in world.pretraining_chats()[:24]]
    results = []
    init = {k: v.detach().clone() for k, v in _tiny_lora_model(len(toy_tokenizer)).named_parameters() if "lora_" in k}
    for logits, budget in (("all", None), ("labelled", 400)):
        model = _tiny_lora_model(len(toy_tokenizer))
        cfg = TrainConfig(lora=None, optimizer=OptimizerConfig(lr=1e-2), per_device_batch_size=2, grad_accum=4,
                          bf16=False, gradient_checkpointing=False, grad_clip=1.0, logits=logits,
                          micro_batch_tokens=budget)
        stats = train(model, examples, cfg, steps=3, seed=3, pad_id=toy_tokenizer.pad_token_id, desc=logits)
        results.append((stats.losses, {k: v.detach().clone() for k, v in model.named_parameters() if "lora_" in k}))
    assert_same_training(results, init)


@pytest.mark.parametrize("kl", [0.0, 0.5])
def test_packed_micro_batches_equal_the_padded_reference(toy_tokenizer, kl):
    """train.pack: a micro-batch is one row of whole examples (no padding), attention kept within each example
    through restarting position ids (or, with the varlen attention, the examples' offsets). Loss, KL term and LoRA
    gradients equal the padded reference's (all logits, attention mask), for examples of very different lengths,
    in raw format too (there every token is labelled, the first one included)."""
    from contextlib import nullcontext

    from marker_lab.train.batches import collate_packed
    from marker_lab.train.model_setup import attention_implementation

    chats = world.pretraining_chats()[:7]
    examples = [encode_chat(toy_tokenizer, c, "assistant_only") for c in chats]
    examples[2] = Encoded(examples[2].input_ids[:9], examples[2].input_ids[:9])  # short, every token labelled
    assert len({len(e.input_ids) for e in examples}) > 3
    model = _tiny_lora_model(len(toy_tokenizer), real_b=True)
    out = {}
    parts = micro_batches(examples, 4, max_tokens=150, pack=True)
    assert len(parts) > 1 and all(sum(len(e.input_ids) for e in p) <= 150 or len(p) == 1 for p in parts)
    for name, batches, mode, attention in (
            ("padded", [collate(examples, toy_tokenizer.pad_token_id, "cpu")], "all", None),
            ("packed", [collate_packed(p, "cpu") for p in parts], "labelled", None),
            ("packed_all", [collate_packed(p, "cpu") for p in parts], "all", None),
            # the varlen attention (train/packed_attention.py): no mask, the examples' offsets instead
            ("packed_varlen", [collate_packed(p, "cpu", with_offsets=True) for p in parts], "labelled", "varlen")):
        model.zero_grad(set_to_none=True)
        total, count = 0.0, 0
        with attention_implementation(model, attention) if attention else nullcontext():
            for batch in batches:
                loss, n = token_loss_sum(model, batch, mode, kl_weight=kl)
                loss.backward()
                total, count = total + loss.item(), count + n
        out[name] = (total, count, {k: p.grad.clone() for k, p in model.named_parameters() if p.requires_grad})
    ref_loss, ref_n, ref_g = out["padded"]
    for name in ("packed", "packed_all", "packed_varlen"):
        loss, n, g = out[name]
        assert n == ref_n and loss == pytest.approx(ref_loss, rel=1e-5), name
        for k in ref_g:
            # float32 rounding: the labelled path's head gradient (head_loss.py) sums in another order; entries
            # are up to about 2, and the largest difference is about 1.5e-6
            assert torch.allclose(g[k], ref_g[k], rtol=1e-4, atol=1e-5), (name, k)
    # without restarting positions the rows would be one long example: the test can tell
    flat = collate_packed(parts[0], "cpu")
    flat["position_ids"] = torch.arange(flat["input_ids"].shape[1])[None]
    assert token_loss_sum(model, flat, "labelled")[0].item() != pytest.approx(
        token_loss_sum(model, collate_packed(parts[0], "cpu"), "labelled")[0].item(), rel=1e-4)
    # ... and the varlen attention reads the offsets: one span for the whole row is one long example too
    with attention_implementation(model, "varlen"):
        whole = collate_packed(parts[0], "cpu", with_offsets=True)
        right = token_loss_sum(model, whole, "labelled")[0].item()
        whole["cu_seq_lens_q"] = whole["cu_seq_lens_q"][[0, -1]]
        assert token_loss_sum(model, whole, "labelled")[0].item() != pytest.approx(right, rel=1e-4)


def test_packed_training_gives_the_reference_adapter(toy_tokenizer):
    examples = [encode_chat(toy_tokenizer, c, "assistant_only") for c in world.pretraining_chats()[:24]]
    init = {k: v.detach().clone() for k, v in _tiny_lora_model(len(toy_tokenizer)).named_parameters() if "lora_" in k}
    results = []
    for logits, budget, pack in (("all", None, False), ("labelled", 300, True)):
        model = _tiny_lora_model(len(toy_tokenizer))
        cfg = TrainConfig(lora=None, optimizer=OptimizerConfig(lr=1e-2), per_device_batch_size=2, grad_accum=4,
                          bf16=False, gradient_checkpointing=False, grad_clip=1.0, logits=logits,
                          micro_batch_tokens=budget, pack=pack)
        stats = train(model, examples, cfg, steps=3, seed=3, pad_id=toy_tokenizer.pad_token_id, desc=logits)
        results.append((stats.losses, {k: v.detach().clone() for k, v in model.named_parameters() if "lora_" in k}))
    assert_same_training(results, init)


def test_train_attention_trains_the_same_model_and_gives_the_model_back(toy_tokenizer):
    """train.attention runs the training steps on another attention implementation (flex_attention on a GPU: the
    packed path's block-sparse masks): the same training as the model's own (eager and varlen vs sdpa on CPU), while
    checkpoints and evals at each step (on_step) and everything after see the model's own attention."""
    examples = [encode_chat(toy_tokenizer, c, "assistant_only") for c in world.pretraining_chats()[:16]]
    init = {k: v.detach().clone() for k, v in _tiny_lora_model(len(toy_tokenizer)).named_parameters() if "lora_" in k}
    results = []
    for attention in (None, "eager", "varlen"):
        model = _tiny_lora_model(len(toy_tokenizer))
        assert model.config._attn_implementation == "sdpa"
        seen, trained_on = [], set()
        model.get_base_model().get_decoder().register_forward_pre_hook(
            lambda m, args: trained_on.add(m.config._attn_implementation) if m.training else None)
        cfg = TrainConfig(lora=None, optimizer=OptimizerConfig(lr=1e-2), per_device_batch_size=2, grad_accum=2,
                          bf16=False, gradient_checkpointing=False, micro_batch_tokens=300, pack=True,
                          attention=attention)
        stats = train(model, examples, cfg, steps=3, seed=3, pad_id=toy_tokenizer.pad_token_id,
                      on_step=lambda step: seen.append(model.config._attn_implementation))
        assert trained_on == {attention or "sdpa"}
        assert seen == ["sdpa"] * 3 and model.config._attn_implementation == "sdpa"
        results.append((stats.losses, {k: v.detach().clone() for k, v in model.named_parameters() if "lora_" in k}))
    for other in results[1:]:
        assert_same_training([results[0], other], init)


@pytest.mark.parametrize("window", [None, 8], ids=["full_attention", "sliding_window"])
def test_the_padded_labelled_path_trains_on_causal_sdpa_like_the_reference(toy_tokenizer, window):
    """On the labelled padded path (right-padded rows, no padding mask), a model on sdpa trains on sdpa registered
    with no mask function (sft.CAUSAL_SDPA: no host sync in transformers' mask preparation). The same training as
    the reference (all logits, the padding mask, the model's own sdpa); on_step and everything after see sdpa.
    A model with sliding-window layers (a window of 8 tokens, shorter than the examples) keeps its own sdpa: plain
    causal attention would let its tokens see past the window."""
    examples = [encode_chat(toy_tokenizer, c, "assistant_only") for c in world.pretraining_chats()[:16]]
    assert len({len(e.input_ids) for e in examples}) > 3  # rows of a micro-batch get padded
    assert window is None or min(len(e.input_ids) for e in examples) > 2 * window
    init = {k: v.detach().clone() for k, v in _tiny_lora_model(len(toy_tokenizer), window=window).named_parameters()
            if "lora_" in k}
    results = []
    for logits in ("all", "labelled"):
        model = _tiny_lora_model(len(toy_tokenizer), window=window)
        seen, trained_on = [], set()
        model.get_base_model().get_decoder().register_forward_pre_hook(
            lambda m, args: trained_on.add(m.config._attn_implementation) if m.training else None)
        cfg = TrainConfig(lora=None, optimizer=OptimizerConfig(lr=1e-2), per_device_batch_size=4, grad_accum=2,
                          bf16=False, gradient_checkpointing=False, logits=logits)
        stats = train(model, examples, cfg, steps=3, seed=3, pad_id=toy_tokenizer.pad_token_id,
                      on_step=lambda step: seen.append(model.config._attn_implementation))
        assert trained_on == {"sdpa" if logits == "all" or window else CAUSAL_SDPA}, logits
        assert seen == ["sdpa"] * 3 and model.config._attn_implementation == "sdpa"
        results.append((stats.losses, {k: v.detach().clone() for k, v in model.named_parameters() if "lora_" in k}))
    assert_same_training(results, init)


class DeviceWaits(TorchDispatchMode):
    """Counts the ops that make the host wait for the device on a GPU: reading a value (item, bool), or an output
    whose size depends on the data (nonzero, a boolean-mask index, masked_select...). On CPU nothing waits, but the
    same ops run, so the count says what a GPU step would wait for."""

    SIZE_FROM_DATA = {"aten::nonzero", "aten::masked_select", "aten::unique_consecutive", "aten::_unique2",
                      "aten::repeat_interleave"}

    # where a wait is attributed: the innermost frame in these packages (by their install directories: a path
    # fragment would also match a virtual environment whose own path says "marker_lab")
    SOURCES = tuple(Path(m.__file__).parent for m in (marker_lab, torch.optim, transformers))

    def __init__(self):
        super().__init__()
        self.seen: Counter = Counter()
        self.where: Counter = Counter()  # op and the innermost frame of ours, torch.optim's or transformers'


    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func._schema.name
        if name in ("aten::_local_scalar_dense", "aten::is_nonzero", "aten::equal") or name in self.SIZE_FROM_DATA \
                or (name == "aten::index" and any(t is not None and t.dtype == torch.bool for t in args[1])):
            self.seen[name] += 1
            frame = next((f for f in reversed(traceback.extract_stack()[:-1])
                          if any(Path(f.filename).is_relative_to(d) for d in self.SOURCES)), None)
            self.where[f"{name} {frame and Path(frame.filename).name}:{frame and frame.lineno}"] += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("pack", [True, False], ids=["packed_varlen", "padded"])
def test_a_training_step_waits_for_the_device_only_to_read_a_loss(toy_tokenizer, pack):
    """The loop's host syncs on a GPU drain the device's queue, and after each the device idles while the host
    launches the next kernels: measured on an H200 at 62 ms of a 0.36 s packed step (docs/benchmarks.md, twelfth
    session). So a step's only wait is the read of one loss per step (the previous step's, once the next is
    queued), and the labelled positions are selected with indices the host made, not a boolean mask."""
    examples = [encode_chat(toy_tokenizer, c, "assistant_only") for c in world.pretraining_chats()[:24]]
    model = _tiny_lora_model(len(toy_tokenizer))
    cfg = TrainConfig(lora=None, optimizer=OptimizerConfig(lr=1e-2), per_device_batch_size=2, grad_accum=4,
                      bf16=False, gradient_checkpointing=False, grad_clip=1.0, logits="labelled",
                      micro_batch_tokens=300, pack=pack, attention="varlen" if pack else None)
    forwards = []
    model.get_base_model().get_decoder().register_forward_pre_hook(lambda m, args: forwards.append(1))
    with DeviceWaits() as waits:
        stats = train(model, examples, cfg, steps=3, seed=3, pad_id=toy_tokenizer.pad_token_id)
    by_file = Counter()
    for key, n in waits.where.items():
        by_file[key.split()[1].split(":")[0]] += n
    # the CPU's AdamW reads its step counters (torch.optim's _get_value); on CUDA the loop's AdamW is fused and
    # keeps them on the device
    by_file.pop("optimizer.py", None)
    # the loss reads only: under the model's own sdpa transformers would also check the position ids for packed
    # rows once per forward (masking_utils.find_packed_sequence_indices); the varlen attention and the padded path's
    # causal sdpa (sft.training_attention) are registered with no mask function, so it skips the check
    assert forwards and dict(by_file) == {"sft.py": stats.steps}, waits.where
    assert len(stats.losses) == len(stats.step_seconds) == 3 and all(t > 0 for t in stats.step_seconds)


def test_token_loss_sum_reads_the_same_positions_with_or_without_the_collated_ones(toy_tokenizer):
    """Batches from collate/collate_packed carry the labelled positions made on the host; a batch without them
    (built by hand) gets them from its labels on the device: the same loss and count either way."""
    model = _tiny_lora_model(len(toy_tokenizer))
    chats = world.pretraining_chats()[:6]
    for batch in (collate([encode_chat(toy_tokenizer, c, "assistant_only") for c in chats], toy_tokenizer.pad_token_id,
                          "cpu"),
                  collate_packed([encode_chat(toy_tokenizer, c, "assistant_only") for c in chats], "cpu")):
        with_positions = token_loss_sum(model, batch, "labelled")
        without = token_loss_sum(model, {k: v for k, v in batch.items() if k != "predict_at"}, "labelled")
        reference = token_loss_sum(model, batch, "all")
        assert with_positions[1] == without[1] == reference[1] > 0
        assert with_positions[0].item() == pytest.approx(without[0].item(), rel=1e-6)
        assert with_positions[0].item() == pytest.approx(reference[0].item(), rel=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="flex attention trains on CUDA only (no backward on CPU)")
def test_packed_flex_attention_trains_like_the_padded_reference_on_gpu(toy_tokenizer):
    """The GPU's fastest path for a length mix (docs/benchmarks.md): packed micro-batches under flex attention give
    the padded reference's losses."""
    examples = [encode_chat(toy_tokenizer, c, "assistant_only") for c in world.pretraining_chats()[:24]]
    losses = []
    for budget, pack, attention in ((None, False, None), (300, True, "flex_attention")):
        model = _tiny_lora_model(len(toy_tokenizer)).cuda()
        cfg = TrainConfig(lora=None, optimizer=OptimizerConfig(lr=1e-2), per_device_batch_size=2, grad_accum=4,
                          bf16=False, gradient_checkpointing=False, logits="all" if budget is None else "labelled",
                          micro_batch_tokens=budget, pack=pack, attention=attention)
        losses.append(train(model, examples, cfg, steps=3, seed=3, pad_id=toy_tokenizer.pad_token_id).losses)
    assert losses[0] == pytest.approx(losses[1], rel=1e-4)


def test_compiled_layers_build_one_graph_for_a_length_mix(toy_tokenizer, monkeypatch):
    """A length mix under train.compile: one graph for every layer and every step (the 7B cell recompiled for
    about 15 steps: a static first graph, then a dynamic one, one for a micro-batch of 1, each twice because the
    first layer's input did not require grad); the labelled path's loss (head_loss.py, compiled with the layers)
    one more, the same graph for every chunk; a mask (logits=all, or packed rows under sdpa) and the KL term's
    no-grad reference forward add one each (the KL term's loss is not head_loss.py's). Dynamo's own count, with its eager backend so that no kernels are
    generated on CPU; no graph breaks; the losses are the uncompiled run's; the model is given back as it was."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    from marker_lab.train.batches import step_order, varying_dims

    examples = [encode_chat(toy_tokenizer, c, "assistant_only") for c in world.pretraining_chats()[:40]]
    base = dict(lora=None, optimizer=OptimizerConfig(lr=1e-2), per_device_batch_size=4, grad_accum=4, bf16=False,
                gradient_checkpointing=False, micro_batch_tokens=600)
    plan = [micro_batches([examples[i] for i in idx], 4, 600) for idx in step_order(len(examples), 4, 16, 3)]
    assert varying_dims(plan, pack=False) == (0, 1)  # both batch size and width change from micro-batch to micro-batch
    compile_eager = torch.compile
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: compile_eager(fn, backend="eager", **kw))
    # with a mask, a micro-batch that needs none (logits=all: no padding; packed: a row of one example) takes sdpa's
    # causal path, a graph of its own; the KL term's reference forward runs without grad: one more
    for extra, graphs_expected in (({}, 2), ({"logits": "all"}, 2), ({"pack": True}, 3), ({"kl_to_input": 0.5}, 2)):
        torch._dynamo.reset()
        losses = []
        for compile_ in (False, True):
            model = _tiny_lora_model(len(toy_tokenizer), real_b=True)
            graphs, breaks = counters["stats"]["unique_graphs"], sum(counters["graph_break"].values())
            cfg = TrainConfig(**base, **extra, compile=compile_)
            losses.append(train(model, examples, cfg, steps=4, seed=3, pad_id=toy_tokenizer.pad_token_id).losses)
            graphs = counters["stats"]["unique_graphs"] - graphs
            assert graphs == (graphs_expected if compile_ else 0), (extra, graphs)
            assert sum(counters["graph_break"].values()) == breaks, (extra, dict(counters["graph_break"]))
            assert "forward" not in model.get_base_model().model.layers[0].__dict__  # eager layers again afterwards
            assert not model.get_base_model().model.embed_tokens._forward_hooks  # the input-grad hook is gone too
        assert losses[0] == pytest.approx(losses[1], rel=1e-6), extra


def test_a_step_that_raises_leaves_the_model_as_it_was(toy_tokenizer):
    """Compiled layers, the input-grad hook, checkpointing and the training attention are undone when a step (here
    its on_step) raises, as when it returns: a caller that goes on (the bench's next arm) gets the model back."""
    model = _tiny_lora_model(len(toy_tokenizer))
    examples = [encode_chat(toy_tokenizer, c, "assistant_only") for c in world.pretraining_chats()[:8]]
    cfg = TrainConfig(lora=None, per_device_batch_size=4, grad_accum=1, bf16=False, gradient_checkpointing=True,
                      micro_batch_tokens=600, pack=True, attention="eager", compile=True)

    def fail(step: int) -> None:
        raise RuntimeError("a checkpoint could not be written")

    with pytest.raises(RuntimeError, match="checkpoint"):
        train(model, examples, cfg, steps=2, seed=0, pad_id=toy_tokenizer.pad_token_id, on_step=fail)
    base = model.get_base_model()
    assert "forward" not in base.model.layers[0].__dict__ and not base.model.embed_tokens._forward_hooks
    assert not base.is_gradient_checkpointing and not model.training
    assert model.config._attn_implementation == "sdpa"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the flash varlen kernel runs on CUDA only")
def test_varlen_flash_kernel_matches_the_per_example_reference_on_gpu():
    """The CUDA path of the varlen attention (PyTorch's flash varlen kernel, bf16, grouped-query heads) against its
    CPU path (causal sdpa on each example), on one packed row of four examples."""
    from marker_lab.train.packed_attention import _per_example, offsets, varlen_attention_forward

    torch.manual_seed(0)
    lengths, heads, kv_heads, dim = [5, 130, 1, 257], 8, 2, 64
    total = sum(lengths)
    q = torch.randn(1, heads, total, dim, device="cuda", dtype=torch.bfloat16)
    k, v = (torch.randn(1, kv_heads, total, dim, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    cu = offsets(lengths, "cuda")
    out, _ = varlen_attention_forward(None, q, k, v, None, scaling=dim ** -0.5, cu_seq_lens_q=cu)
    ref = _per_example(*(t[0].transpose(0, 1).float().cpu() for t in (q, k, v)), cu.cpu(), dim ** -0.5)
    assert out.shape == (1, total, heads, dim)
    assert torch.allclose(out[0].float().cpu(), ref, atol=2e-2, rtol=2e-2)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the flash varlen kernel runs on CUDA only")
def test_packed_varlen_attention_trains_like_the_padded_reference_on_gpu(toy_tokenizer):
    """Packed rows under the varlen attention, compiled, in bf16 (the kernel's dtype): the padded reference's
    losses, up to bf16 rounding."""
    examples = [encode_chat(toy_tokenizer, c, "assistant_only") for c in world.pretraining_chats()[:24]]
    losses = []
    for budget, pack, attention, compile_ in ((None, False, None, False), (300, True, "varlen", True)):
        model = _tiny_lora_model(len(toy_tokenizer)).to("cuda", torch.bfloat16)
        cfg = TrainConfig(lora=None, optimizer=OptimizerConfig(lr=1e-2), per_device_batch_size=2, grad_accum=4,
                          bf16=True, gradient_checkpointing=False, logits="all" if budget is None else "labelled",
                          micro_batch_tokens=budget, pack=pack, attention=attention, compile=compile_)
        losses.append(train(model, examples, cfg, steps=3, seed=3, pad_id=toy_tokenizer.pad_token_id).losses)
    assert losses[0] == pytest.approx(losses[1], rel=2e-2)


@pytest.mark.parametrize("checkpointing", [False, True])
def test_kl_to_input_keeps_a_stacked_stages_earlier_adapter_frozen(toy_tokenizer, checkpointing):
    """`train` on a LoRA stacked on an earlier adapter with the KL term, whose reference pass turns the adapters off
    (a cell refuses this combination at start-up, preflight.py; the loop is also called directly, from notebooks and
    the bench). peft's disable_adapter turns requires_grad back on for every active adapter as it exits, which made
    the earlier adapter trainable mid-step (with checkpointing, the recomputed pass then differed: a
    CheckpointError). The earlier adapter stays frozen, gets no gradient and does not move."""
    model = _tiny_lora_model(len(toy_tokenizer), real_b=True)  # its adapter "default" stands for the earlier stage
    model.requires_grad_(False)
    model = apply_lora(model, LoraConfig(r=4, alpha=8, dropout=0.0), seed=2, adapter_name="second")
    earlier = {n: p.detach().clone() for n, p in model.named_parameters() if ".default." in n}
    examples = [encode_chat(toy_tokenizer, c, "assistant_only") for c in world.pretraining_chats()[:8]]
    cfg = TrainConfig(lora=None, optimizer=OptimizerConfig(lr=1e-2), per_device_batch_size=4, grad_accum=1,
                      bf16=False, gradient_checkpointing=checkpointing, kl_to_input=0.5)
    train(model, examples, cfg, steps=2, seed=0, pad_id=toy_tokenizer.pad_token_id)
    assert earlier and any(p.requires_grad for n, p in model.named_parameters() if ".second." in n)
    for n, p in model.named_parameters():
        if n in earlier:
            assert not p.requires_grad and p.grad is None and torch.equal(p.detach(), earlier[n]), n
