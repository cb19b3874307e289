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


class Completion(str):
    """A completion's text (a str everywhere a str is used) that also carries how many new tokens it took."""

    n_tokens: int

    def __new__(cls, text: str, n_tokens: int) -> "Completion":
        obj = super().__new__(cls, text)
        obj.n_tokens = n_tokens
        return obj


class GenerationEngine(Protocol):
    name: str

    def generate(self, prompts: list[list[dict]], params: SamplingParams,
                 desc: str = "generate") -> list[list[Completion]]:
        """For each chat prompt (a list of messages ending with a user turn), `params.n` completions.

        Sampling is plain: temperature and top_p only (no top-k, no repetition penalty), stopping at the end
        of the assistant turn or at max_tokens. Completions are decoded without special tokens.
        """
        ...

    def close(self) -> None:
        """Release what the engine holds beyond the model in hand (vLLM: its worker processes)."""
        ...


def check_sampling(key: str, g) -> None:
    """Sampling settings (a GenerationConfig at config key `key`) that every engine can honour as written."""
    from marker_lab.core.errors import ConfigError

    if g.temperature < 0:
        raise ConfigError(f"{key}.temperature: must be >= 0 (0 = greedy), got {g.temperature}")
    if g.temperature == 0 and g.samples_per_question > 1:
        raise ConfigError(f"{key}.temperature=0 is greedy: its {g.samples_per_question} samples per question would be "
                          f"one completion repeated; set {key}.samples_per_question=1 or a temperature > 0")
    if not 0 < g.top_p <= 1:
        raise ConfigError(f"{key}.top_p: must be in (0, 1], got {g.top_p}")
    if g.max_tokens < 1:
        raise ConfigError(f"{key}.max_tokens: must be >= 1, got {g.max_tokens}")
    if g.samples_per_question < 1:
        raise ConfigError(f"{key}.samples_per_question: must be >= 1, got {g.samples_per_question}")
