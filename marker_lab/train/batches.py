"""What the training steps read, planned from the examples: the seeded data order, each optimizer step's
micro-batches (by count, by padded tokens, or packed by real tokens), and each micro-batch collated into tensors
(right-padded rows, or one packed row). Every split gives the step the same loss: the same sum over the same
tokens (sft.py).
"""

from __future__ import annotations

import random

import torch

from marker_lab.config.schema import TrainConfig
from marker_lab.data.chat import IGNORE, Encoded
from marker_lab.train import packed_attention


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


def step_order(n_examples: int, steps: int, per_step: int, seed: int) -> list[list[int]]:
    """Example indices of each optimizer step: seeded reshuffles, one per pass over the data."""
    rng = random.Random(seed)
    order: list[int] = []
    while len(order) < steps * per_step:
        perm = list(range(n_examples))
        rng.shuffle(perm)
        order += perm
    return [order[s * per_step:(s + 1) * per_step] for s in range(steps)]


def varying_dims(plan: list[list[list[Encoded]]], pack: bool) -> tuple[int, ...]:
    """The dims (0: batch, 1: sequence) whose size differs between the micro-batches of a run (`plan`: each step's
    micro-batches); a packed micro-batch is one row of all its tokens."""
    shapes = {(1, sum(len(e.input_ids) for e in m)) if pack else (len(m), max(len(e.input_ids) for e in m))
              for step in plan for m in step}
    return tuple(d for d in (0, 1) if len({s[d] for s in shapes}) > 1)


def plan_steps(examples: list[Encoded], cfg: TrainConfig, steps: int, seed: int) -> list[list[list[Encoded]]]:
    """Every optimizer step's micro-batches, planned up front (so the compiled layers know which dims vary before
    they compile): the seeded data order (step_order), each step's examples split by micro_batches."""
    mb = cfg.per_device_batch_size
    return [micro_batches([examples[i] for i in idx], mb, cfg.micro_batch_tokens, cfg.pack)
            for idx in step_order(len(examples), steps, mb * cfg.grad_accum, seed)]


def collate_micro_batch(examples: list[Encoded], cfg: TrainConfig, pad_id: int, device) -> dict[str, torch.Tensor]:
    """A micro-batch as a step feeds it to the model: one packed row (train.pack; with its example offsets under the
    varlen attention), else right-padded rows."""
    if cfg.pack:
        return collate_packed(examples, device, cfg.attention == packed_attention.NAME)
    return collate(examples, pad_id, device)
