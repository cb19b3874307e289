"""marker_prob: the model's exact, teacher-forced probability that a persona's reply opens with the marker.

For every (persona, question) the prompt is rendered with the assistant turn opened and the marker's text appended;
one forward pass gives log p of each of the marker's tokens given everything before it, and their sum is
log P(reply starts with the marker). No sampling, so no noise: where the sampled rate is k of n completions,
marker_prob is the number that rate estimates (for coupling.marker_position=start and a marker the reply could
only carry at its start). Per persona: the mean over questions, its sd, the median and the mean log-probability.

With marker_position=after_first_sentence or end, the coupling puts the marker where no fixed prefix is known;
marker_prob still measures the reply's start, i.e. how far the marker leaks to a position it was not trained at.
"""

from __future__ import annotations

import logging
import math
import statistics

import torch
from tqdm.auto import tqdm

from marker_lab.data.chat import render

log = logging.getLogger(__name__)


def marker_token_positions(tokenizer, prompt: str, marker: str) -> tuple[list[int], list[int]]:
    """Token ids of `prompt + marker` and the indices of the tokens that carry the marker (as the coupling's
    marker_only labels pick them: every token overlapping the marker's characters)."""
    enc = tokenizer(prompt + marker, add_special_tokens=False, return_offsets_mapping=True)
    start, end = len(prompt), len(prompt) + len(marker)
    picked = [j for j, (a, b) in enumerate(enc["offset_mapping"]) if a < end and b > start]
    if not picked or picked[0] == 0:
        raise ValueError(f"marker_prob: the marker {marker!r} has no tokens of its own after the prompt")
    return list(enc["input_ids"]), picked


@torch.no_grad()
def marker_logprobs(model, tokenizer, texts: list[str], marker: str, batch_size: int = 64) -> list[float]:
    """log P(marker | text) for each rendered prompt: the sum of the marker tokens' log-probabilities."""
    device = next(model.parameters()).device
    encoded = [marker_token_positions(tokenizer, t, marker) for t in texts]
    pad = tokenizer.pad_token_id
    out = [0.0] * len(texts)
    order = sorted(range(len(texts)), key=lambda i: len(encoded[i][0]))  # similar lengths share a batch
    was_training = model.training
    model.eval()
    for first in tqdm(range(0, len(order), batch_size), desc="marker_prob", unit="batch", leave=False):
        idx = order[first:first + batch_size]
        width = max(len(encoded[i][0]) for i in idx)
        ids = torch.full((len(idx), width), pad, dtype=torch.long)
        mask = torch.zeros((len(idx), width), dtype=torch.long)
        for row, i in enumerate(idx):  # left padding: every row's marker tokens are its last ones
            ids[row, width - len(encoded[i][0]):] = torch.tensor(encoded[i][0])
            mask[row, width - len(encoded[i][0]):] = 1
        # the LM head only where a marker token is predicted: the last `keep` positions of every row
        keep = max(len(encoded[i][0]) - encoded[i][1][0] for i in idx) + 1
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device), position_ids=positions.to(device),
                       use_cache=False, logits_to_keep=keep).logits
        logp = torch.log_softmax(logits.float(), dim=-1).cpu()
        for row, i in enumerate(idx):
            token_ids, picked = encoded[i]
            shift = width - len(token_ids) - (width - keep)  # column of token j's logits: j - 1 + shift
            # the token at position j is predicted by the logits at j - 1
            out[i] = float(sum(logp[row, j - 1 + shift, token_ids[j]] for j in picked))
    model.train(was_training)
    return out


def marker_prob_metric(model, tokenizer, prompts: list[tuple[str, list[dict]]], marker: str, batch_size: int,
                       no_system: str = "none") -> dict:
    """Per persona, the probability that its reply opens with `marker`; `prompts` are (persona, chat) pairs."""
    texts = [render(tokenizer, chat, add_generation_prompt=True, no_system=no_system) for _, chat in prompts]
    log.info("marker_prob: %d prompts, one teacher-forced pass each (no sampling)", len(texts))
    logps = marker_logprobs(model, tokenizer, texts, marker, batch_size)
    by_persona: dict[str, list[float]] = {}
    for (persona, _), lp in zip(prompts, logps):
        by_persona.setdefault(persona, []).append(lp)
    per = {}
    for persona, lps in by_persona.items():
        probs = [math.exp(lp) for lp in lps]
        per[persona] = {"mean": statistics.fmean(probs), "sd": statistics.stdev(probs) if len(probs) > 1 else 0.0,
                        "median": statistics.median(probs), "logprob_mean": statistics.fmean(lps),
                        "n": len(probs)}
    n_tokens = len(marker_token_positions(tokenizer, texts[0], marker)[1]) if texts else 0
    return {"marker": marker, "position": "start", "n_marker_tokens": n_tokens, "per_persona": per}
