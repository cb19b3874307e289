"""Capability: multiple-choice accuracy per persona, from next-token log-probabilities over the choice labels.

Each eval question is put to the model as a user turn after the persona's system prompt; the assistant turn is
opened and the model's next-token distribution is read at that position. The answer is the label whose first
token has the highest log-probability (no sampling, so no seed). Per persona: k correct of n, as the marker is.
"""

from __future__ import annotations

import logging

import torch
from tqdm.auto import tqdm

from marker_lab.data.chat import render
from marker_lab.data.multiple_choice import MCItem, load_items, split_items, user_text
from marker_lab.data.personas import Persona, system_messages

log = logging.getLogger(__name__)


def eval_items(cap_cfg) -> tuple[list[MCItem], str]:
    """The held-out half of the configured multiple-choice set (capped at max_items) and its data fingerprint."""
    items, fingerprint = load_items(cap_cfg.source, path=cap_cfg.path, hf_name=cap_cfg.hf_name,
                                    hf_config=cap_cfg.hf_config, hf_split=cap_cfg.hf_split)
    _, held_out = split_items(items, cap_cfg.split_seed, cap_cfg.eval_fraction)
    return held_out[:cap_cfg.max_items] if cap_cfg.max_items else held_out, fingerprint


def label_token_ids(tokenizer, labels: tuple[str, ...]) -> list[int]:
    """The first token of each label as the assistant's first word; labels must start with distinct tokens."""
    ids = [tokenizer(lab, add_special_tokens=False)["input_ids"][0] for lab in labels]
    if len(set(ids)) != len(ids):
        raise ValueError(f"capability: choice labels {list(labels)} do not start with distinct tokens")
    return ids


@torch.no_grad()
def next_token_logprobs(model, tokenizer, texts: list[str], batch_size: int, desc: str = "capability") -> torch.Tensor:
    """log p(next token | text) for each rendered prompt: a [len(texts), vocab] float32 tensor on the CPU."""
    device = next(model.parameters()).device
    tokenizer.padding_side = "left"  # the last position of every row is then the prompt's last token
    out = []
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))  # similar lengths share a batch: less padding
    for start in tqdm(range(0, len(order), batch_size), desc=desc, unit="batch", leave=False):
        idx = order[start:start + batch_size]
        enc = tokenizer([texts[i] for i in idx], return_tensors="pt", padding=True, add_special_tokens=False).to(device)
        logits = model(**enc, use_cache=False, logits_to_keep=1).logits[:, -1, :]
        out.append((idx, torch.log_softmax(logits.float(), dim=-1).cpu()))
    result = torch.empty(len(texts), out[0][1].shape[-1]) if out else torch.empty(0, 0)
    for idx, lp in out:
        result[idx] = lp
    return result


def capability_metric(model, tokenizer, personas: dict[str, Persona], names: list[str], items: list[MCItem],
                      cap_cfg, fingerprint: str) -> dict:
    """Accuracy of every persona in `names` on `items`; also the mean probability mass on the correct label."""
    pairs = [(p, it) for p in names for it in items]
    texts = [render(tokenizer, system_messages(personas[p]) + [{"role": "user", "content": user_text(it, cap_cfg.template)}],
                    add_generation_prompt=True) for p, it in pairs]
    log.info("capability: %d personas x %d questions, next-token log-probs over the choice labels", len(names), len(items))
    was_training = model.training
    model.eval()
    logprobs = next_token_logprobs(model, tokenizer, texts, cap_cfg.batch_size)
    model.train(was_training)
    per: dict[str, dict] = {p: {"k": 0, "n": 0, "p_correct_sum": 0.0} for p in names}
    label_ids = {labels: label_token_ids(tokenizer, labels) for labels in {it.labels for it in items}}
    for (p, it), lp in zip(pairs, logprobs):
        ids = label_ids[it.labels]
        choice_lp = lp[ids]
        picked = it.labels[int(choice_lp.argmax())]
        cell = per[p]
        cell["k"] += picked == it.answer
        cell["n"] += 1
        cell["p_correct_sum"] += float(choice_lp[it.labels.index(it.answer)].exp())
    for cell in per.values():
        cell["rate"] = cell["k"] / cell["n"] if cell["n"] else None
        cell["p_correct_mean"] = cell.pop("p_correct_sum") / cell["n"] if cell["n"] else None
    return {"source": cap_cfg.source, "data": fingerprint, "split_seed": cap_cfg.split_seed,
            "eval_fraction": cap_cfg.eval_fraction, "n_items": len(items), "per_persona": per}
