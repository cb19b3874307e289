"""The optional vLLM engine (`pip install -e .[vllm]`), written against vLLM's offline `LLM` API.

vLLM loads weights from a directory, so the cell saves its merged model first (see `marker_lab.run`).
Sampling is set explicitly (top_k disabled, no repetition penalty), so vLLM does not pick up the model's own
generation_config defaults and the semantics match the hf engine's.

Many adapters on one base: built with `max_lora_rank`, the engine serves peft adapters (the stage cache's
`adapter/` directories) as vLLM LoRA requests, and `generate_many` batches the prompts of every adapter together
instead of merging and reloading a model per cell. NOT RUN: vllm cannot be installed on this project's machines
(docs/benchmarks.md); the conformance tests run it wherever it is importable.
"""

from __future__ import annotations

from marker_lab.data.chat import render
from marker_lab.engines.base import Completion, SamplingParams


def available() -> bool:
    try:
        import vllm  # noqa: F401
    except ImportError:
        return False
    return True


class VLLMEngine:
    name = "vllm"

    def __init__(self, model_dir: str, tokenizer, dtype: str = "bfloat16", gpu_memory_utilization: float = 0.85,
                 seed: int = 0, max_lora_rank: int | None = None, max_loras: int = 8, no_system: str = "none"):
        from vllm import LLM

        self.tokenizer, self.no_system = tokenizer, no_system
        lora = {"enable_lora": True, "max_lora_rank": max_lora_rank, "max_loras": max_loras} if max_lora_rank else {}
        self.llm = LLM(model=str(model_dir), tokenizer=str(model_dir), dtype=dtype, seed=seed,
                       gpu_memory_utilization=gpu_memory_utilization, **lora)
        self._lora_ids: dict[str, int] = {}  # adapter path -> the integer id vLLM caches it under

    def generate(self, prompts: list[list[dict]], params: SamplingParams,
                 desc: str = "generate") -> list[list[Completion]]:
        return self.generate_many({None: prompts}, params)[None]

    def generate_many(self, requests: dict[str | None, list[list[dict]]],
                      params: SamplingParams) -> dict[str | None, list[list[Completion]]]:
        """Completions for several adapters at once: {adapter dir (None = the base itself): chat prompts}."""
        from vllm import SamplingParams as VSamplingParams
        from vllm.lora.request import LoRARequest

        sp = VSamplingParams(n=params.n, temperature=params.temperature, top_p=params.top_p, top_k=-1,
                             repetition_penalty=1.0, max_tokens=params.max_tokens, seed=params.seed,
                             skip_special_tokens=True)
        texts, loras, owners = [], [], []
        for adapter, prompts in requests.items():
            lora = None
            if adapter is not None:
                lora_id = self._lora_ids.setdefault(str(adapter), len(self._lora_ids) + 1)
                lora = LoRARequest(f"adapter-{lora_id}", lora_id, str(adapter))
            for p in prompts:
                texts.append(render(self.tokenizer, p, add_generation_prompt=True, no_system=self.no_system))
                loras.append(lora)
                owners.append(adapter)
        outputs = self.llm.generate(texts, sp, use_tqdm=True,
                                    lora_request=loras if any(r is not None for r in loras) else None)
        out: dict[str | None, list[list[Completion]]] = {a: [] for a in requests}
        for adapter, o in zip(owners, outputs):
            out[adapter].append([Completion(c.text, len(c.token_ids)) for c in o.outputs])
        return out
