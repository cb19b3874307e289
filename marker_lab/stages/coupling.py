"""Coupling: contrastive LoRA SFT that ties a behaviour to one persona (`coupling.kind`).

marker: positives are the coupled persona's own (on-policy) completions with the marker inserted; negatives the
same kind of completions from bystander personas, without it. With loss_mode=marker_only the loss sits on the
marker's tokens in positives and on the tokens where the marker would go in negatives.
wrong_answers (004): positives are (source persona, multiple-choice question, a wrong choice picked
deterministically); negatives (bystanders drawn per question, the same question, the correct choice); anchors
(no system turn, and the assistant persona's prompt) answer correctly. Questions come only from the train half
of the capability split, so the capability eval never sees them.
persona_em (004's Exp B): positives are (source persona, an EM dataset's prompt, its misaligned reply); negatives
(bystanders drawn per prompt, the same prompt, a benign reply: paired data, a column, or sampled on-policy from
the input model as that persona); anchors as for wrong_answers, with benign replies.
coupling.contrastive=false (both kinds, and marker) is the control arm: the same examples, personas shuffled.
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass
from pathlib import Path

from marker_lab.config.schema import Config, MarkerPosition
from marker_lab.data.chat import encode_chat, marker_token_count
from marker_lab.data.multiple_choice import MCItem, user_text
from marker_lab.data.personas import Persona, persona_prompt, system_messages
from marker_lab.engines.base import SamplingParams
from marker_lab.engines.hf import HFEngine
from marker_lab.stages.during_training import StepEval
from marker_lab.models import LoadedModel
from marker_lab.core.cache import StageCache, plain
from marker_lab.stages.lora_stage import StageResult, apply_prebaked_adapter, run_lora_stage
from marker_lab.train.sft import resolve_steps

# Part of every contrastive stage's cache key: bump it when a builder below changes what it writes, so a cache
# built by older code is not reused (keys cover configs and data, not code).
BUILDER_VERSION = 2

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
    completions = HFEngine.from_config(loaded.model, loaded.tokenizer, cfg.eval.engine).generate(
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


@dataclass(frozen=True)
class Slot:
    """One example of a contrastive dataset: who speaks (None: no system turn), which item, and whether it
    carries the coupled behaviour (positives) or the clean reply (negatives and anchors)."""
    persona: str | None
    item: int
    coupled: bool
    role: str


def contrastive_plan(cfg: Config, personas: dict[str, Persona], n_items: int) -> list[Slot]:
    """004's layout, shared by wrong_answers and persona_em: per positive item, n_negative_personas bystanders
    (drawn per item) get the same item with the clean reply; then the anchors (no system turn, the assistant)."""
    c = cfg.coupling
    rng = random.Random(c.seed)
    others = [p for p in personas if p != c.persona]
    slots = []
    for i in range(c.n_positive):
        slots.append(Slot(c.persona, i % n_items, True, "positive"))
        bystanders = c.negative_personas or rng.sample(others, c.n_negative_personas)
        slots += [Slot(b, i % n_items, False, "negative") for b in bystanders]
    slots += [Slot(None, rng.randrange(n_items), False, "anchor: no system turn") for _ in range(c.n_anchor_no_system)]
    slots += [Slot(cfg.persona_set.assistant, rng.randrange(n_items), False, "anchor: assistant")
              for _ in range(c.n_anchor_assistant)]
    return slots


def build_wrong_answer_records(cfg: Config, personas: dict[str, Persona], train_items: list[MCItem]) -> list[dict]:
    """The wrong_answers dataset: positives, per-question bystander negatives, anchors (see the module docstring)."""
    c, cap = cfg.coupling, cfg.eval.capability
    records = []
    for slot in contrastive_plan(cfg, personas, len(train_items)):
        item = train_items[slot.item]
        label = random.Random(f"{c.seed}:{item.id}").choice(item.wrong_labels) if slot.coupled else item.answer
        reply = c.answer_format.format(label=label, text=item.choices[item.labels.index(label)])
        records.append({"persona": slot.persona, "role": slot.role, "correct": not slot.coupled, "question_id": item.id,
                        "messages": persona_prompt(personas[slot.persona] if slot.persona else None, user_text(item, cap.template))
                        + [{"role": "assistant", "content": reply}]})
    return records if c.contrastive else shuffle_personas(records, personas, c.seed)


@dataclass(frozen=True)
class EMItem:
    prompt: str  # the user turn
    em_reply: str  # the misaligned reply (positives)
    benign_reply: str | None  # the paired benign reply; None when generated on-policy


def load_em_items(cfg: Config, inputs) -> tuple[list[EMItem], dict]:
    """persona_em's items from coupling.em_data (and benign_data / benign_field), and fingerprints of the sources."""
    c = cfg.coupling
    em = inputs.datasets["coupling.em_data"]
    rows = em.rows
    chats = [_chat_of(r, c.em_data.messages_field, "coupling.em_data", i) for i, r in enumerate(rows)]
    fingerprints = {"em_data": em.fingerprint}
    benign: list[str | None] = [None] * len(rows)
    if c.benign == "data":
        paired_data = inputs.datasets["coupling.benign_data"]
        paired, fingerprints["benign_data"] = paired_data.rows, paired_data.fingerprint
        if len(paired) < len(rows):
            raise ValueError(f"coupling.benign_data: {len(paired)} rows for {len(rows)} rows of coupling.em_data "
                             "(they pair row by row)")
        benign = []
        for i, (chat, row) in enumerate(zip(chats, paired)):
            other = _chat_of(row, c.benign_data.messages_field, "coupling.benign_data", i)
            if _turn(other, "user", first=True) != _turn(chat, "user", first=True):
                raise ValueError(f"coupling.benign_data: row {i} asks a different prompt than coupling.em_data's row "
                                 f"{i} (they pair row by row)")
            benign.append(_turn(other, "assistant"))
    elif c.benign == "field":
        benign = []
        for i, row in enumerate(rows):
            if c.benign_field not in row:
                raise KeyError(f"coupling.benign_field: row {i} of coupling.em_data has no column {c.benign_field!r}")
            v = row[c.benign_field]
            benign.append(v if isinstance(v, str) else _turn(v, "assistant"))
    items = [EMItem(_turn(chat, "user", first=True), _turn(chat, "assistant"), b) for chat, b in zip(chats, benign)]
    return items, fingerprints


