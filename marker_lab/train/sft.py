"""The one supervised fine-tuning routine: every stage (coupling, second stage, toy pretraining) trains here.

The loop is written out whole (nanoGPT-style) in `train`: seeded data order, micro-batches with gradient
accumulation, AdamW, a transformers schedule, gradient clipping, a progress bar. Loss is the sum of token
cross-entropies over one optimizer step divided by that step's number of labelled tokens (token_loss_sum), so the
math does not depend on how the step is split into micro-batches. The data order, micro-batches and collation are
in batches.py, the model's set-up for the steps (checkpointing, compiled layers, the training attention) in
model_setup.py, the LoRA adapter in lora.py.
"""

from __future__ import annotations

import logging
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint
from tqdm.auto import tqdm
from transformers import get_scheduler

from marker_lab.config.schema import TrainConfig
from marker_lab.data.chat import IGNORE, Encoded
from marker_lab.train import head_loss
from marker_lab.train.batches import collate, collate_micro_batch, plan_steps, trim_after_last_label
from marker_lab.train.model_setup import attention_implementation, check_attention, split_lm, training_setup
from marker_lab.train.steps import warmup_steps

log = logging.getLogger(__name__)


@dataclass
class TrainStats:
    steps: int = 0
    examples_seen: int = 0
    tokens_seen: int = 0
    seconds: float = 0.0
    losses: list[float] = field(default_factory=list)  # one per optimizer step
    # wall time of each optimizer step, from one loss read to the next (the first compiles; from the second on, each
    # loss is read once the next step is queued, so a step's time is when the host saw the GPU finish it)
    step_seconds: list[float] = field(default_factory=list)

    def count_step(self, batch_examples: list[Encoded]) -> None:
        """One optimizer step done, on these examples."""
        self.steps += 1
        self.examples_seen += len(batch_examples)
        self.tokens_seen += sum(len(e.input_ids) for e in batch_examples)


def token_loss_sum(model, batch: dict[str, torch.Tensor], logits: str = "all", chunk_rows: int = 2048,
                   kl_weight: float = 0.0, compiled: bool = False) -> tuple[torch.Tensor, int]:
    """Sum of next-token cross-entropies over labelled positions, and how many there were.

    logits="all" is the reference: the model's forward computes every position's logits. logits="labelled" runs
    the decoder on the right-padded batch without a padding mask, keeps the hidden states at labelled positions
    only and applies the LM head to them in chunks, so a 152k-vocabulary logit tensor is never held for the whole
    micro-batch: a frozen plain head through head_loss.py (the input gradient computed in the forward; `compiled`:
    its softmax fused by torch.compile, as train.compile does for the layers), any other head with each chunk
    recomputed in backward. Same loss (the LM head is a plain linear map on the last hidden state in
    Llama/Qwen-style models).
    With `kl_weight` > 0 (a peft model), adds kl_weight x KL(model || input model) summed over the same positions;
    the input model's states come from one extra no-grad forward with the adapters disabled.
    """
    # a padded batch has an attention mask; a packed one (collate_packed) position ids instead, which transformers
    # reads as packed only without a KV cache (none is needed in training)
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids", "cu_seq_lens_q") if k in batch}
    inputs["use_cache"] = False
    if logits == "all":
        targets = batch["labels"][:, 1:]
        keep = targets != IGNORE
        out = model(**inputs).logits[:, :-1]
        loss = F.cross_entropy(out.flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE, reduction="sum")
        if kl_weight:
            with torch.no_grad(), input_model(model):
                ref = model(**inputs).logits[:, :-1]
            loss = loss + kl_weight * _kl_sum(out[keep].float(), ref[keep].float())
        return loss, int(keep.sum())
    decoder, head = split_lm(model)
    # batches are right-padded (collate), and under causal attention no real token can see a pad to its right, so
    # the padding mask changes nothing we keep; without it sdpa runs its fused causal kernel instead of the masked,
    # key/value-copying path (2.5x slower on the 7B length mix, docs/benchmarks.md)
    inputs.pop("attention_mask", None)
    hidden = decoder(**inputs).last_hidden_state
    # the positions to read, as flat indices: the collate functions' (host-made, so no sync), else from the labels
    at = batch.get("predict_at")
    if at is None:
        at = F.pad(batch["labels"][:, 1:] != IGNORE, (0, 1)).flatten().nonzero().squeeze(1)
    flat = lambda x: x.flatten(0, 1).index_select(0, at)  # noqa: E731
    h, t = flat(hidden), batch["labels"].flatten().index_select(0, at + 1)
    h_ref = None
    if kl_weight:
        with torch.no_grad(), input_model(model):
            h_ref = flat(decoder(**inputs).last_hidden_state)
    if h_ref is None and head_loss.applies_to(head):
        return head_loss.head_cross_entropy_sum(head, h, t, chunk_rows, compiled), len(t)
    loss = hidden.new_zeros((), dtype=torch.float32)
    for i in range(0, len(t), chunk_rows):
        part = slice(i, i + chunk_rows)
        if h_ref is None:
            loss = loss + checkpoint(_head_ce_sum, head, h[part], t[part], use_reentrant=False)
        else:
            loss = loss + checkpoint(_head_ce_kl_sum, head, h[part], t[part], h_ref[part], kl_weight, use_reentrant=False)
    return loss, len(t)


