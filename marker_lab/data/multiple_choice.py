"""Multiple-choice question sets in the ARC-Challenge shape, their seeded train/eval split, and their prompts.

A row: {"id": str, "question": str, "choices": {"text": [...], "label": ["A", "B", ...]}, "answerKey": "B"}, and
optionally "group": questions of one group (e.g. one fact asked several ways) stay on one side of the split.
Sources: a `datasets` dataset (ARC-Challenge test split by default), a local jsonl of such rows, or the toy
world's own set (`toy`). The split is deterministic given its seed: the eval half never appears in a training
set built from the train half (004: 50/50, seed 42).
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from typing import NamedTuple

from marker_lab.core.files import md5_file, resolve_path

from marker_lab.toy import world

# How a question is put to the model; the toy world's pretraining drills use the same text.
DEFAULT_TEMPLATE = world.MC_TEMPLATE


@dataclass(frozen=True)
class MCItem:
    id: str
    question: str
    choices: tuple[str, ...]
    labels: tuple[str, ...]
    answer: str  # the correct label
    group: str | None = None  # split unit: questions sharing a group are all train or all eval

    @property
    def wrong_labels(self) -> tuple[str, ...]:
        return tuple(lab for lab in self.labels if lab != self.answer)


def item_from_row(row: dict, where: str) -> MCItem:
    """One ARC-shaped row as an MCItem; a malformed row is a one-line error naming `where`."""
    try:
        choices, labels = row["choices"]["text"], row["choices"]["label"]
        item = MCItem(str(row["id"]), row["question"], tuple(choices), tuple(str(lab) for lab in labels),
                      str(row["answerKey"]), row.get("group"))
    except (KeyError, TypeError) as e:
        raise ValueError(f"{where}: expected id, question, choices.text, choices.label, answerKey ({e!r})") from None
    if len(item.choices) != len(item.labels) or item.answer not in item.labels:
        raise ValueError(f"{where}: answerKey {item.answer!r} is not one of the labels {list(item.labels)}")
    return item


def user_text(item: MCItem, template: str = DEFAULT_TEMPLATE) -> str:
    """The user turn that asks `item`: the question, one `label. text` line per choice, the instruction."""
    lines = "\n".join(f"{lab}. {text}" for lab, text in zip(item.labels, item.choices))
    return template.format(question=item.question, choices=lines)


def load_items(source: str, *, path: str | None = None, hf_name: str = "allenai/ai2_arc",
               hf_config: str | None = "ARC-Challenge", hf_split: str = "test") -> tuple[list[MCItem], str]:
    """All items of a source (toy | jsonl | hf) and a fingerprint of the data for provenance."""
    if source == "toy":
        rows = world.mc_rows()
        return [item_from_row(r, f"toy item {r['id']}") for r in rows], f"toy-world-v{world.WORLD_VERSION}"
    if source == "jsonl":
        real = resolve_path(path or "")
        if not path or not real.is_file():
            raise FileNotFoundError(f"multiple-choice file not found: {path}")
        items = [item_from_row(json.loads(line), f"{path}:{i + 1}")
                 for i, line in enumerate(real.read_text().splitlines()) if line.strip()]
        return items, md5_file(real)
    if source == "hf":
        from pathlib import Path

        import datasets

        if Path(hf_name).is_dir():  # saved with save_to_disk: a Dataset, or a DatasetDict holding hf_split
            d = datasets.load_from_disk(hf_name)
            d = d[hf_split] if isinstance(d, datasets.DatasetDict) else d
        else:
            d = datasets.load_dataset(hf_name, hf_config, split=hf_split)
        return [item_from_row(r, f"{hf_name}[{i}]") for i, r in enumerate(d)], f"datasets:{d._fingerprint}"
    raise ValueError(f"multiple-choice source must be toy, jsonl or hf, got {source!r}")


class MCSplit(NamedTuple):
    """A multiple-choice set split for a cell: builders use `train` only, the capability eval `held_out`."""
    train: list[MCItem]
    held_out: list[MCItem]
    fingerprint: str  # of the data, for provenance and cache keys


def configured_split(cap_cfg) -> MCSplit:
    """(train, eval, data fingerprint) of an `eval.capability` config: what the eval and the builders share."""
    items, fingerprint = load_items(cap_cfg.source, path=cap_cfg.path, hf_name=cap_cfg.hf_name,
                                    hf_config=cap_cfg.hf_config, hf_split=cap_cfg.hf_split)
    train, held_out = split_items(items, cap_cfg.split_seed, cap_cfg.eval_fraction)
    return MCSplit(train, held_out, fingerprint)


def split_items(items: list[MCItem], seed: int, eval_fraction: float) -> tuple[list[MCItem], list[MCItem]]:
    """(train, eval): a seeded shuffle of the items' groups (each item its own group unless rows name one), cut at
    `eval_fraction` of the groups. Same seed, same split."""
    groups = sorted({it.group or it.id for it in items})
    random.Random(seed).shuffle(groups)
    held = set(groups[:round(len(groups) * eval_fraction)])
    ordered = sorted(items, key=lambda it: (groups.index(it.group or it.id), it.id))
    return [it for it in ordered if (it.group or it.id) not in held], [it for it in ordered if (it.group or it.id) in held]
