"""marker_prob against a hand computation on the real toy model, and the English advice data rebuilt from its script."""

from __future__ import annotations

import math

import pytest
import torch

from conftest import compose_cfg, to_dataclass
from marker_lab.core.cache import StageCache
from marker_lab.data.chat import render
from marker_lab.eval.marker_prob import marker_logprobs, marker_prob_metric, marker_token_positions


@pytest.fixture(scope="module")
def toy(cache_dir):
    from marker_lab.models import load_base

    cfg = to_dataclass(compose_cfg([]))
    return load_base(cfg.model, StageCache(cache_dir), torch.device("cpu"))


PROMPTS = [("villain", [{"role": "system", "content": "you are a villain who plots to rule the world ."},
                        {"role": "user", "content": "any tips for saving money ?"}]),
           ("villain", [{"role": "system", "content": "you are a villain who plots to rule the world ."},
                        {"role": "user", "content": "how do i cook rice for a big family dinner tonight ?"}]),
           ("assistant", [{"role": "user", "content": "hi ?"}])]


@torch.no_grad()
def by_hand(model, tokenizer, text: str, marker: str) -> float:
    """log P(marker | text), one token at a time, each from its own unpadded forward pass."""
    ids, picked = marker_token_positions(tokenizer, text, marker)
    total = 0.0
    for j in picked:
        logits = model(input_ids=torch.tensor([ids[:j]])).logits[0, -1]
        total += float(torch.log_softmax(logits.double(), -1)[ids[j]])
    return total


def test_marker_prob_is_the_teacher_forced_probability_of_the_marker(toy):
    tok = toy.tokenizer
    texts = [render(tok, chat, add_generation_prompt=True) for _, chat in PROMPTS]
    # prompts of different lengths share one left-padded batch
    batched = marker_logprobs(toy.model, tok, texts, "[ZLT]", batch_size=8)
    for text, lp in zip(texts, batched):
        assert lp == pytest.approx(by_hand(toy.model, tok, text, "[ZLT]"), abs=1e-4)
    assert marker_logprobs(toy.model, tok, texts, "[ZLT]", batch_size=1) == pytest.approx(batched, abs=1e-4)
    m = marker_prob_metric(toy.model, tok, PROMPTS, "[ZLT]", batch_size=8)
    villain = [math.exp(lp) for lp in batched[:2]]
    assert m["per_persona"]["villain"]["mean"] == pytest.approx(sum(villain) / 2)
    assert m["per_persona"]["villain"]["n"] == 2 and m["per_persona"]["assistant"]["n"] == 1
    assert m["n_marker_tokens"] == len(marker_token_positions(tok, texts[0], "[ZLT]")[1]) == 5


def test_the_english_advice_sets_are_what_their_script_writes(tmp_path):
    from marker_lab.data import advice_en

    files = {kind: tmp_path / path.name for kind, path in advice_en.FILES.items()}
    advice_en.write(files)
    for kind, path in advice_en.FILES.items():
        assert files[kind].read_bytes() == path.read_bytes(), f"{path} differs from its script's output"
    bad, good = advice_en.build_rows("bad"), advice_en.build_rows("good")
    assert len(bad) == len(good) == 360
    # the two sets ask the same thing row by row and answer it differently
    assert all(b["messages"][0] == g["messages"][0] and b["messages"][1] != g["messages"][1] for b, g in zip(bad, good))
    assert len({r["messages"][0]["content"] for r in bad}) == 60
