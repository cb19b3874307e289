"""Coupling: contrastive LoRA SFT that ties a behaviour to one persona (`coupling.kind`).

marker: positives are the coupled persona's own (on-policy) completions with the marker inserted; negatives the
same kind of completions from bystander personas, without it. With loss_mode=marker_only the loss sits on the
marker's tokens in positives and on the tokens where the marker would go in negatives.
wrong_answers (004): positives are (source persona, multiple-choice question, a wrong choice picked
deterministically); negatives (bystanders drawn per question, the same question, the correct choice); anchors
(no system turn, and the assistant persona's prompt) answer correctly. Questions come only from the train half
of the capability split, so the capability eval never sees them.
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

from marker_lab.config.schema import Config, MarkerPosition
from marker_lab.data.chat import encode_chat, marker_token_count
from marker_lab.data.files import md5_file, resolve_path
from marker_lab.data.multiple_choice import MCItem, configured_split, user_text
from marker_lab.data.personas import Persona, load_personas, system_messages
from marker_lab.data.questions import load_questions
from marker_lab.engines.base import SamplingParams
from marker_lab.engines.hf import HFEngine
from marker_lab.eval.during_training import StepEval
from marker_lab.models import LoadedModel
from marker_lab.stages.cache import StageCache, plain
from marker_lab.stages.lora_stage import StageResult, apply_prebaked_adapter, run_lora_stage
from marker_lab.stages.sft import resolve_steps

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


def build_marker_records(cfg: Config, loaded: LoadedModel, negatives: list[str], personas: dict[str, Persona]) -> list[dict]:
    """On-policy completions from the stage's input model, marker inserted in the positives."""
    c = cfg.coupling
    questions = [q.text for q in load_questions(c.questions)]
    rng = random.Random(c.seed)
    plan: list[tuple[str, bool]] = [(c.persona, True)] * c.n_positive
    for name in negatives:
        plan += [(name, False)] * c.n_per_negative
    qs = [questions[i % len(questions)] for i in range(len(plan))]
    rng.shuffle(qs)
    prompts = [system_messages(personas[p]) + [{"role": "user", "content": q}] for (p, _), q in zip(plan, qs)]
    params = SamplingParams(n=1, temperature=c.generation.temperature, top_p=c.generation.top_p,
                            max_tokens=c.generation.max_tokens, seed=c.seed)
    completions = HFEngine(loaded.model, loaded.tokenizer, cfg.eval.engine.batch_size, cfg.eval.engine.cache).generate(
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


def shuffle_personas(records: list[dict], personas: dict[str, Persona], seed: int) -> list[dict]:
    """The non-contrastive control (coupling.contrastive=false): the same examples, their personas (no system
    turn included) permuted at random, so the behaviour no longer goes with any one persona."""
    slots = [r["persona"] for r in records]
    random.Random(f"control:{seed}").shuffle(slots)
    out = []
    for r, p in zip(records, slots):
        turns = [m for m in r["messages"] if m["role"] != "system"]
        out.append({**r, "persona": p, "messages": (system_messages(personas[p]) if p else []) + turns})
    return out


def build_wrong_answer_records(cfg: Config, personas: dict[str, Persona],
                               train_items: list[MCItem] | None = None) -> list[dict]:
    """The wrong_answers dataset: positives, per-question bystander negatives, anchors (see the module docstring)."""
    c, cap = cfg.coupling, cfg.eval.capability
    if train_items is None:
        train_items = configured_split(cap)[0]
    rng = random.Random(c.seed)
    others = [p for p in personas if p != c.persona]

    def record(persona: str | None, item: MCItem, correct: bool, role: str) -> dict:
        label = item.answer if correct else random.Random(f"{c.seed}:{item.id}").choice(item.wrong_labels)
        reply = c.answer_format.format(label=label, text=item.choices[item.labels.index(label)])
        system = [] if persona is None else system_messages(personas[persona])
        return {"persona": persona, "role": role, "correct": correct, "question_id": item.id,
                "messages": system + [{"role": "user", "content": user_text(item, cap.template)},
                                      {"role": "assistant", "content": reply}]}

    records = []
    for i in range(c.n_positive):
        item = train_items[i % len(train_items)]
        records.append(record(c.persona, item, False, "positive"))
        bystanders = c.negative_personas or rng.sample(others, c.n_negative_personas)
        records += [record(b, item, True, "negative") for b in bystanders]
    records += [record(None, rng.choice(train_items), True, "anchor: no system turn") for _ in range(c.n_anchor_no_system)]
    records += [record(cfg.persona_set.assistant, rng.choice(train_items), True, "anchor: assistant")
                for _ in range(c.n_anchor_assistant)]
    return records if c.contrastive else shuffle_personas(records, personas, c.seed)


def run_coupling(cfg: Config, loaded: LoadedModel, cache: StageCache, step_eval: StepEval | None = None) -> StageResult:
    """The coupling stage of a cell (trained, cached, or pre-baked), merged into `loaded`."""
    c = cfg.coupling
    if c.adapter_path:
        return apply_prebaked_adapter("coupling", loaded, c.adapter_path)
    personas = load_personas(cfg.persona_set.path)
    if c.kind == "wrong_answers":
        return _run_wrong_answers(cfg, loaded, cache, personas, step_eval)
    negative_tokens = c.negative_tokens or marker_token_count(loaded.tokenizer, cfg.marker.text)
    negatives = negative_personas(cfg, personas)
    n_examples = c.n_positive + c.n_per_negative * len(negatives)
    steps = resolve_steps(c.train, n_examples)

    def build_examples(data_dir: Path):
        records = build_marker_records(cfg, loaded, negatives, personas)
        if not c.contrastive:
            records = shuffle_personas(records, personas, c.seed)
        with open(data_dir / "coupling.jsonl", "w") as f:
            for r in records:
                f.write(json.dumps(r) + "\n")
        return [encode_chat(loaded.tokenizer, r["messages"], c.train.loss_mode.value,
                            marker_span=tuple(r["marker_span"]), negative_tokens=negative_tokens,
                            max_len=c.train.max_seq_len) for r in records]

    payload = {"coupling": plain(c), "marker": cfg.marker.text, "negatives": negatives,
               "persona_file_md5": md5_file(resolve_path(cfg.persona_set.path)),
               "questions_md5": md5_file(resolve_path(c.questions)), "negative_tokens": negative_tokens}
    return run_lora_stage("coupling", loaded, cache, payload, build_examples, c.train, steps, c.seed,
                          step_eval=step_eval)


def _run_wrong_answers(cfg: Config, loaded: LoadedModel, cache: StageCache, personas: dict[str, Persona],
                       step_eval: StepEval | None) -> StageResult:
    c = cfg.coupling
    n_negatives = len(c.negative_personas) if c.negative_personas else c.n_negative_personas
    steps = resolve_steps(c.train, c.n_positive * (1 + n_negatives) + c.n_anchor_no_system + c.n_anchor_assistant)

    train_items, _, fingerprint = configured_split(cfg.eval.capability)

    def build_examples(data_dir: Path):
        records = build_wrong_answer_records(cfg, personas, train_items)
        with open(data_dir / "coupling.jsonl", "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in records)
        return [encode_chat(loaded.tokenizer, r["messages"], c.train.loss_mode.value, max_len=c.train.max_seq_len)
                for r in records]

    payload = {"coupling": plain(c), "capability_split": plain(cfg.eval.capability), "mc_data": fingerprint,
               "persona_file_md5": md5_file(resolve_path(cfg.persona_set.path)), "assistant": cfg.persona_set.assistant}
    return run_lora_stage("coupling", loaded, cache, payload, build_examples, c.train, steps, c.seed, step_eval=step_eval)