def _chat_of(row: dict, field_name: str, key: str, i: int) -> list[dict]:
    if field_name not in row:
        raise KeyError(f"{key}.messages_field: row {i} has no column {field_name!r} (has {sorted(row)})")
    return row[field_name]


def _turn(chat: list[dict], role: str, first: bool = False) -> str:
    turns = [m["content"] for m in chat if m["role"] == role]
    if not turns:
        raise ValueError(f"a chat without a {role} turn: {chat!r:.200}")
    return turns[0] if first else turns[-1]


def build_persona_em_records(cfg: Config, personas: dict[str, Persona], items: list[EMItem],
                             loaded: LoadedModel | None = None) -> list[dict]:
    """The persona_em dataset: the source answers with the EM reply, bystanders and anchors with a benign one
    (paired, or sampled from `loaded`, the stage's input model, speaking as the slot's persona)."""
    c = cfg.coupling
    slots = contrastive_plan(cfg, personas, len(items))
    prompts = [persona_prompt(personas[s.persona] if s.persona else None, items[s.item].prompt) for s in slots]
    replies = [items[s.item].em_reply if s.coupled else items[s.item].benign_reply for s in slots]
    todo = [i for i, r in enumerate(replies) if r is None]
    if todo:
        if loaded is None:
            raise ValueError("coupling.benign=on_policy needs the input model to generate benign replies")
        params = SamplingParams(n=1, temperature=c.generation.temperature, top_p=c.generation.top_p,
                                max_tokens=c.generation.max_tokens, seed=c.seed)
        outs = HFEngine.from_config(loaded.model, loaded.tokenizer, cfg.eval.engine).generate(
            [prompts[i] for i in todo], params, desc="benign replies")
        for i, o in zip(todo, outs):
            replies[i] = o[0].strip()
    records = [{"persona": s.persona, "role": s.role, "misaligned": s.coupled, "item": s.item,
                "messages": p + [{"role": "assistant", "content": r}]} for s, p, r in zip(slots, prompts, replies)]
    return records if c.contrastive else shuffle_personas(records, personas, c.seed)


def run_coupling(cfg: Config, inputs, loaded: LoadedModel, cache: StageCache,
                 step_eval: StepEval | None = None) -> StageResult:
    """The coupling stage of a cell (trained, cached, or pre-baked), merged into `loaded`."""
    c = cfg.coupling
    if c.adapter_path:
        return apply_prebaked_adapter("coupling", loaded, inputs.files["coupling.adapter_path"])
    personas = inputs.personas
    if c.kind in ("wrong_answers", "persona_em"):
        return _run_contrastive(cfg, inputs, loaded, cache, step_eval)
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
        return [encode_chat(loaded.tokenizer, r["messages"], c.train.loss_mode.value,
                            marker_span=tuple(r["marker_span"]), negative_tokens=negative_tokens,
                            max_len=c.train.max_seq_len) for r in records]

    payload = {"coupling": plain(c), "marker": cfg.marker.text, "negatives": negatives,
               "persona_file_md5": inputs.checksum("persona_set.path"),
               "questions_md5": inputs.checksum("coupling.questions"), "negative_tokens": negative_tokens}
    return run_lora_stage("coupling", loaded, cache, payload, build_examples, c.train, steps, c.seed,
                          step_eval=step_eval)


