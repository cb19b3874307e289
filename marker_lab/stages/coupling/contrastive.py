"""004's contrastive layout, shared by the wrong_answers and persona_em couplings: per positive item,
n_negative_personas bystanders (drawn per item) get the same item with the clean reply; then anchors (no system
turn, and the assistant persona's prompt). coupling.contrastive=false is the control arm: the same examples, their
personas shuffled.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from marker_lab.config.schema import Config, CouplingConfig
from marker_lab.data.personas import Persona, system_messages

# Part of every contrastive stage's cache key: bump it when a builder changes what it writes, so a cache built by
# older code is not reused (keys cover configs and data, not code).
BUILDER_VERSION = 2


def train_seed(c: CouplingConfig) -> int:
    """The seed of the coupling's training (data order, LoRA init): coupling.train.seed, else coupling.seed (which
    also draws the data); one coupling seed serves every cell seed, as in the write-ups."""
    return c.train.seed if c.train.seed is not None else c.seed


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
