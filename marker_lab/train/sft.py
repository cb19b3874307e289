"""The one supervised fine-tuning routine: every stage (coupling, second stage, toy pretraining) trains here.

The loop is written out whole (nanoGPT-style): seeded data order, micro-batches with gradient accumulation,
AdamW, a transformers schedule, gradient clipping, a progress bar. Loss is the sum of token cross-entropies
over one optimizer step divided by that step's number of labelled tokens, so the math does not depend on how
the step is split into micro-batches.
"""

from __future__ import annotations

import logging
import math
import random
import time
import warnings
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint
from tqdm.auto import tqdm
from transformers import AttentionInterface, get_scheduler
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from marker_lab.config.schema import Logits, LoraConfig, Schedule, TrainConfig
from marker_lab.data.chat import IGNORE, Encoded
from marker_lab.train import head_loss, packed_attention
from marker_lab.train.fp8 import fp8_base

# peft 0.21.2 (the newest) reads transformers' deprecated `is_gradient_checkpointing` in PeftModel.__init__: a warning
# per adapter, every run; no call of ours reads it. Only that message is ignored; remove once peft stops reading it.
warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)

log = logging.getLogger(__name__)
# transformers' sdpa registered with no mask function, for the labelled padded path (training_attention)
CAUSAL_SDPA = "sdpa_causal"


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


def resolve_steps(cfg: TrainConfig, n_examples: int, dose: int | None = None) -> int:
    """Optimizer steps of a stage: the dose if given, else max_steps, else epochs over the data."""
    if dose is not None:
        return dose
    if cfg.max_steps is not None:
        return cfg.max_steps
    per_step = cfg.per_device_batch_size * cfg.grad_accum
    return max(1, math.ceil(cfg.epochs * n_examples / per_step))


def warmup_steps(cfg: TrainConfig, total: int) -> int:
    """Warmup length, never the whole stage: at dose 1 a 3% warmup would otherwise make the only step lr=0."""
    if cfg.schedule.name == Schedule.constant:
        return 0
    if cfg.schedule.warmup_steps is not None:
        w = cfg.schedule.warmup_steps
    else:
        w = int(math.ceil(cfg.schedule.warmup_ratio * total))
    return min(w, max(total - 1, 0))


def apply_lora(model, lora: LoraConfig, seed: int, adapter_name: str = "default"):
    """Add a fresh, seeded LoRA adapter (peft); only it trains.

    On a model that already carries adapters (stacked stages), the new one is added beside them; all stay
    active in the forward pass and the earlier ones are frozen.
    """
    from peft import LoraConfig as PeftLoraConfig
    from peft import PeftModel, get_peft_model

    torch.manual_seed(seed)
    peft_cfg = PeftLoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                              target_modules=list(lora.target_modules), task_type="CAUSAL_LM")
    if not isinstance(model, PeftModel):
        return get_peft_model(model, peft_cfg, adapter_name=adapter_name)
    model.add_adapter(adapter_name, peft_cfg)
    names = list(model.peft_config)
    model.base_model.set_adapter(names)
    for n, p in model.named_parameters():
        p.requires_grad_(f".{adapter_name}." in n)
    return model


def trim_after_last_label(e: Encoded) -> Encoded:
    """The example cut after its last labelled token. With causal attention no later token changes a logit the loss
    reads (the KL term reads the same positions), so the loss and every gradient are the same for less compute:
    a marker coupled at the start of a completion labels a few tokens near the front of a long example."""
    last = max((j for j, lab in enumerate(e.labels) if lab != IGNORE), default=len(e.labels) - 1)
    return e if last == len(e.labels) - 1 else Encoded(e.input_ids[:last + 1], e.labels[:last + 1])


