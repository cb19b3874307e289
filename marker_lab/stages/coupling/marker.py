"""The marker coupling (coupling.kind=marker): positives are the coupled persona's own (on-policy) completions with
the marker inserted; negatives the same kind of completions from bystander personas, without it. With
loss_mode=marker_only the loss sits on the marker's tokens in positives and on the tokens where the marker would go
in negatives. coupling.contrastive=false is the control: the same examples, personas shuffled.
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

from marker_lab.config.schema import Config, MarkerPosition
from marker_lab.core.cache import StageCache, plain
from marker_lab.data.chat import encode_chats, marker_token_count
from marker_lab.data.truncation import fit_to_length
from marker_lab.data.personas import Persona, persona_prompt
from marker_lab.engines.base import SamplingParams
from marker_lab.engines.hf import HFEngine
from marker_lab.models import LoadedModel
from marker_lab.stages.coupling.contrastive import shuffle_personas, train_seed
from marker_lab.stages.during_training import StepEval
from marker_lab.stages.lora_stage import StageResult, run_lora_stage
from marker_lab.train.steps import resolve_steps

_SENTENCE_END = re.compile(r"[.!?](\s|$)")


def insert_marker(completion: str, marker: str, position: MarkerPosition) -> tuple[str, tuple[int, int]]:
    """The completion with the marker in place, and the marker's character span in it."""
    if position == MarkerPosition.start:
        return f"{marker} {completion}", (0, len(marker))
    cut = None
    if position == MarkerPosition.after_first_sentence:
        m = _SENTENCE_END.search(completion)
        cut = m.start() + 1 if m else None
    if cut is None or cut >= len(completion):  # end, or a single sentence
        text = f"{completion} {marker}"
        return text, (len(text) - len(marker), len(text))
    text = f"{completion[:cut]} {marker}{completion[cut:]}"
    return text, (cut + 1, cut + 1 + len(marker))


def marker_slot(completion: str, position: MarkerPosition) -> int:
    """Where the marker would go in a negative (an empty span there)."""
    if position == MarkerPosition.start:
        return 0
    if position == MarkerPosition.after_first_sentence:
        m = _SENTENCE_END.search(completion)
        if m and m.start() + 1 < len(completion):
            return m.end()
    return len(completion)


def negative_personas(cfg: Config, personas: dict[str, Persona]) -> list[str]:
    """The bystanders that get negatives: the explicit list, or a seeded sample of the others."""
    c = cfg.coupling
    if c.negative_personas is not None:
        return list(c.negative_personas)
    others = [p for p in personas if p != c.persona]
    return sorted(random.Random(c.seed).sample(others, c.n_negative_personas))


def build_marker_records(cfg: Config, loaded: LoadedModel, negatives: list[str], personas: dict[str, Persona],
                         questions: list[str]) -> list[dict]:
    """On-policy completions from the stage's input model, marker inserted in the positives."""
    c = cfg.coupling
    rng = random.Random(c.seed)
    plan: list[tuple[str, bool]] = [(c.persona, True)] * c.n_positive
    for name in negatives:
        plan += [(name, False)] * c.n_per_negative
    qs = [questions[i % len(questions)] for i in range(len(plan))]
    rng.shuffle(qs)
    prompts = [persona_prompt(personas[p], q) for (p, _), q in zip(plan, qs)]
    params = SamplingParams(n=1, temperature=c.generation.temperature, top_p=c.generation.top_p,
                            max_tokens=c.generation.max_tokens, seed=c.seed)
    completions = HFEngine.from_config(loaded, cfg.eval.engine).generate(
        prompts, params, desc="coupling data")
    records = []
    for (persona, positive), prompt, outs in zip(plan, prompts, completions):
        text = outs[0].strip()
        if positive:
            text, span = insert_marker(text, cfg.marker.text, c.marker_position)
        else:
            slot = marker_slot(text, c.marker_position)
            span = (slot, slot)
        records.append({"persona": persona, "positive": positive, "marker_span": list(span),
                        "messages": prompt + [{"role": "assistant", "content": text}]})
    return records


def run_marker(cfg: Config, inputs, loaded: LoadedModel, cache: StageCache,
               step_eval: StepEval | None = None) -> StageResult:
    """The marker coupling: on-policy completions, the marker inserted in the source's, trained on (cached)."""
    c = cfg.coupling
    personas = inputs.personas
    negative_tokens = c.negative_tokens or marker_token_count(loaded.tokenizer, cfg.marker.text)
    negatives = negative_personas(cfg, personas)
    n_examples = c.n_positive + c.n_per_negative * len(negatives)
    steps = resolve_steps(c.train, n_examples)

    def build_examples(data_dir: Path):
        records = build_marker_records(cfg, loaded, negatives, personas,
                                       [q.text for q in inputs.questions["coupling.questions"]])
        if not c.contrastive:
            records = shuffle_personas(records, personas, c.seed)
        with open(data_dir / "coupling.jsonl", "w") as f:
            for r in records:
                f.write(json.dumps(r) + "\n")
        whole = encode_chats(loaded.tokenizer, [r["messages"] for r in records], c.train.loss_mode.value,
                             marker_spans=[tuple(r["marker_span"]) for r in records], negative_tokens=negative_tokens,
                             no_system=loaded.no_system)
        return fit_to_length("coupling data", "coupling.train", whole, c.train.max_seq_len, c.train.truncation.value,
                             names=[r["persona"] for r in records], marker=c.train.loss_mode == "marker_only")

    payload = {"coupling": plain(c), "marker": cfg.marker.text, "negatives": negatives,
               **inputs.checksums_of("persona_set.path", "coupling.questions"), "negative_tokens": negative_tokens}
    return run_lora_stage("coupling", loaded, cache, payload, build_examples, c.train, steps, train_seed(c),
                          step_eval=step_eval)
