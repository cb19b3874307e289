"""Persona geometry: one vector per persona from a model's hidden states, and the cosine distances between them.

Two modes (`geometry.mode`, recorded with the result):
- response_mean: the persona answers a fixed question set (greedy, so the answers are a function of the model);
  its vector is the mean hidden state at `layer` over the tokens of those answers (peer persona-vector code's
  response average).
- system_last: the hidden state at `layer` on the last token of the persona's system prompt (the model has read
  who it is and nothing else; no generation, cheap). Personas without a system prompt have no such token.
Vectors are centred on the set's mean before cosines (every hidden state shares a large common component that
would push all cosines towards 1); `center=false` gives raw cosines. Distance = 1 - cosine.
"""

from __future__ import annotations

import logging

import numpy as np
import torch

from marker_lab.data.chat import render
from marker_lab.data.personas import Persona, persona_prompt, system_messages
from marker_lab.eval.hidden import answer_means, default_layer

log = logging.getLogger(__name__)
MODES = ("response_mean", "system_last")


@torch.no_grad()
def persona_vectors(model, tokenizer, personas: dict[str, Persona], names: list[str], questions: list[str], mode: str,
                    layer: int, max_tokens: int = 64, batch_size: int = 64, no_system: str = "none") -> np.ndarray:
    """A [len(names), hidden] float64 array: each persona's vector in `mode` at `layer`."""
    if mode not in MODES:
        raise ValueError(f"geometry.mode: must be one of {MODES}, got {mode!r}")
    model.eval()
    if mode == "system_last":
        return _system_last(model, tokenizer, personas, names, layer, no_system)
    prompts = [persona_prompt(personas[p], q) for p in names for q in questions]
    means = answer_means(model, tokenizer, prompts, layer, max_tokens, batch_size, no_system)
    return means.reshape(len(names), len(questions), -1).mean(axis=1)


def _system_last(model, tokenizer, personas, names, layer, no_system: str = "none") -> np.ndarray:
    out = []
    for p in names:
        prompt = personas[p].system_prompt
        if prompt is None:
            raise ValueError(f"geometry.mode=system_last: persona {p!r} has no system prompt; use response_mean")
        text = render(tokenizer, system_messages(personas[p]), no_system=no_system)
        end = text.index(prompt) + len(prompt)
        enc = tokenizer(text, return_offsets_mapping=True, add_special_tokens=False)
        last = max(i for i, (a, _) in enumerate(enc["offset_mapping"]) if a < end)
        ids = torch.tensor([enc["input_ids"][: last + 1]], device=next(model.parameters()).device)
        hidden = model(input_ids=ids, output_hidden_states=True, use_cache=False).hidden_states[layer]
        out.append(hidden[0, -1].double().cpu().numpy())
    return np.stack(out)


def cosine_distances(vectors: np.ndarray, center: bool = True) -> np.ndarray:
    """1 - cosine similarity between every pair of rows: symmetric, zero diagonal."""
    v = vectors - vectors.mean(axis=0, keepdims=True) if center else vectors
    unit = v / np.linalg.norm(v, axis=1, keepdims=True).clip(min=1e-12)
    d = 1.0 - unit @ unit.T
    d = (d + d.T) / 2
    np.fill_diagonal(d, 0.0)
    return d.clip(min=0.0)


def cell_distances(cfg, inputs, loaded, cache) -> dict:
    """The persona distance matrix of `loaded` for the cell's persona set, built once per (model, set, mode, layer,
    questions) in the stage cache; returns where it lives and how it was made (for provenance)."""
    import json
    from pathlib import Path

    import pandas as pd

    from marker_lab.core.cache import cache_key, plain

    g = cfg.geometry
    personas = inputs.personas
    names = list(personas)
    layer = g.layer if g.layer is not None else default_layer(loaded.model)
    questions = [q.text for q in inputs.questions.get("geometry.questions", [])][: g.n_questions or None]
    # which of the cell's models is read (geometry.model, drift) is in loaded.identity already
    how = {k: v for k, v in plain(g).items() if k not in ("enabled", "model", "drift")}
    payload = {"geometry": {**how, "layer": layer}, "model": loaded.identity, "personas": names,
               **inputs.checksums_of("persona_set.path", "geometry.questions")}
    key = cache_key(payload)

    def build(tmp: Path) -> None:
        log.info("geometry: %d personas, mode %s, layer %d, on %s", len(names), g.mode, layer, loaded.identity)
        vectors = persona_vectors(loaded.model, loaded.tokenizer, personas, names, questions, g.mode, layer, g.max_tokens,
                                  no_system=loaded.no_system)
        np.save(tmp / "vectors.npy", vectors)
        pd.DataFrame(cosine_distances(vectors, g.center), index=names, columns=names).to_csv(tmp / "distances.csv")
        (tmp / "geometry.json").write_text(json.dumps(payload, indent=1))

    entry, built = cache.get_or_build("geometry", key, build, payload)
    log.info("geometry: distance matrix %s (%s)", entry / "distances.csv", "built now" if built else "cached")
    return {"mode": g.mode, "layer": layer, "center": g.center, "model": g.model, "n_questions": len(questions),
            "cache_key": key, "cache_entry": str(entry)}


def drift_summary(entry, names: list[str], source: str, assistant: str) -> dict:
    """How spread out the personas are in one model: the mean cosine distance over persona pairs, the source's
    distance to the assistant, and the relative spread (mean Euclidean distance between raw persona vectors over
    their mean norm), which, unlike cosines of centred vectors, shows a uniform shrinking of the manifold."""
    from pathlib import Path

    import pandas as pd

    d = pd.read_csv(Path(entry) / "distances.csv", index_col=0).loc[names, names].to_numpy()
    vectors = np.load(Path(entry) / "vectors.npy")
    off = ~np.eye(len(names), dtype=bool)
    pairwise = np.linalg.norm(vectors[:, None, :] - vectors[None, :, :], axis=-1)
    out = {"mean_distance": float(d[off].mean()),
           "relative_spread": float(pairwise[off].mean() / np.linalg.norm(vectors, axis=1).mean())}
    if source in names and assistant in names and source != assistant:
        out["source_assistant"] = float(d[names.index(source), names.index(assistant)])
    return out