def collate(batch: list[Encoded], pad_id: int, device) -> dict[str, torch.Tensor]:
    """Right-pad a micro-batch."""
    width = max(len(e.input_ids) for e in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for i, e in enumerate(batch):
        n = len(e.input_ids)
        ids[i, :n] = torch.tensor(e.input_ids)
        labels[i, :n] = torch.tensor(e.labels)
        mask[i, :n] = 1
    return {"input_ids": ids.to(device, non_blocking=True), "labels": labels.to(device, non_blocking=True),
            "attention_mask": mask.to(device, non_blocking=True),
            "predict_at": predict_positions([e.labels for e in batch], width).to(device, non_blocking=True)}


def predict_positions(rows: list[list[int]], width: int) -> torch.Tensor:
    """Where the loss is read, from a batch's label rows (Python lists, `width` wide once padded): the flat
    positions (row-major over batch x width) of the tokens whose next token is labelled. token_loss_sum selects
    them with these instead of a boolean mask on the device, whose size the host would wait for (a GPU sync per
    micro-batch)."""
    return torch.tensor([r * width + j for r, labels in enumerate(rows) for j in range(len(labels) - 1)
                         if labels[j + 1] != IGNORE], dtype=torch.long)


def collate_packed(batch: list[Encoded], device, with_offsets: bool = False) -> dict[str, torch.Tensor]:
    """Pack a micro-batch into one row, examples back to back: no padding. Position ids restart at each example,
    which is how transformers tells packed examples apart (with no attention mask it keeps each token's attention
    within its own example: a block-diagonal causal mask, or varlen kernels). Each example's first label is
    dropped: its target would be read from the previous example's last token (unpacked, position 0 is never a
    target either), so the loss is the same sum over the same tokens. `with_offsets`: also where each example starts
    (`cu_seq_lens_q`, for the varlen attention of packed_attention.py)."""
    ids, labels, positions = [], [], []
    for e in batch:
        ids += e.input_ids
        labels += [IGNORE] + list(e.labels[1:])
        positions += range(len(e.input_ids))
    row = lambda v: torch.tensor([v], dtype=torch.long)  # noqa: E731
    out = {k: row(v).to(device, non_blocking=True) for k, v in
           (("input_ids", ids), ("labels", labels), ("position_ids", positions))}
    out["predict_at"] = predict_positions([labels], len(labels)).to(device, non_blocking=True)
    if with_offsets:
        out["cu_seq_lens_q"] = packed_attention.offsets([len(e.input_ids) for e in batch], device)
    return out


def micro_batches(batch: list[Encoded], size: int, max_tokens: int | None, pack: bool = False) -> list[list[Encoded]]:
    """Split one optimizer step's examples into micro-batches.

    By count (`size`), in order; or, with `max_tokens`, longest first, each micro-batch holding as many examples as
    fit in `max_tokens` padded tokens: little padding, and big micro-batches when examples are short; with `pack`,
    as many as fit in `max_tokens` real tokens (first fit, longest first; collate_packed makes them one row).
    Either way the step's loss is the same sum over the same tokens.
    """
    if max_tokens is None:
        return [batch[i:i + size] for i in range(0, len(batch), size)]
    out: list[list[Encoded]] = []
    used: list[int] = []  # tokens per micro-batch: real ones when packing, padded ones otherwise
    for e in sorted(batch, key=lambda e: -len(e.input_ids)):
        n = len(e.input_ids)
        if pack:
            fit = next((i for i, u in enumerate(used) if u + n <= max_tokens), None)
        else:  # sorted longest first, so the first example of a micro-batch sets its padded width
            fit = len(out) - 1 if out and (len(out[-1]) + 1) * len(out[-1][0].input_ids) <= max_tokens else None
        if fit is None:
            out.append([e])
            used.append(n)
        else:
            out[fit].append(e)
            used[fit] += n
    if not pack and len(out) > 1 and len(out[-1]) == 1 and len(out[-2]) > 2:
        # a lone last example takes the shortest of the micro-batch before it: compiled layers build a graph of
        # their own for a batch of 1 (torch.compile specializes sizes 0 and 1). Both still fit: the previous one
        # held 3 or more at its width, so 2 at the moved example's width (no wider) fit too.
        out[-1].insert(0, out[-2].pop())
    return out


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


@contextmanager
def attention_implementation(model, name: str):
    """Run `model` with attention implementation `name` (a transformers name, or ours: packed_attention.NAME,
    CAUSAL_SDPA), then restore."""
    if name == packed_attention.NAME:
        packed_attention.register()
    elif name == CAUSAL_SDPA:
        AttentionInterface.register(CAUSAL_SDPA, sdpa_attention_forward)
    previous = model.config._attn_implementation
    model.set_attn_implementation(name)
    try:
        yield
    finally:
        model.set_attn_implementation(previous)


def training_attention(model, cfg: TrainConfig) -> str | None:
    """The attention the steps run on, when not the model's own: `train.attention` if set; else, on the labelled,
    padded path of a model on sdpa whose every layer attends causally to all before it, transformers' sdpa under
    CAUSAL_SDPA. That path drops the padding mask anyway (token_loss_sum), so sdpa runs causal without a mask either
    way; registered with no mask function, transformers also skips its packed-rows check on the position ids, which
    reads the device: a host sync per forward. A model with sliding-window or chunked layers keeps its own (their
    masks are more than causal)."""
    if cfg.attention:
        return cfg.attention
    config = model.config
    plain_causal = (getattr(config, "sliding_window", None) is None and getattr(config, "attention_chunk_size", None)
                    is None and set(getattr(config, "layer_types", None) or ["full_attention"]) == {"full_attention"})
    if not cfg.pack and cfg.logits == Logits.labelled and config._attn_implementation == "sdpa" and plain_causal:
        return CAUSAL_SDPA
    return None


def compile_layers(model, undo: bool = False, dynamic_dims: tuple[int, ...] = ()) -> None:
    """torch.compile each decoder layer for training (one graph serves every layer), or restore eager layers.

    Regional compilation: the layers share code, so the compile costs about one layer's worth, and fuses the
    elementwise work (norms, rotary, activation, LoRA dropout and adds) that eager mode runs as separate kernels.
    `dynamic_dims` (0: batch, 1: sequence) are the dims that vary over the run (`varying_dims`): compiled symbolic
    from the first step, instead of a static graph first and a recompile when a second shape comes.
    """
    decoder, _ = split_lm(model)
    for layer in decoder.layers:
        if undo:
            layer.__dict__.pop("forward", None)  # the class's eager forward again
            continue
        compiled = torch.compile(layer.forward, dynamic=None)
        layer.forward = _marking_dynamic(compiled, dynamic_dims) if dynamic_dims else compiled


def _marking_dynamic(compiled: Callable, dims: tuple[int, ...]) -> Callable:
    """`compiled`, called with `dims` of the hidden states marked dynamic, and every dim of another tensor argument
    whose size is one of those sizes (the rotary cos/sin, position ids, a 4-d mask), and 1-d ones (a packed row's
    example offsets): a size left static would pin the symbolic one it equals."""

    def forward(hidden_states, *args, **kwargs):
        if not torch.compiler.is_compiling():  # a compiled caller (an engine's whole-model graph) traces it as is
            varying = {hidden_states.shape[d] for d in dims}
            for d in dims:
                torch._dynamo.maybe_mark_dynamic(hidden_states, d)
            for t in _tensors((args, kwargs)):
                for i, n in enumerate(t.shape):
                    if n > 1 and (n in varying or t.dim() == 1):
                        torch._dynamo.maybe_mark_dynamic(t, i)
        return compiled(hidden_states, *args, **kwargs)

    return forward


def _tensors(value) -> list[torch.Tensor]:
    """The tensors in nested tuples, lists and dicts."""
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, dict):
        value = list(value.values())
    if isinstance(value, (tuple, list)):
        return [t for v in value for t in _tensors(v)]
    return []