@contextmanager
def input_model(model):
    """`model` (a peft model) with its adapters off, i.e. the input model (the KL term's reference), and afterwards
    every parameter's requires_grad as it was: on exit peft's disable_adapter (0.21) turns requires_grad on for every
    active adapter, which would make a stacked stage's frozen earlier adapter trainable."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    try:
        with model.disable_adapter():
            yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


def _head_ce_sum(head, h: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(head(h).float(), t, reduction="sum")


def _head_ce_kl_sum(head, h: torch.Tensor, t: torch.Tensor, h_ref: torch.Tensor, weight: float) -> torch.Tensor:
    logits = head(h).float()
    with torch.no_grad():
        ref = head(h_ref).float()
    return F.cross_entropy(logits, t, reduction="sum") + weight * _kl_sum(logits, ref)


def _kl_sum(logits: torch.Tensor, ref_logits: torch.Tensor) -> torch.Tensor:
    """Sum over rows of KL(softmax(logits) || softmax(ref_logits))."""
    logp, logq = F.log_softmax(logits, -1), F.log_softmax(ref_logits, -1)
    return (logp.exp() * (logp - logq)).sum()


@torch.no_grad()
def kl_to_input(model, examples: list[Encoded], pad_id: int, batch_size: int = 32) -> float:
    """Mean per-token KL(model || input model) over the labelled positions of `examples` (a peft model: the input
    model is the same model with its adapters disabled). A diagnostic of how far a stage moved the outputs."""
    device = next(model.parameters()).device
    total, n = 0.0, 0
    model.eval()
    for i in range(0, len(examples), batch_size):
        batch = collate(examples[i:i + batch_size], pad_id, device)
        keep = batch["labels"][:, 1:] != IGNORE
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
        with input_model(model):
            ref = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
        total += float(_kl_sum(out[keep].float(), ref[keep].float()))
        n += int(keep.sum())
    return total / max(n, 1)


def optimizer_and_schedule(params: list[torch.nn.Parameter], cfg: TrainConfig, steps: int, device: torch.device):
    """AdamW on `params` (fused on CUDA) and the recipe's transformers schedule over `steps` optimizer steps."""
    opt = torch.optim.AdamW(params, lr=cfg.optimizer.lr, betas=tuple(cfg.optimizer.betas),
                            eps=cfg.optimizer.eps, weight_decay=cfg.optimizer.weight_decay,
                            fused=device.type == "cuda")
    sched = get_scheduler(cfg.schedule.name.value, opt, num_warmup_steps=warmup_steps(cfg, steps),
                          num_training_steps=steps)
    return opt, sched


