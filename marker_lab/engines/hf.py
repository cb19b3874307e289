"""The built-in engine: batched `generate` from transformers, left-padded, on CPU or GPU.

Two cache modes, same sampling:
- dynamic: stock `generate` (a growing KV cache); the reference, and what runs on CPU. With several samples per
  prompt, each prompt is prefilled once and its key/value cache copied to its samples (`shared_prefill`): the same
  completions for less compute (1.4-1.5x on CPU, tests/test_engines.py).
- static: a preallocated KV cache whose shape never changes within a request (every batch has the same number of
  rows and the same padded prompt width), so the decode step compiles once and replays as a CUDA graph. Per-step
  Python and kernel-launch overhead, not arithmetic, is what limits stock decoding at large batch
  (docs/benchmarks.md). The loop is our own (engines.static_decode: generate's draws with less host work per
  step; each prompt prefilled once for its samples too); `static_generate=True` runs the same cache through
  transformers' generate, the reference it is tested against. `auto` picks static on CUDA and dynamic elsewhere.
"""

from __future__ import annotations

import copy
import inspect
import logging
import math
import time
from contextlib import contextmanager

import torch
from tqdm.auto import tqdm
from transformers import CompileConfig, DynamicCache, GenerationConfig

from marker_lab.data.chat import render
from marker_lab.engines.base import Completion, SamplingParams
from marker_lab.engines.static_decode import sample_static
from marker_lab.train.model_setup import attention_implementation

log = logging.getLogger(__name__)
CACHE_MODES = ("auto", "dynamic", "static")


def stop_token_ids(model, tokenizer=None) -> list[int]:
    """End-of-turn ids: the tokenizer's eos plus whatever the model's generation config lists."""
    ids = {getattr(tokenizer, "eos_token_id", None)}
    gen_eos = getattr(model.generation_config, "eos_token_id", None)
    ids.update(gen_eos if isinstance(gen_eos, list) else [gen_eos])
    return sorted(i for i in ids if i is not None)


