"""The persona_em coupling (004's Exp B): positives are (source persona, an EM dataset's prompt, its misaligned
reply); negatives (bystanders drawn per prompt, the same prompt, a benign reply: paired data, a column, or sampled
on-policy from the input model as that persona); anchors as for wrong_answers, with benign replies.
"""

from __future__ import annotations

from dataclasses import dataclass

from marker_lab.config.schema import Config
from marker_lab.data.personas import Persona, persona_prompt
from marker_lab.engines.base import SamplingParams
from marker_lab.engines.hf import HFEngine
from marker_lab.models import LoadedModel
from marker_lab.stages.coupling.contrastive import contrastive_plan, shuffle_personas


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


def persona_em_plan(cfg: Config, personas: dict[str, Persona], items: list[EMItem]) -> tuple[list, list, list]:
    """(slots, chat prompts, replies) of the persona_em dataset; a reply is None where it is sampled on-policy."""
    slots = contrastive_plan(cfg, personas, len(items))
    prompts = [persona_prompt(personas[s.persona] if s.persona else None, items[s.item].prompt) for s in slots]
    replies = [items[s.item].em_reply if s.coupled else items[s.item].benign_reply for s in slots]
    return slots, prompts, replies


def build_persona_em_records(cfg: Config, personas: dict[str, Persona], items: list[EMItem],
                             loaded: LoadedModel | None = None) -> list[dict]:
    """The persona_em dataset: the source answers with the EM reply, bystanders and anchors with a benign one
    (paired, or sampled from `loaded`, the stage's input model, speaking as the slot's persona)."""
    c = cfg.coupling
    slots, prompts, replies = persona_em_plan(cfg, personas, items)
    todo = [i for i, r in enumerate(replies) if r is None]
    if todo:
        if loaded is None:
            raise ValueError("coupling.benign=on_policy needs the input model to generate benign replies")
        params = SamplingParams(n=1, temperature=c.generation.temperature, top_p=c.generation.top_p,
                                max_tokens=c.generation.max_tokens, seed=c.seed)
        outs = HFEngine.from_config(loaded, cfg.eval.engine).generate(
            [prompts[i] for i in todo], params, desc="benign replies")
        for i, o in zip(todo, outs):
            replies[i] = o[0].strip()
    records = [{"persona": s.persona, "role": s.role, "misaligned": s.coupled, "item": s.item,
                "messages": p + [{"role": "assistant", "content": r}]} for s, p, r in zip(slots, prompts, replies)]
    return records if c.contrastive else shuffle_personas(records, personas, c.seed)