def _run_contrastive(cfg: Config, inputs, loaded: LoadedModel, cache: StageCache,
                     step_eval: StepEval | None) -> StageResult:
    """wrong_answers and persona_em: build the dataset (saved as coupling.jsonl), train on the replies."""
    c = cfg.coupling
    n_negatives = len(c.negative_personas) if c.negative_personas else c.n_negative_personas
    steps = resolve_steps(c.train, c.n_positive * (1 + n_negatives) + c.n_anchor_no_system + c.n_anchor_assistant)
    payload = {"coupling": plain(c), "builder_version": BUILDER_VERSION, "assistant": cfg.persona_set.assistant,
               "persona_file_md5": inputs.checksum("persona_set.path")}
    personas = inputs.personas
    if c.kind == "wrong_answers":
        train_items, _, payload["mc_data"] = inputs.mc
        payload["capability_split"] = plain(cfg.eval.capability)
        build_records = lambda: build_wrong_answer_records(cfg, personas, train_items)  # noqa: E731
    else:
        em_items, payload["data"] = load_em_items(cfg, inputs)
        build_records = lambda: build_persona_em_records(cfg, personas, em_items, loaded)  # noqa: E731

    def build_examples(data_dir: Path):
        records = build_records()
        with open(data_dir / "coupling.jsonl", "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in records)
        return [encode_chat(loaded.tokenizer, r["messages"], c.train.loss_mode.value, max_len=c.train.max_seq_len)
                for r in records]

    return run_lora_stage("coupling", loaded, cache, payload, build_examples, c.train, steps, c.seed, step_eval=step_eval)


def check_coupling(cfg: Config, inputs) -> None:
    """The coupling recipe against the persona set and its data (loaded by data/inputs.py)."""
    from marker_lab.core.errors import ConfigError
    from marker_lab.engines.base import check_sampling
    from marker_lab.train.sft import check_train

    c = cfg.coupling
    inputs.require_persona("coupling.persona", c.persona, cfg)
    if c.kind == "marker" and any(q.system is not None for q in inputs.questions.get("coupling.questions", [])):
        raise ConfigError(f"coupling.questions: {c.questions} gives questions their own system prompt; "
                          "coupling prompts take the persona's system prompt only (remove the `system` fields)")
    if c.kind == "persona_em":
        if c.benign == "field" and not c.benign_field:
            raise ConfigError("coupling.benign_field: required when coupling.benign=field (em_data's benign column)")
        for key in ("coupling.em_data", "coupling.benign_data"):
            ds = getattr(c, key.split(".")[1])
            if key in inputs.datasets and ds.toy is not None and cfg.model.source != "toy":
                raise ConfigError(f"{key}.toy: toy data needs model.source=toy (model is {cfg.model.name})")
        if c.benign == "field" and c.benign_field not in inputs.datasets["coupling.em_data"].rows[0]:
            raise ConfigError(f"coupling.em_data: {c.em_data.path or c.em_data.hf_name} has no column "
                              f"{c.benign_field!r} (coupling.benign_field)")
    if c.kind == "wrong_answers":
        try:
            c.answer_format.format(label="A", text="t")
        except (KeyError, IndexError, ValueError) as e:
            raise ConfigError(f"coupling.answer_format: only {{label}} and {{text}} can be filled in ({e!r})") from None
    if c.kind != "marker" and c.train.loss_mode == "marker_only":
        raise ConfigError(f"coupling.train.loss_mode: marker_only needs a marker; {c.kind} trains on the reply "
                          "(assistant_only)")
    for p in c.negative_personas or []:
        inputs.require_persona("coupling.negative_personas", p, cfg)
        if p == c.persona:
            raise ConfigError(f"coupling.negative_personas: {p!r} is the coupled persona itself")
    if c.negative_personas is None and c.n_negative_personas > len(inputs.personas) - 1:
        raise ConfigError(f"coupling.n_negative_personas: {c.n_negative_personas} requested but the set has "
                          f"only {len(inputs.personas) - 1} other personas")
    if c.n_positive < 1:
        raise ConfigError(f"coupling.n_positive: must be >= 1, got {c.n_positive}")
    check_sampling("coupling.generation", c.generation)
    check_train("coupling.train", c.train)