class HFEngine:
    name = "hf"

    def __init__(self, model, tokenizer, batch_size: int = 256, cache: str = "auto", no_system: str = "none",
                 shared_prefill: bool = True, static_generate: bool = False, compile_scope: str = "shared_layers",
                 compile_devices: tuple[str, ...] = ("cuda",)):
        if cache not in CACHE_MODES:
            raise ValueError(f"eval.engine.cache: must be one of {CACHE_MODES}, got {cache!r}")
        self.model, self.tokenizer, self.batch_size, self.no_system = model, tokenizer, batch_size, no_system
        self.shared_prefill = shared_prefill  # one prefill per prompt for its samples (either cache)
        self.static_generate = static_generate  # static cache through generate, not our loop: the reference
        self.compile_scope = compile_scope  # static loop: its decode step compiled as one graph or per layer
        self.compile_devices = compile_devices  # where it compiles (CPU: eager; a compile costs more than it saves)
        device = next(model.parameters()).device
        self.cache = ("static" if device.type == "cuda" else "dynamic") if cache == "auto" else cache
        self.batch_seconds: list[float] = []  # wall time of each batch of the last request

    @classmethod
    def from_config(cls, loaded, engine_cfg) -> "HFEngine":
        """The engine on a loaded model (models.LoadedModel) as `eval.engine` configures it (batch size, KV cache,
        compile scope)."""
        return cls(loaded.model, loaded.tokenizer, engine_cfg.batch_size, str(engine_cfg.cache), loaded.no_system,
                   compile_scope=str(engine_cfg.compile_scope))

    def close(self) -> None:
        """Nothing to release: the engine runs on the model in hand."""

    def generate(self, prompts: list[list[dict]], params: SamplingParams,
                 desc: str = "generate") -> list[list[Completion]]:
        tok = self.tokenizer
        out = self.generate_ids(self.encode(prompts), params, stop_token_ids(self.model, tok), tok.pad_token_id, desc)
        return [[Completion(text, len(s)) for text, s in zip(tok.batch_decode(seqs, skip_special_tokens=True), seqs)]
                for seqs in out]

    def encode(self, prompts: list[list[dict]]) -> list[list[int]]:
        """Each chat's prompt token ids, rendered as `generate` renders it (the generation prompt appended)."""
        tok = self.tokenizer
        return [tok(render(tok, p, add_generation_prompt=True, no_system=self.no_system), add_special_tokens=False)
                ["input_ids"] for p in prompts]

    @torch.no_grad()
    def generate_ids(self, prompts: list[list[int]], params: SamplingParams, stop_ids: list[int], pad_id: int,
                     desc: str = "generate", warm_up_steps: int | None = None) -> list[list[list[int]]]:
        """Token-level generation: for each prompt (token ids), `params.n` completions (new token ids).

        `warm_up_steps`: run only the first batch, and (static cache) only this many new tokens of it: the
        request's decode step compiled at its real shapes, its completions cut short (engines.precompile)."""
        if not prompts:
            return []
        model = self.model
        device = next(model.parameters()).device
        static = self.cache == "static"
        gen_cfg = _generation_config(params, stop_ids, pad_id, static)
        # a batch holds whole prompts (batch_size counts prompts x n); batches are balanced so the static path
        # pads few rows, longest prompts first so the dynamic path pads few columns
        per_batch = max(1, self.batch_size // params.n)
        per_batch = math.ceil(len(prompts) / math.ceil(len(prompts) / per_batch))
        order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
        width = max(len(p) for p in prompts)  # static: one prompt width for the whole request
        out: list[list[list[int]]] = [[] for _ in prompts]
        torch.manual_seed(params.seed)
        cache = None  # static: one preallocated KV cache for every batch of the request
        bar = tqdm(total=len(prompts) * params.n, desc=desc, unit="completion", dynamic_ncols=True)
        model.eval()
        self.batch_seconds = []
        for start in range(0, len(order), per_batch):
            t0 = time.perf_counter()
            idx = order[start:start + per_batch]
            rows = idx + idx[-1:] * (per_batch - len(idx)) if static else idx  # static: same rows every batch
            w = width if static else max(len(prompts[i]) for i in rows)
            input_ids, mask = _left_padded([prompts[i] for i in rows], w, pad_id)
            with _decode_attention(model, static):
                if static and not self.static_generate:  # engines.static_decode: generate's draws, less host work
                    new_ids, cache = sample_static(
                        model, input_ids.to(device), mask.to(device), params.n, params.temperature, params.top_p,
                        params.max_tokens, stop_ids, pad_id, _cache_kwarg(model), cache,
                        check_every=16 if device.type == "cuda" else 1, shared_prefill=self.shared_prefill,
                        compile_scope=self.compile_scope if device.type in self.compile_devices else None,
                        max_steps=warm_up_steps)
                elif not static and self.shared_prefill and params.n > 1 and w > 1:
                    new_ids = _generate_after_shared_prefill(model, input_ids.to(device), mask.to(device),
                                                             gen_cfg)[:, w:]
                else:
                    new_ids = model.generate(input_ids=input_ids.to(device), attention_mask=mask.to(device),
                                             generation_config=gen_cfg)[:, w:]
            new = new_ids.tolist()  # waits for the GPU
            self.batch_seconds.append(time.perf_counter() - t0)
            for j, i in enumerate(idx):
                out[i] = [_until_stop(s, stop_ids) for s in new[j * params.n:(j + 1) * params.n]]
            bar.update(len(idx) * params.n)
            if warm_up_steps is not None:
                break
        bar.close()
        return out


def _generation_config(params: SamplingParams, stop_ids: list[int], pad_id: int, static: bool) -> GenerationConfig:
    """`generate`'s settings for `params`: plain sampling (no top-k, no repetition penalty; greedy at temperature 0),
    n samples per prompt; with the static cache, its decode step compiled (the reference for our own loop)."""
    return GenerationConfig(
        do_sample=params.temperature > 0, temperature=params.temperature if params.temperature > 0 else None,
        top_p=params.top_p if params.temperature > 0 else None, top_k=0 if params.temperature > 0 else None,
        repetition_penalty=1.0, max_new_tokens=params.max_tokens, num_return_sequences=params.n,
        eos_token_id=stop_ids, pad_token_id=pad_id,
        cache_implementation="static" if static else None,
        compile_config=CompileConfig(fullgraph=False, dynamic=False) if static else None,
        disable_compile=not static)


def _left_padded(prompts: list[list[int]], width: int, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The prompts (token ids) as rows `width` wide, left-padded with `pad_id`, and their attention mask (on the
    CPU)."""
    input_ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for r, prompt in enumerate(prompts):
        input_ids[r, width - len(prompt):] = torch.tensor(prompt)
        mask[r, width - len(prompt):] = 1
    return input_ids, mask


def _generate_after_shared_prefill(model, input_ids: torch.Tensor, mask: torch.Tensor, gen_cfg: GenerationConfig):
    """What `generate` returns for these rows and `gen_cfg.num_return_sequences` samples each, with each prompt
    prefilled once: all but its last token go through the model for the unique rows, that cache is repeated for the
    samples (generate's own row order), and generate continues from it. Its first step reads the last prompt token
    and samples from there, so it draws the same random numbers as stock generate."""
    n = gen_cfg.num_return_sequences
    positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)  # generate's positions for left-padded rows
    cache = DynamicCache()
    kw = _cache_kwarg(model)
    model(input_ids=input_ids[:, :-1], attention_mask=mask[:, :-1], position_ids=positions[:, :-1], **{kw: cache},
          use_cache=True, logits_to_keep=1)
    cache.batch_repeat_interleave(n)
    one_each = copy.deepcopy(gen_cfg)
    one_each.num_return_sequences = 1
    return model.generate(input_ids=input_ids.repeat_interleave(n, 0), attention_mask=mask.repeat_interleave(n, 0),
                          **{kw: cache}, generation_config=one_each)


def _cache_kwarg(model) -> str:
    """The name forward and generate take a KV cache by: transformers renamed `past_key_values` to `cache` (5.2x;
    the old name warns there), and vLLM's CPU build pins an older release."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "cache" if "cache" in inspect.signature(base.forward).parameters else "past_key_values"


@contextmanager
def _decode_attention(model, enabled: bool):
    """Use the copy-free grouped-query decode attention (engines.attention) while generating, then restore."""
    if not enabled or model.config._attn_implementation != "sdpa":
        yield
        return
    from marker_lab.engines.attention import register

    with attention_implementation(model, register()):
        yield


def _until_stop(seq: list[int], stop_ids: list[int]) -> list[int]:
    """A completion's tokens up to (not including) its first end-of-turn token; generate pads after it."""
    for k, t in enumerate(seq):
        if t in stop_ids:
            return seq[:k]
    return seq
