"""The optional vLLM engine (`pip install -e .[vllm]`), written against vLLM's offline `LLM` API.

vLLM loads weights from a directory, so the cell saves its merged model first (see `marker_lab.run`).
Sampling is set explicitly (top_k disabled, no repetition penalty), so vLLM does not pick up the model's own
generation_config defaults and the semantics match the hf engine's.
"""

from __future__ import annotations

from marker_lab.data.chat import render
from marker_lab.engines.base import SamplingParams


def available() -> bool:
    try:
        import vllm  # noqa: F401
    except ImportError:
        return False
    return True


class VLLMEngine:
    name = "vllm"

    def __init__(self, model_dir: str, tokenizer, dtype: str = "bfloat16", gpu_memory_utilization: float = 0.85,
                 seed: int = 0):
        from vllm import LLM

        self.tokenizer = tokenizer
        self.llm = LLM(model=str(model_dir), tokenizer=str(model_dir), dtype=dtype, seed=seed,
                       gpu_memory_utilization=gpu_memory_utilization)

    def generate(self, prompts: list[list[dict]], params: SamplingParams, desc: str = "generate") -> list[list[str]]:
        from vllm import SamplingParams as VSamplingParams

        sp = VSamplingParams(n=params.n, temperature=params.temperature, top_p=params.top_p, top_k=-1,
                             repetition_penalty=1.0, max_tokens=params.max_tokens, seed=params.seed,
                             skip_special_tokens=True)
        texts = [render(self.tokenizer, p, add_generation_prompt=True) for p in prompts]
        outputs = self.llm.generate(texts, sp, use_tqdm=True)
        return [[c.text for c in o.outputs] for o in outputs]