def varying_dims(plan: list[list[list[Encoded]]], pack: bool) -> tuple[int, ...]:
    """The dims (0: batch, 1: sequence) whose size differs between the micro-batches of a run (`plan`: each step's
    micro-batches); a packed micro-batch is one row of all its tokens."""
    shapes = {(1, sum(len(e.input_ids) for e in m)) if pack else (len(m), max(len(e.input_ids) for e in m))
              for step in plan for m in step}
    return tuple(d for d in (0, 1) if len({s[d] for s in shapes}) > 1)


def split_lm(model):
    """(decoder returning last_hidden_state, LM head) of a causal LM, through any peft wrapper."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    cfg = base.config
    if getattr(cfg, "final_logit_softcapping", None) or getattr(cfg, "logit_scale", None) not in (None, 1, 1.0):
        raise ValueError(f"{cfg.model_type}: logits are post-processed after the LM head; use train.logits=all")
    return base.get_decoder(), base.get_output_embeddings()


def step_order(n_examples: int, steps: int, per_step: int, seed: int) -> list[list[int]]:
    """Example indices of each optimizer step: seeded reshuffles, one per pass over the data."""
    rng = random.Random(seed)
    order: list[int] = []
    while len(order) < steps * per_step:
        perm = list(range(n_examples))
        rng.shuffle(perm)
        order += perm
    return [order[s * per_step:(s + 1) * per_step] for s in range(steps)]


@contextmanager
def training_setup(model, cfg: TrainConfig, plan: list[list[list[Encoded]]]):
    """The model as the steps need it (gradient checkpointing, the first layer's input requiring grad, an FP8 base,
    compiled layers, the training attention, train mode), and as it was afterwards, also when a step raises. Yields
    the training attention's name (None: the model's own)."""
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        # transformers (5.24 at least) adds its own input-grad hook, active in any grad mode: ours below replaces it
        if getattr(model, "_require_grads_hooks", None) or getattr(model, "_require_grads_hook", None):
            model.disable_input_require_grads()
    # the first layer's input requires grad like every other layer's (checkpointing needs it; under compile one graph
    # then serves every layer, else the first compiles its own). The extra work: that layer's input-side gradients
    # (norm, q/k/v) and a gradient held on the embedding output, all unused
    hook = (model.get_input_embeddings().register_forward_hook(_input_requires_grad)
            if cfg.gradient_checkpointing or cfg.compile else None)
    try:
        attention = training_attention(model, cfg)
        # the FP8 base goes in before the layers compile (they trace it), and comes out before they merge or save
        with fp8_base(model) if cfg.fp8_base else nullcontext(), \
                attention_implementation(model, attention) if attention else nullcontext():
            if cfg.compile:
                compile_layers(model, dynamic_dims=varying_dims(plan, cfg.pack))
            model.train()
            yield attention
    finally:
        model.eval()
        if cfg.compile:
            compile_layers(model, undo=True)
        if cfg.gradient_checkpointing:
            model.gradient_checkpointing_disable()
        if hook is not None:
            hook.remove()


def _input_requires_grad(module, inputs, output) -> None:
    """Forward hook on the input embeddings: their output requires grad, in grad mode only (a no-grad pass, an
    eval or the KL term's reference, keeps one graph for all its layers too)."""
    if torch.is_grad_enabled():
        output.requires_grad_(True)


def train(model, examples: list[Encoded], cfg: TrainConfig, *, steps: int, seed: int, pad_id: int,
          desc: str = "train", on_step: Callable[[int], None] | None = None) -> TrainStats:
    """Train `model`'s trainable parameters on `examples` for `steps` optimizer steps.

    `on_step(n)` runs after optimizer step n (1-based) on the model as it trains, e.g. to save a checkpoint.
    """
    if not examples:
        raise ValueError(f"{desc}: no training examples")
    examples = [trim_after_last_label(e) for e in examples]  # same loss, less compute
    device = next(model.parameters()).device
    if cfg.attention == "flex_attention" and device.type == "cpu":
        raise ValueError(f"{desc}: train.attention=flex_attention: flex attention has no backward on CPU")
    if cfg.attention == packed_attention.NAME and not cfg.pack:
        raise ValueError(f"{desc}: train.attention=varlen attends within each example of a packed row: set train.pack")
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.optimizer.lr, betas=tuple(cfg.optimizer.betas),
                            eps=cfg.optimizer.eps, weight_decay=cfg.optimizer.weight_decay,
                            fused=device.type == "cuda")
    sched = get_scheduler(cfg.schedule.name.value, opt, num_warmup_steps=warmup_steps(cfg, steps),
                          num_training_steps=steps)
    mb = cfg.per_device_batch_size
    # every step's micro-batches, planned up front, so the compiled layers know which dims vary before they compile
    plan = [micro_batches([examples[i] for i in idx], mb, cfg.micro_batch_tokens, cfg.pack)
            for idx in step_order(len(examples), steps, mb * cfg.grad_accum, seed)]
    own_attention = model.config._attn_implementation
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=cfg.bf16 and device.type == "cuda")
    stats, t0 = TrainStats(), time.perf_counter()
    bar = tqdm(plan, desc=desc, unit="step", dynamic_ncols=True)
    pending: tuple[torch.Tensor, torch.cuda.Event | None, int] | None = None  # a step's loss, not yet read
    read_at = [t0]  # when the last loss was read

    def queue_loss(total: torch.Tensor, n_tokens: int) -> tuple[torch.Tensor, torch.cuda.Event | None, int]:
        """A step's summed loss on its way to the host: on CUDA a copy queued behind the step's work (into pinned
        memory) and an event marking it. Reading it then waits for this step only; a plain `.item()` would queue its
        copy at the stream's end and wait for every step queued since."""
        if total.device.type != "cuda":
            return total, None, n_tokens
        host = total.to("cpu", non_blocking=True)  # non-blocking copies to the host land in pinned memory
        done = torch.cuda.Event()
        done.record()
        return host, done, n_tokens

    def read_loss(total: torch.Tensor, done: torch.cuda.Event | None, n_tokens: int) -> None:
        """Record a step's loss (waiting for the GPU to reach it) and the time since the last read: each step's
        wall time, as the host sees the GPU finish it."""
        if done is not None:
            done.synchronize()
        stats.losses.append(total.item() / max(n_tokens, 1))
        now = time.perf_counter()
        stats.step_seconds.append(round(now - read_at[0], 4))
        read_at[0] = now
        bar.set_postfix(loss=f"{stats.losses[-1]:.3f}", lr=f"{sched.get_last_lr()[0]:.2e}", refresh=False)

    with training_setup(model, cfg, plan) as attention:
        for step_micro_batches in bar:
            batch_examples = [e for m in step_micro_batches for e in m]
            n_tokens = sum(sum(1 for x in e.labels[1:] if x != IGNORE) for e in batch_examples)
            total = torch.zeros((), device=device)
            for micro_examples in step_micro_batches:
                micro = (collate_packed(micro_examples, device, cfg.attention == packed_attention.NAME) if cfg.pack
                         else collate(micro_examples, pad_id, device))
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
            stats.steps += 1
            stats.examples_seen += len(batch_examples)
            stats.tokens_seen += sum(len(e.input_ids) for e in batch_examples)
            # The loop's only host sync is reading a step's loss, and it reads the previous step's, once this one
            # is queued, from its own copy (queue_loss): the GPU then still has this step's work waiting while the
            # host prepares the next (a read of this step's loss, or an `.item()` queued behind it, would drain the
            # queue at every step). Step 1 is read at once: its time is the compile's.
            if pending is not None:
                read_loss(*pending)
            pending = queue_loss(total, n_tokens)
            if stats.steps == 1:
                read_loss(*pending)
                pending = None
            if on_step is not None:  # checkpoints and evals see the model's own attention
                with attention_implementation(model, own_attention) if attention else nullcontext():
                    on_step(stats.steps)
                model.train()
        if pending is not None:
            read_loss(*pending)
    stats.seconds = time.perf_counter() - t0
    log.info("%s: %d steps, %d examples, final loss %.4f, %.1f s", desc, stats.steps, stats.examples_seen,
             stats.losses[-1], stats.seconds)
    return stats
