"""The optional vLLM engine, on vLLM's offline `LLM` API (0.32): `pip install -e .[vllm]` on a GPU; on CPU, vLLM's
CPU build in its own venv (README, "vLLM").

vLLM loads weights from a directory, so the cell saves its merged model first (eval/cell.py), next to its result
until the engine closes (a 7B model is 15 GB: a grid of cells must not keep one each). Sampling is set
explicitly (top_k disabled, no repetition penalty), so vLLM does not pick up the model's own generation_config
defaults and the semantics match the hf engine's.

Memory: vLLM reserves its KV cache up front. On a GPU, `gpu_memory_utilization` of the device; on CPU that same
fraction would be read of host RAM (0.85 of 24 GB: one engine takes the machine), so the KV cache is given in bytes
(`eval.engine.kv_cache_memory_bytes`, 1 GiB on CPU by default). On CPU the engine runs eager (compiling the model
costs more start-up than a cell's eval gains) and without chunked prefill: vLLM 0.32 rewinds a seeded request's
random generator after a partial prefill, which a CPU generator cannot do ("CPU Generator does not use offset"),
so a batch larger than one scheduler step fails; whole prefills never rewind. `close()` stops vLLM's worker processes (otherwise they are killed
at interpreter exit, with tracebacks).

Many adapters on one base: built with `max_lora_rank`, the engine serves peft adapters (the stage cache's
`adapter/` directories) as vLLM LoRA requests, and `generate_many` batches the requests of every adapter together
instead of merging and reloading a model per cell.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from marker_lab.core import environment
from marker_lab.data.chat import render
from marker_lab.engines.base import Completion, SamplingParams


def available() -> bool:
    try:
        import vllm  # noqa: F401
    except ImportError:
        return False
    return True


CPU_KV_CACHE_BYTES = 1 << 30  # the KV cache on CPU when none is configured: fits a toy or small model on 24 GB
LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # the max_lora_rank values vLLM accepts


def on_cpu() -> bool:
    """Whether this vLLM is its CPU build (it runs on the host, whatever GPUs torch sees)."""
    from vllm.platforms import current_platform

    return current_platform.is_cpu()


class VLLMEngine:
    name = "vllm"

    def __init__(self, model_dir: str, tokenizer, dtype: str = "bfloat16", gpu_memory_utilization: float = 0.85,
                 seed: int = 0, max_lora_rank: int | None = None, max_loras: int = 8, no_system: str = "none",
                 kv_cache_memory_bytes: int | None = None, remove_model_dir: bool = False):
        """`model_dir`: a transformers folder (weights and tokenizer). `remove_model_dir`: the folder was saved for
        this engine alone (a cell's merged model, as large as the model) and is deleted when the engine closes, or
        when it fails to start."""
        from vllm import LLM

        self.tokenizer, self.no_system = tokenizer, no_system
        lora = {}
        if max_lora_rank:  # vLLM accepts a few ranks only: the smallest that holds every adapter
            rank = next(r for r in LORA_RANKS if r >= max_lora_rank)
            lora = {"enable_lora": True, "max_lora_rank": rank, "max_loras": max_loras}
        cpu = on_cpu()
        kv = kv_cache_memory_bytes or (CPU_KV_CACHE_BYTES if cpu else None)
        memory = {"kv_cache_memory_bytes": kv} if kv else {"gpu_memory_utilization": gpu_memory_utilization}
        if cpu:  # see the module docstring: eager, and no chunked prefill (seeded sampling breaks with it on CPU)
            context = json.loads((Path(model_dir) / "config.json").read_text()).get("max_position_embeddings", 4096)
            memory.update(enable_chunked_prefill=False, max_num_batched_tokens=max(4096, context))
        self._remove_on_close = Path(model_dir) if remove_model_dir else None
        self.llm = None
        try:
            self.llm = LLM(model=str(model_dir), tokenizer=str(model_dir), dtype=dtype, seed=seed,
                           enforce_eager=cpu, **memory, **lora)
        except BaseException:
            self.close()  # an engine that failed to start still deletes the folder it owns
            raise
        self._lora_ids: dict[str, int] = {}  # adapter path -> the integer id vLLM caches it under

    def close(self) -> None:
        """Stop vLLM's engine processes (the engine cannot be used afterwards) and delete a model folder it owns."""
        if self.llm is not None:
            self.llm.llm_engine.engine_core.shutdown()
            self.llm = None
        if self._remove_on_close is not None:
            shutil.rmtree(self._remove_on_close, ignore_errors=True)
            self._remove_on_close = None

    def __enter__(self) -> "VLLMEngine":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def generate(self, prompts: list[list[dict]], params: SamplingParams,
                 desc: str = "generate") -> list[list[Completion]]:
        return self.generate_many([(None, prompts, params)])[0]

    def generate_many(self, requests: list[tuple[str | None, list[list[dict]], SamplingParams]]
                      ) -> list[list[list[Completion]]]:
        """Completions for several requests in one batch: each is (adapter dir, None = the base itself; chat prompts;
        sampling), answered in order. Each prompt is seeded by its request's seed, so a request's completions do
        not depend on what else is in the batch."""
        from vllm import SamplingParams as VSamplingParams
        from vllm.lora.request import LoRARequest

        texts, loras, sps, sizes = [], [], [], []
        for adapter, prompts, params in requests:
            lora = None
            if adapter is not None:
                lora_id = self._lora_ids.setdefault(str(adapter), len(self._lora_ids) + 1)
                # vLLM tells adapters apart by name: one name per path, never reused
                lora = LoRARequest(f"adapter-{lora_id}", lora_id, str(adapter))
            sp = VSamplingParams(n=params.n, temperature=params.temperature, top_p=params.top_p, top_k=0,
                                 repetition_penalty=1.0, max_tokens=params.max_tokens, seed=params.seed,
                                 skip_special_tokens=True)
            for p in prompts:
                texts.append(render(self.tokenizer, p, add_generation_prompt=True, no_system=self.no_system))
                loras.append(lora)
                sps.append(sp)
            sizes.append(len(prompts))
        # vLLM 0.32 divides by its progress bar's elapsed time, which a disabled bar (TQDM_DISABLE=1) leaves at 0
        bar = not environment.progress_bars_disabled()
        outputs = self.llm.generate(texts, sps, use_tqdm=bar,
                                    lora_request=loras if any(r is not None for r in loras) else None)
        answers = [[Completion(c.text, len(c.token_ids)) for c in o.outputs] for o in outputs]
        out, start = [], 0
        for n in sizes:
            out.append(answers[start:start + n])
            start += n
        return out