class LossReader:
    """Each step's loss and wall time into `stats`, read one step late.

    The loop's only host sync is reading a step's loss, and it reads the previous step's, once this one is queued,
    from its own copy (queue): the GPU then still has this step's work waiting while the host prepares the next (a
    read of this step's loss, or an `.item()` queued behind it, would drain the queue at every step). Step 1 is read
    at once: its time is the compile's.
    """

    def __init__(self, stats: TrainStats, bar: tqdm, sched, t0: float):
        self.stats, self.bar, self.sched = stats, bar, sched
        self.pending: tuple[torch.Tensor, torch.cuda.Event | None, int] | None = None  # a step's loss, not yet read
        self.read_at = t0  # when the last loss was read

    def step_done(self, total: torch.Tensor, n_tokens: int) -> None:
        """After an optimizer step (counted in `stats`): read the previous step's loss, queue this one's."""
        if self.pending is not None:
            self.read(*self.pending)
        self.pending = self.queue(total, n_tokens)
        if self.stats.steps == 1:
            self.read(*self.pending)
            self.pending = None

    def flush(self) -> None:
        """Read the last step's loss, after the loop."""
        if self.pending is not None:
            self.read(*self.pending)
            self.pending = None

    @staticmethod
    def queue(total: torch.Tensor, n_tokens: int) -> tuple[torch.Tensor, torch.cuda.Event | None, int]:
        """A step's summed loss on its way to the host: on CUDA a copy queued behind the step's work (into pinned
        memory) and an event marking it. Reading it then waits for this step only; a plain `.item()` would queue its
        copy at the stream's end and wait for every step queued since."""
        if total.device.type != "cuda":
            return total, None, n_tokens
        host = total.to("cpu", non_blocking=True)  # non-blocking copies to the host land in pinned memory
        done = torch.cuda.Event()
        done.record()
        return host, done, n_tokens

    def read(self, total: torch.Tensor, done: torch.cuda.Event | None, n_tokens: int) -> None:
        """Record a step's loss (waiting for the GPU to reach it) and the time since the last read: each step's
        wall time, as the host sees the GPU finish it."""
        if done is not None:
            done.synchronize()
        self.stats.losses.append(total.item() / max(n_tokens, 1))
        now = time.perf_counter()
        self.stats.step_seconds.append(round(now - self.read_at, 4))
        self.read_at = now
        self.bar.set_postfix(loss=f"{self.stats.losses[-1]:.3f}", lr=f"{self.sched.get_last_lr()[0]:.2e}",
                             refresh=False)


def train(model, examples: list[Encoded], cfg: TrainConfig, *, steps: int, seed: int, pad_id: int,
          desc: str = "train", on_step: Callable[[int], None] | None = None) -> TrainStats:
    """Train `model`'s trainable parameters on `examples` for `steps` optimizer steps.

    `on_step(n)` runs after optimizer step n (1-based) on the model as it trains, e.g. to save a checkpoint.
    """
    if not examples:
        raise ValueError(f"{desc}: no training examples")
    examples = [trim_after_last_label(e) for e in examples]  # same loss, less compute
    device = next(model.parameters()).device
    check_attention(cfg, device, desc)
    params = [p for p in model.parameters() if p.requires_grad]
    opt, sched = optimizer_and_schedule(params, cfg, steps, device)
    plan = plan_steps(examples, cfg, steps, seed)  # every step's micro-batches
    own_attention = model.config._attn_implementation
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=cfg.bf16 and device.type == "cuda")
    stats, t0 = TrainStats(), time.perf_counter()
    bar = tqdm(plan, desc=desc, unit="step", dynamic_ncols=True)
    losses = LossReader(stats, bar, sched, t0)
    with training_setup(model, cfg, plan) as attention:
        for step_micro_batches in bar:
            batch_examples = [e for m in step_micro_batches for e in m]
            n_tokens = sum(sum(1 for x in e.labels[1:] if x != IGNORE) for e in batch_examples)
            total = torch.zeros((), device=device)
            for micro_examples in step_micro_batches:
                micro = collate_micro_batch(micro_examples, cfg, pad_id, device)
                with autocast:
                    loss_sum, _ = token_loss_sum(model, micro, cfg.logits, kl_weight=cfg.kl_to_input,
                                                 compiled=cfg.compile)
                (loss_sum / max(n_tokens, 1)).backward()
                total += loss_sum.detach()
            if cfg.grad_clip is not None:
                torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            stats.count_step(batch_examples)
            losses.step_done(total, n_tokens)  # reads the previous step's loss: the loop's only host sync
            if on_step is not None:  # checkpoints and evals see the model's own attention
                with attention_implementation(model, own_attention) if attention else nullcontext():
                    on_step(stats.steps)
                model.train()
        losses.flush()
    stats.seconds = time.perf_counter() - t0
    log.info("%s: %d steps, %d examples, final loss %.4f, %.1f s", desc, stats.steps, stats.examples_seen,
             stats.losses[-1], stats.seconds)
    return stats
