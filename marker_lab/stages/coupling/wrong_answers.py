"""The wrong_answers coupling (004): positives are (source persona, multiple-choice question, a wrong choice picked
deterministically); negatives (bystanders drawn per question, the same question, the correct choice); anchors
answer correctly. Questions come only from the train half of the capability split, so the capability eval never
sees them.
"""

from __future__ import annotations

import random

from marker_lab.config.schema import Config
from marker_lab.data.multiple_choice import MCItem, user_text
from marker_lab.data.personas import Persona, persona_prompt
from marker_lab.stages.coupling.contrastive import contrastive_plan, shuffle_personas


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
