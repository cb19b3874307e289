"""Reading a model's hidden states at one layer for chat prompts: the features of persona geometry and probes.

Two readouts, one vector per prompt:
- answer_means: the model answers greedily; the mean hidden state over the answer's tokens (and its end of turn).
- prompt_last: the hidden state on the last token of the prompt with the assistant turn opened: what the model
  holds just before it writes anything (no generation; the input tokens are the same for every model).
"""

from __future__ import annotations

import numpy as np
import torch
from tqdm.auto import tqdm

from marker_lab.data.chat import IGNORE, Encoded, encode_chat, render
from marker_lab.engines.base import SamplingParams


def default_layer(model) -> int:
    """The middle decoder layer (hidden_states index: 0 is the embeddings, i the output of layer i)."""
    return max(1, model.config.num_hidden_layers // 2)


@torch.no_grad()
def answer_means(model, tokenizer, prompts: list[list[dict]], layer: int, max_tokens: int = 64,
                 batch_size: int = 64, no_system: str = "none") -> np.ndarray:
    """[len(prompts), hidden] float64: the mean hidden state at `layer` over each prompt's greedy answer."""
    from marker_lab.engines.hf import HFEngine

    model.eval()
    answers = HFEngine(model, tokenizer, batch_size, no_system=no_system).generate(
        prompts, SamplingParams(n=1, temperature=0.0, top_p=1.0, max_tokens=max_tokens, seed=0), desc="answers")
    encoded = [encode_chat(tokenizer, p + [{"role": "assistant", "content": a[0]}], "assistant_only", no_system=no_system)
               for p, a in zip(prompts, answers)]
    return masked_means(model, tokenizer, encoded, layer, batch_size)


@torch.no_grad()
def prompt_last(model, tokenizer, prompts: list[list[dict]], layer: int, batch_size: int = 64,
                no_system: str = "none") -> np.ndarray:
    """[len(prompts), hidden] float64: the hidden state at `layer` on each prompt's last token (turn opened)."""
    model.eval()
    encoded = []
    for p in prompts:
        text = render(tokenizer, p, add_generation_prompt=True, no_system=no_system)
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        encoded.append(Encoded(ids, [IGNORE] * (len(ids) - 1) + [ids[-1]]))
    return masked_means(model, tokenizer, encoded, layer, batch_size)


def masked_means(model, tokenizer, encoded: list[Encoded], layer: int, batch_size: int) -> np.ndarray:
    """Mean hidden state at `layer` over each example's labelled positions (right padding, so positions and the
    causal attention of real tokens are those of the unpadded sequence)."""
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id
    out = []
    for start in tqdm(range(0, len(encoded), batch_size), desc="hidden states", unit="batch", leave=False):
        chunk = encoded[start:start + batch_size]
        width = max(len(e.input_ids) for e in chunk)
        ids = torch.tensor([e.input_ids + [pad] * (width - len(e.input_ids)) for e in chunk], device=device)
        attn = torch.tensor([[1] * len(e.input_ids) + [0] * (width - len(e.input_ids)) for e in chunk], device=device)
        mask = torch.tensor([[int(x != IGNORE) for x in e.labels] + [0] * (width - len(e.labels)) for e in chunk],
                            device=device, dtype=torch.float64)
        hidden = model(input_ids=ids, attention_mask=attn, output_hidden_states=True, use_cache=False).hidden_states[layer]
        summed = (hidden.double() * mask[..., None]).sum(1)
        out.append((summed / mask.sum(1, keepdim=True).clamp(min=1)).cpu().numpy())
    return np.concatenate(out)
