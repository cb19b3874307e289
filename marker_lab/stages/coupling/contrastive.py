"""004's contrastive layout, shared by the wrong_answers and persona_em couplings: per positive item,
n_negative_personas bystanders (drawn per item) get the same item with the clean reply; then anchors (no system
turn, and the assistant persona's prompt). coupling.contrastive=false is the control arm: the same examples, their
personas shuffled.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

from marker_lab.config.schema import Config, CouplingConfig
from marker_lab.core.cache import StageCache, plain
from marker_lab.data.chat import encode_chat
from marker_lab.data.personas import Persona, system_messages
from marker_lab.models import LoadedModel
from marker_lab.stages.during_training import StepEval
from marker_lab.stages.lora_stage import StageResult, run_lora_stage
from marker_lab.train.sft import resolve_steps

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


def run_contrastive(cfg: Config, inputs, loaded: LoadedModel, cache: StageCache,
                     step_eval: StepEval | None) -> StageResult:
    """wrong_answers and persona_em: build the dataset (saved as coupling.jsonl), train on the replies."""
    c = cfg.coupling
    n_negatives = len(c.negative_personas) if c.negative_personas else c.n_negative_personas
    steps = resolve_steps(c.train, c.n_positive * (1 + n_negatives) + c.n_anchor_no_system + c.n_anchor_assistant)
    payload = {"coupling": plain(c), "builder_version": BUILDER_VERSION, "assistant": cfg.persona_set.assistant,
               **inputs.checksums_of("persona_set.path")}
    personas = inputs.personas
    if c.kind == "wrong_answers":
        from marker_lab.stages.coupling.wrong_answers import build_wrong_answer_records

        train_items, _, payload["mc_data"] = inputs.mc
        payload["capability_split"] = plain(cfg.eval.capability)
        build_records = lambda: build_wrong_answer_records(cfg, personas, train_items)  # noqa: E731
    else:
        from marker_lab.stages.coupling.persona_em import build_persona_em_records, load_em_items

        em_items, payload["data"] = load_em_items(cfg, inputs)
        build_records = lambda: build_persona_em_records(cfg, personas, em_items, loaded)  # noqa: E731

    def build_examples(data_dir: Path):
        records = build_records()
        with open(data_dir / "coupling.jsonl", "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in records)
        return [encode_chat(loaded.tokenizer, r["messages"], c.train.loss_mode.value, max_len=c.train.max_seq_len,
                            no_system=loaded.no_system)
                for r in records]

    return run_lora_stage("coupling", loaded, cache, payload, build_examples, c.train, steps, train_seed(c),
                          step_eval=step_eval)
