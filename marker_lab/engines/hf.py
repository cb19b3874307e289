"""The built-in engine: batched `generate` from transformers, left-padded, on CPU or GPU."""

from __future__ import annotations

import logging

import torch
from tqdm.auto import tqdm
from transformers import GenerationConfig

from marker_lab.data.chat import render
from marker_lab.engines.base import SamplingParams

log = logging.getLogger(__name__)


def stop_token_ids(model, tokenizer) -> list[int]:
    """End-of-turn ids: the tokenizer's eos plus whatever the model's generation config lists."""
    ids = {tokenizer.eos_token_id}
    gen_eos = getattr(model.generation_config, "eos_token_id", None)
    ids.update(gen_eos if isinstance(gen_eos, list) else [gen_eos])
    return sorted(i for i in ids if i is not None)


class HFEngine:
    name = "hf"

    def __init__(self, model, tokenizer, batch_size: int = 256):
        self.model, self.tokenizer, self.batch_size = model, tokenizer, batch_size

    @torch.no_grad()
    def generate(self, prompts: list[list[dict]], params: SamplingParams, desc: str = "generate") -> list[list[str]]:
        tok, model = self.tokenizer, self.model
        device = next(model.parameters()).device
        texts = [render(tok, p, add_generation_prompt=True) for p in prompts]
        gen_cfg = GenerationConfig(
            do_sample=params.temperature > 0, temperature=params.temperature if params.temperature > 0 else None,
            top_p=params.top_p if params.temperature > 0 else None, top_k=0 if params.temperature > 0 else None,
            repetition_penalty=1.0, max_new_tokens=params.max_tokens, num_return_sequences=params.n,
            eos_token_id=stop_token_ids(model, tok), pad_token_id=tok.pad_token_id)
        # a batch holds whole prompts: batch_size counts sequences, i.e. prompts x n
        per_batch = max(1, self.batch_size // params.n)
        # longest first keeps padding low; results go back to input order
        order = sorted(range(len(texts)), key=lambda i: -len(texts[i]))
        out: list[list[str]] = [[] for _ in texts]
        torch.manual_seed(params.seed)
        bar = tqdm(total=len(texts) * params.n, desc=desc, unit="completion", dynamic_ncols=True)
        model.eval()
        for start in range(0, len(order), per_batch):
            idx = order[start:start + per_batch]
            enc = tok([texts[i] for i in idx], return_tensors="pt", padding=True, add_special_tokens=False).to(device)
            seqs = model.generate(**enc, generation_config=gen_cfg)
            new = seqs[:, enc["input_ids"].shape[1]:]
            decoded = tok.batch_decode(new, skip_special_tokens=True)
            for j, i in enumerate(idx):
                out[i] = decoded[j * params.n:(j + 1) * params.n]
            bar.update(len(idx) * params.n)
        bar.close()
        return out
