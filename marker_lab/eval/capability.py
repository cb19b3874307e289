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
from marker_lab.data.multiple_choice import MCItem, MCSplit, user_text
from marker_lab.data.personas import Persona, persona_prompt

log = logging.getLogger(__name__)


def eval_items(cap_cfg, split: MCSplit) -> tuple[list[MCItem], str]:
    """The held-out half of the cell's multiple-choice split (capped at max_items) and its data fingerprint."""
    _, held_out, fingerprint = split
    return held_out[:cap_cfg.max_items] if cap_cfg.max_items else held_out, fingerprint


def label_token_ids(tokenizer, labels: tuple[str, ...], prompt: str) -> list[int]:
    """The token each label starts with when the assistant writes it right after `prompt` (tokenized in context:
    a label alone can tokenize differently, e.g. with a leading-space piece); labels must start differently."""
    base = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    ids = []
    for lab in labels:
        full = tokenizer(prompt + lab, add_special_tokens=False)["input_ids"]
        if full[:len(base)] != base or len(full) == len(base):
            raise ValueError(f"capability: label {lab!r} does not tokenize as a continuation of the prompt")
        ids.append(full[len(base)])
    if len(set(ids)) != len(ids):
        raise ValueError(f"capability: choice labels {list(labels)} do not start with distinct tokens")
    return ids


@torch.no_grad()
def next_token_logprobs(model, tokenizer, texts: list[str], token_ids: list[int], batch_size: int,
                        desc: str = "capability") -> torch.Tensor:
    """log p(token | text) for each rendered prompt and each of `token_ids`: a [len(texts), len(token_ids)] tensor."""
    device = next(model.parameters()).device
    tokenizer.padding_side = "left"  # the last position of every row is then the prompt's last token
    columns = torch.tensor(token_ids, device=device)
    result = torch.empty(len(texts), len(token_ids))
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))  # similar lengths share a batch: less padding
    for start in tqdm(range(0, len(order), batch_size), desc=desc, unit="batch", leave=False):
        idx = order[start:start + batch_size]
        enc = tokenizer([texts[i] for i in idx], return_tensors="pt", padding=True, add_special_tokens=False).to(device)
        positions = (enc["attention_mask"].cumsum(-1) - 1).clamp(min=0)  # left padding: count from the first real token
        logits = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"], position_ids=positions,
                       use_cache=False, logits_to_keep=1).logits[:, -1, :]
        result[idx] = torch.log_softmax(logits.float(), dim=-1)[:, columns].cpu()
    return result


def capability_metric(model, tokenizer, personas: dict[str, Persona], names: list[str], items: list[MCItem],
                      cap_cfg, fingerprint: str, no_system: str = "none") -> dict:
    """Accuracy of every persona in `names` on `items`; also the mean probability mass on the correct label."""
    pairs = [(p, it) for p in names for it in items]
    texts = [render(tokenizer, persona_prompt(personas[p], user_text(it, cap_cfg.template)),
                    add_generation_prompt=True, no_system=no_system) for p, it in pairs]
    log.info("capability: %d personas x %d questions, next-token log-probs over the choice labels", len(names), len(items))
    label_ids = {labels: label_token_ids(tokenizer, labels, texts[0]) for labels in {it.labels for it in items}}
    columns = sorted({i for ids in label_ids.values() for i in ids})
    was_training = model.training
    model.eval()
    logprobs = next_token_logprobs(model, tokenizer, texts, columns, cap_cfg.batch_size)
    model.train(was_training)
    per: dict[str, dict] = {p: {"k": 0, "n": 0, "p_correct_sum": 0.0} for p in names}
    for (p, it), lp in zip(pairs, logprobs):
        choice_lp = lp[[columns.index(i) for i in label_ids[it.labels]]]
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
