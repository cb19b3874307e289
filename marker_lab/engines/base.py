"""The generation engine interface: chat prompts in, K sampled completions per prompt out."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True)
class SamplingParams:
    n: int = 1  # completions per prompt
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0
    max_tokens: int = 512  # new tokens per completion
    seed: int = 0  # the whole request is reproducible for a given seed, engine and batch size


class GenerationEngine(Protocol):
    name: str
    last_token_counts: list[list[int]]  # new tokens of each completion returned by the last `generate`

    def generate(self, prompts: list[list[dict]], params: SamplingParams, desc: str = "generate") -> list[list[str]]:
        """For each chat prompt (a list of messages ending with a user turn), `params.n` completions.

        Sampling is plain: temperature and top_p only (no top-k, no repetition penalty), stopping at the end
        of the assistant turn or at max_tokens. Completions are decoded without special tokens.
        """
        ...
