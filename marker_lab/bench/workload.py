"""`marker-lab bench`'s workload: the write-ups' cell (000) in numbers, and the synthetic examples that stand for its
data (random tokens cost what real ones cost per step)."""

from __future__ import annotations

import random
from dataclasses import dataclass

from marker_lab.data.chat import IGNORE, Encoded


@dataclass
class Workload:
    """The write-ups' cell (000): one 375-step LoRA stage, then 11 personas x 28 questions x 10 samples."""
    steps: int = 375  # optimizer steps of the second stage
    examples_per_step: int = 16  # per_device 4 x accumulation 4 in the recipe
    seq_len: int = 384  # tokens per training example (fixed-length run)
    mix_median: int = 280  # median length of the realistic mix (log-normal, 64..1024 tokens)
    prompt_share: float = 0.25  # leading tokens of an example that carry no loss (system + user turns)
    lora_r: int = 32
    lora_alpha: int = 64
    lora_dropout: float = 0.05
    eval_prompts: int = 308  # 11 personas x 28 questions
    samples: int = 10  # completions per prompt
    max_new_tokens: int = 512
    prompt_len: tuple[int, int] = (40, 90)  # chat prompt lengths, uniform
    baseline_gen_batch: int = 280  # stock generate: sequences per batch
    baseline_gen_tokens: int = 256  # stock generate: new tokens timed
    gen_batch: int = 1030  # fast engine: sequences per batch (3 batches for the eval)
    more_gen_batches: tuple[int, ...] = ()  # further fast-engine batch sizes timed on the same eval (one arm each)
    series_prompts: int = 56  # evals during training: a point's prompts (2 personas x 28 questions) x samples
    series_tokens: int = 128  # ... new tokens per completion (timed: stock generate vs the static engine)
    warmup_steps: int = 2  # untimed optimizer steps before each timed run
    timed_steps: int = 5
    budgets: tuple[int, ...] = (6144, 4096)  # fast path: micro-batch token budgets tried
    # packed rows on the mix, compiled with varlen: larger budgets tried (a row holds real tokens only, so a budget
    # above a step's 16 x mean tokens puts the whole step in one row instead of two uneven ones)
    pack_budgets: tuple[int, ...] = (8192,)


QUICK = dict(steps=375, examples_per_step=8, seq_len=48, mix_median=40, eval_prompts=6, samples=3, max_new_tokens=16,
             prompt_len=(8, 16), baseline_gen_batch=12, baseline_gen_tokens=8, gen_batch=9, more_gen_batches=(18,),
             series_prompts=4, series_tokens=8, warmup_steps=1, timed_steps=2, budgets=(256,),
             pack_budgets=(512,))


def synthetic_examples(lengths: list[int], vocab: int, prompt_share: float, seed: int) -> list[Encoded]:
    """Token-id training examples: the leading share is prompt (no loss), the rest is the labelled answer."""
    rng = random.Random(seed)
    out = []
    for n in lengths:
        ids = [rng.randrange(1, vocab) for _ in range(n)]
        cut = int(n * prompt_share)
        out.append(Encoded(ids, [IGNORE] * cut + ids[cut:]))
    return out


def length_mix(n: int, median: int, seed: int, lo: int = 64, hi: int = 1024) -> list[int]:
    rng = random.Random(seed)
    return [int(min(hi, max(lo, rng.lognormvariate(0, 0.5) * median))) for _ in range(n)]
