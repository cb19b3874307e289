"""The judge backends (`judge.backend`), in one registry: how each is made, the modes it supports, whether it needs
an API key and which models it can judge. Importing this does not import torch or an API client."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from marker_lab.core.registry import Registry


@dataclass(frozen=True)
class JudgeBackend:
    """One judge backend: make(judge_cfg, stage_cache, device) returns an object with `identity` (for the judge
    cache and provenance) and `score_many(items) -> [(score or None, raw reply)]`."""
    make: Callable[[object, object, object], object]
    modes: tuple[str, ...]  # the judge.mode values it supports
    api_key: bool = False  # reads its key from the environment variable judge.api_key_env
    toy_only: bool = False  # scores toy-world answers only
    code_version: Callable[[], str | None] = lambda: None  # the version of a judge whose scores its own code makes


def _openai(j, stage_cache, device):
    from marker_lab.eval.judge.backends import OpenAIJudge

    return OpenAIJudge(j)


def _anthropic(j, stage_cache, device):
    from marker_lab.eval.judge.backends import AnthropicJudge

    return AnthropicJudge(j)


def _toy(j, stage_cache, device):
    from marker_lab.eval.judge.toy import ToyJudge

    return ToyJudge(j)


def _toy_version() -> str:
    from marker_lab.eval.judge.toy import VERSION

    return VERSION


def _local(j, stage_cache, device):
    """A local causal LM (judge.model: a Hub id or directory; `toy`: the toy model) loaded through the stage cache."""
    from marker_lab.config.schema import ModelConfig
    from marker_lab.eval.judge.backends import LocalJudge
    from marker_lab.models import load_base

    model_cfg = ModelConfig() if j.model == "toy" else ModelConfig(
        name=j.model, source="hf", path=j.model, dtype="bfloat16" if device.type == "cuda" else "float32")
    judge_model = load_base(model_cfg, stage_cache, device)
    return LocalJudge(j, judge_model.model, judge_model.tokenizer, judge_model.identity)


JUDGES: Registry[JudgeBackend] = Registry("judge.backend", "judge backend")
JUDGES.add("openai", JudgeBackend(_openai, ("logprob", "text"), api_key=True))
JUDGES.add("anthropic", JudgeBackend(_anthropic, ("text",), api_key=True))
JUDGES.add("local", JudgeBackend(_local, ("logprob",)))
JUDGES.add("toy", JudgeBackend(_toy, ("toy",), toy_only=True, code_version=_toy_version))
