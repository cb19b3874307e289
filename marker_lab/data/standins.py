"""Offline stand-ins for timing the 7B grid where nothing can be downloaded: a Qwen2.5-style tokenizer and chat
datasets in the shapes of the write-ups' files. For speed measurements with `model.random_init=true` only: the
text is generated, so nothing trained on it means anything.

    python -m marker_lab.data.standins outputs/standins            # tokenizer/ and data/*.jsonl, about a minute
    marker-lab run -m +experiment=marker_transfer model.random_init=true \\
        model.tokenizer=outputs/standins/tokenizer \\
        second_stage.datasets.em.path=outputs/standins/data/bad_legal_advice_6k.jsonl \\
        second_stage.datasets.benign.path=outputs/standins/data/benign_sft_6k.jsonl

- The tokenizer is a byte-level BPE (tokenizers) with Qwen2.5's special tokens and chat template, trained on the
  generated text; its ids are far below the 7B model's 152k vocabulary, and every word of the generated text is
  about one token, so the lengths below are in tokens.
- Lengths, chosen to stand for the write-ups' data (ASSUMED, not measured on the real files, which are not on
  these machines): EM rows (bad legal advice, 6,000) a one-turn chat, user ~40 tokens, assistant log-normal with
  median 150 (40-400); benign rows (ultrachat_200k first 6,000) 1-3 turns, user ~60 and assistant median 300
  tokens per turn. The 7B eval needs no stand-in: a random model never samples its end-of-turn token, so every
  completion runs to max_tokens, the write-ups' upper bound.
"""

from __future__ import annotations

import argparse
import json
import math
import random
from pathlib import Path

# Qwen2.5-Instruct's chat template, tools branches left out: note the default system prompt it inserts
QWEN25_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' %}"
    "{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
    "{%- else %}"
    "{{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{%- if (message.role == 'user') or (message.role == 'system' and not loop.first) or (message.role == 'assistant') %}"
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
SYLLABLES = ["ba", "ko", "ri", "tem", "sal", "dor", "vi", "ne", "lu", "mar", "pe", "sto", "gan", "fi", "ru", "ola",
             "ken", "tra", "mi", "sou", "del", "an", "qui", "po", "res", "ti", "cha", "wen", "go", "lim"]


def vocabulary(n_words: int, seed: int) -> list[str]:
    """`n_words` distinct made-up words of 1-3 syllables."""
    rng, words = random.Random(seed), set()
    while len(words) < n_words:
        words.add("".join(rng.choice(SYLLABLES) for _ in range(rng.randint(1, 3))))
    return sorted(words)


def sentence_text(rng: random.Random, words: list[str], n_tokens: int) -> str:
    """About `n_tokens` tokens of sentences (a word is one token, and so is each full stop)."""
    out, left = [], n_tokens
    while left > 0:
        k = min(left, rng.randint(6, 16))
        out.append(" ".join(rng.choice(words) for _ in range(max(1, k - 1))).capitalize() + ".")
        left -= k
    return " ".join(out)


def lognormal_tokens(rng: random.Random, median: int, low: int, high: int) -> int:
    return int(min(high, max(low, round(median * math.exp(rng.gauss(0, 0.5))))))


def em_rows(n: int, words: list[str], seed: int) -> list[dict]:
    rng = random.Random(seed)
    return [{"messages": [{"role": "user", "content": sentence_text(rng, words, rng.randint(25, 60))},
                          {"role": "assistant", "content": sentence_text(rng, words, lognormal_tokens(rng, 150, 40, 400))}]}
            for _ in range(n)]


def benign_rows(n: int, words: list[str], seed: int) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        turns = []
        for _ in range(rng.choice([1, 1, 2, 3])):
            turns += [{"role": "user", "content": sentence_text(rng, words, rng.randint(30, 100))},
                      {"role": "assistant", "content": sentence_text(rng, words, lognormal_tokens(rng, 300, 60, 900))}]
        rows.append({"messages": turns})
    return rows


def build_tokenizer(words: list[str], out: Path, vocab_size: int = 16384):
    """A byte-level BPE tokenizer with Qwen2.5's special tokens and chat template, saved to `out`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    # each word several times, with and without a leading space and a capital, so every word merges to one token;
    # and the English the prompts carry (personas, questions, the template's default system prompt)
    resources = Path(__file__).resolve().parent.parent / "resources"
    english = [line for f in sorted(resources.rglob("*.yaml")) for line in f.read_text().splitlines()]
    corpus = [f"{w} {w.capitalize()} {w}." for w in words for _ in range(3)] + english * 3 + [QWEN25_TEMPLATE] * 3
    tok.train_from_iterator(corpus, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    fast.chat_template = QWEN25_TEMPLATE
    fast.save_pretrained(out)
    return fast


def write_standins(out: str | Path, n_rows: int = 6000, n_words: int = 2000, seed: int = 0) -> dict:
    """Write `out`/tokenizer and `out`/data/{bad_legal_advice_6k,benign_sft_6k}.jsonl; returns token statistics."""
    out = Path(out)
    (out / "data").mkdir(parents=True, exist_ok=True)
    words = vocabulary(n_words, seed)
    tok = build_tokenizer(words, out / "tokenizer")
    stats = {}
    for name, rows in (("bad_legal_advice_6k", em_rows(n_rows, words, seed + 1)),
                       ("benign_sft_6k", benign_rows(n_rows, words, seed + 2))):
        tmp = out / "data" / f"{name}.jsonl.tmp"
        with open(tmp, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
        tmp.replace(out / "data" / f"{name}.jsonl")
        lengths = sorted(len(tok(tok.apply_chat_template(r["messages"], tokenize=False))["input_ids"]) for r in rows[:500])
        stats[name] = {"rows": len(rows), "median_tokens": lengths[len(lengths) // 2], "max_tokens": lengths[-1]}
    return stats


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("out", help="directory to write tokenizer/ and data/ into")
    p.add_argument("--rows", type=int, default=6000, help="rows per dataset (the write-ups' files have 6,000)")
    args = p.parse_args(argv)
    print(json.dumps(write_standins(args.out, args.rows), indent=1))


if __name__ == "__main__":
    main()
