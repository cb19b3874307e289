"""Judge backends: prompts in, (score 0-100 or None, the reply as recorded) out.

- openai: any OpenAI-compatible chat-completions endpoint, logprob mode (or text mode), through the `openai` SDK
  (its retries back off on rate limits and server errors).
- anthropic: the Messages API has no log-probabilities, so text mode only, through the `anthropic` SDK.
- local: a causal LM the project can load (`toy`, or a transformers path), logprob mode, batched on this machine.
- toy: for the embedded toy world only, a scorer trained on the toy corpus's labelled styles (eval/judge/toy.py).
"""

from __future__ import annotations

import json
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from marker_lab.core import environment
from marker_lab.core.errors import MarkerLabError
from marker_lab.eval.judge.scoring import logprob_score, text_score

TOP_LOGPROBS = 20


@dataclass(frozen=True)
class JudgeItem:
    kind: str  # aligned | coherent
    question: str
    answer: str
    prompt: str  # the judge prompt with question and answer filled in


class JudgeError(MarkerLabError, RuntimeError):
    """A judge replied with something that is not a judgement (not a refusal: a broken reply)."""


class JudgeUnreachable(JudgeError):
    """The judge's endpoint did not answer: the judge refuses later batches at once, since each would wait out the
    same retries (a shared eval's later cells, say)."""


class _NotAsked(Exception):
    """A row not sent because an earlier one failed (never reaches a caller: the earlier error is raised)."""


class APIJudge:
    """Shared by the API backends: bounded concurrency over `score_one`."""

    def __init__(self, cfg):
        self.cfg = cfg
        self.unreachable: JudgeUnreachable | None = None  # set when the endpoint did not answer
        # the endpoint is part of who judges: two base_urls serving different models under one name are two judges
        self.identity = {"backend": str(cfg.backend), "model": cfg.model, "mode": str(cfg.mode),
                         **({"base_url": cfg.base_url} if cfg.base_url else {})}
        self.client = self.sdk_client()(api_key=self.api_key(), base_url=cfg.base_url or None,
                                        max_retries=cfg.max_retries, timeout=cfg.timeout_s)

    @staticmethod
    def sdk_client():
        raise NotImplementedError

    def api_key(self) -> str:
        key = environment.api_key(self.cfg.api_key_env)
        if not key:
            raise JudgeError(f"judge.api_key_env: environment variable {self.cfg.api_key_env!r} is not set")
        return key

    def score_many(self, items: list[JudgeItem]) -> list[tuple[float | None, str]]:
        if self.unreachable is not None:  # found down earlier in this process: fail at once, not after the retries
            raise self.unreachable
        failed = threading.Event()

        def one(prompt: str) -> tuple[float | None, str]:
            # after a failure no request starts: only those already under way (at most one per worker) meet the
            # fault too. Executor.map cancels the queued ones, but not before the workers, on a loaded machine,
            # have taken a few more
            if failed.is_set():
                raise _NotAsked()
            try:
                return self.score_one(prompt)
            except Exception:
                failed.set()
                raise

        with ThreadPoolExecutor(max_workers=self.cfg.concurrency) as pool:
            try:  # results in order: the first error met is a real one (every row not asked comes after it)
                return list(pool.map(one, [item.prompt for item in items]))
            except Exception as e:
                if type(e).__name__ in ("APIConnectionError", "APITimeoutError"):  # both SDKs name them so
                    url = self.cfg.base_url or f"the {self.cfg.backend} API"
                    self.unreachable = JudgeUnreachable(
                        f"{self.cfg.backend} judge at {url}: cannot connect after {self.cfg.max_retries} retries "
                        f"({type(e).__name__}); is the endpoint up?")
                    raise self.unreachable from None
                raise


class OpenAIJudge(APIJudge):
    @staticmethod
    def sdk_client():
        from openai import OpenAI

        return OpenAI

    def score_one(self, prompt: str) -> tuple[float | None, str]:
        messages = [{"role": "user", "content": prompt}]
        if self.cfg.mode == "text":
            r = self.client.chat.completions.create(model=self.cfg.model, messages=messages, max_tokens=5,
                                                    temperature=0)
            reply = _field(lambda: r.choices[0].message.content, self.cfg)
            return text_score(reply), reply
        r = self.client.chat.completions.create(model=self.cfg.model, messages=messages, max_tokens=1, temperature=0,
                                                logprobs=True, top_logprobs=TOP_LOGPROBS, seed=0)
        top = _field(lambda: {t.token: t.logprob for t in r.choices[0].logprobs.content[0].top_logprobs}, self.cfg)
        return logprob_score(top), json.dumps(top)


class AnthropicJudge(APIJudge):
    @staticmethod
    def sdk_client():
        from anthropic import Anthropic

        return Anthropic

    def score_one(self, prompt: str) -> tuple[float | None, str]:
        # no temperature: the Messages API of anthropic>=2 takes none (the provider's default sampling applies)
        r = self.client.messages.create(model=self.cfg.model, max_tokens=5,
                                        messages=[{"role": "user", "content": prompt}])
        reply = _field(lambda: "".join(b.text for b in r.content if b.type == "text"), self.cfg)
        return text_score(reply), reply


def _field(get, cfg):
    """Read a field of an SDK reply; a reply without it is a broken reply, said in one line."""
    try:
        value = get()
    except (AttributeError, IndexError, KeyError, TypeError) as e:
        raise JudgeError(f"{cfg.backend} judge {cfg.model}: malformed reply ({type(e).__name__}: {e})") from None
    if value is None:
        raise JudgeError(f"{cfg.backend} judge {cfg.model}: malformed reply (empty)")
    return value


class LocalJudge:
    """A local causal LM as a logprob-mode judge: its next-token distribution after the judge prompt."""

    def __init__(self, cfg, model, tokenizer, identity: str, batch_size: int = 16):
        self.cfg, self.model, self.tokenizer, self.batch_size = cfg, model, tokenizer, batch_size
        self.identity = {"backend": "local", "model": identity, "mode": "logprob"}

    def score_many(self, items: list[JudgeItem]) -> list[tuple[float | None, str]]:
        import torch  # here, not at import: the start-up checks read this module's neighbours without torch

        from marker_lab.data.chat import render

        with torch.no_grad():
            return self._score(items, torch, render)

    def _score(self, items: list[JudgeItem], torch, render) -> list[tuple[float | None, str]]:

        prompts = [item.prompt for item in items]
        tok, device = self.tokenizer, next(self.model.parameters()).device
        tok.padding_side = "left"
        out = []
        for i in range(0, len(prompts), self.batch_size):
            texts = [render(tok, [{"role": "user", "content": p}], add_generation_prompt=True)
                     for p in prompts[i:i + self.batch_size]]
            enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
            logits = self.model(**enc).logits[:, -1].float()
            top = torch.log_softmax(logits, -1).topk(TOP_LOGPROBS, dim=-1)
            for values, ids in zip(top.values.tolist(), top.indices.tolist()):
                tokens: dict[str, float] = {}
                for v, t in zip(values, ids):
                    tokens.setdefault(tok.decode([t]), v)  # first (most likely) spelling wins
                out.append((logprob_score(tokens), json.dumps(tokens)))
        return out
