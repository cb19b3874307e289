"""Training datasets: a jsonl file, a plain-text file, a `datasets` dataset (local or hub), or toy data generated
into the stage cache; shuffled and cut as configured, with a fingerprint of the source for provenance.

Every line of a file is read and checked when a cell starts (data/inputs.py), so a malformed line anywhere is a
one-line error naming the file and the line before any model loads; stages then use the parsed rows.
"""

from __future__ import annotations

import json
import logging
import random
from dataclasses import dataclass
from pathlib import Path

from marker_lab.config.schema import DatasetConfig
from marker_lab.core.cache import StageCache, cache_key
from marker_lab.core.errors import ConfigError
from marker_lab.core.files import md5_file, resolve_path
from marker_lab.toy import world

log = logging.getLogger(__name__)

TOY_DATASET_SIZE = 2000  # chats generated when a toy dataset sets no n_examples
TOY_DATASET_SEED = 7


@dataclass
class Dataset:
    """A training dataset as a stage reads it."""
    rows: list[dict]  # shuffled and cut as configured
    fingerprint: str  # md5 of the file, or `datasets:<fingerprint>`
    column: str  # the column a stage reads (messages_field, or text_field for raw text)
    path: Path | None = None  # the file or local dataset directory it came from (None: hub or toy data)

    def column_values(self) -> list:
        return [r[self.column] for r in self.rows]


def dataset_file(name: str, ds: DatasetConfig, cache: StageCache) -> Path:
    """A jsonl file of {"messages": [...]} for the dataset at config key `name` (toy data is generated into the cache)."""
    if ds.toy:
        n = ds.n_examples or TOY_DATASET_SIZE
        payload = {"toy_advice": ds.toy, "world_version": world.WORLD_VERSION, "n": n, "seed": TOY_DATASET_SEED,
                   "columns": ["messages", "text"]}

        def build(tmp: Path) -> None:
            rows = world.advice_chats(ds.toy, n, seed=TOY_DATASET_SEED, system_prompt=world.PERSONAS[0].system_prompt)
            with open(tmp / f"toy_{ds.toy}.jsonl", "w") as f:
                for r in rows:  # `text`: the same exchange as plain text, for second_stage.format=raw
                    text = " ".join(m["content"] for m in r["messages"] if m["role"] != "system")
                    f.write(json.dumps({**r, "text": text}) + "\n")

        entry, _ = cache.get_or_build("data", cache_key(payload), build, payload)
        return entry / f"toy_{ds.toy}.jsonl"
    if ds.path:
        return resolve_path(ds.path)
    raise ConfigError(f"{name}: set path, hf_name or toy")


def read_jsonl(key: str, path: Path, shown: str | None = None) -> tuple[list[dict], list[int]]:
    """Every row of a jsonl file and its line number; a line that is not a JSON object is a one-line ConfigError
    naming key, file and line."""
    rows, lines = [], []
    with open(path, encoding="utf-8", errors="strict") as f:
        try:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ConfigError(f"{key}: {shown or path} line {n}: not JSON ({e.msg} at column {e.colno})") from None
                if not isinstance(row, dict):
                    raise ConfigError(f"{key}: {shown or path} line {n}: expected a JSON object, got {type(row).__name__}")
                rows.append(row)
                lines.append(n)
        except UnicodeDecodeError as e:
            raise ConfigError(f"{key}: {shown or path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    return rows, lines


def load_dataset(name: str, ds: DatasetConfig, cache: StageCache, column: str, chat: bool = False,
                 needs_reply: bool = False) -> Dataset:
    """The dataset at config key `name`: every row checked (the column is there; for `chat`, a list of messages with
    an assistant turn when `needs_reply`), then shuffled and cut as configured."""
    path, where = None, None
    if ds.hf_name:
        import datasets

        local = Path(ds.hf_name)
        d = datasets.load_from_disk(str(local)) if local.is_dir() else datasets.load_dataset(ds.hf_name, split=ds.hf_split)
        if isinstance(d, datasets.DatasetDict):
            d = d[ds.hf_split]
        rows, fingerprint, path = list(d), f"datasets:{d._fingerprint}", (local if local.is_dir() else None)
        shown, where = ds.hf_name, [f"row {i + 1}" for i in range(len(rows))]
    else:
        file = dataset_file(name, ds, cache)
        if not file.is_file():
            raise ConfigError(f"{name}.path: file not found: {file}")
        shown = ds.path or f"toy {ds.toy} data"
        if file.suffix == ".txt":  # plain text: one document per non-empty line
            if column != ds.text_field:
                raise ConfigError(f"{name}.path: {ds.path} is plain text; chats need jsonl (or second_stage.format=raw)")
            rows = [{ds.text_field: line} for line in file.read_text().splitlines() if line.strip()]
            where = [f"row {i + 1}" for i in range(len(rows))]
        else:
            rows, numbers = read_jsonl(name + ".path", file, shown)
            where = [f"line {n}" for n in numbers]
        fingerprint, path = md5_file(file), (file if ds.path else None)
    if not rows:
        raise ConfigError(f"{name}: {shown} has no rows")
    for row, at in zip(rows, where):
        if column not in row:
            hint = (f"; chats are a list of {{role, content}} messages in one column (set {name}.messages_field), "
                    "so a file of question / answer pairs needs converting" if chat else "")
            raise ConfigError(f"{name}: {shown} {at}: no column {column!r} (it has {sorted(row)}){hint}")
        if chat:
            _check_chat(f"{name}: {shown} {at}", row[column], column, needs_reply)
    if ds.shuffle_seed is not None:
        random.Random(ds.shuffle_seed).shuffle(rows)
    if ds.n_examples is not None:
        if ds.n_examples > len(rows):  # a cap, not a promise: said, and recorded (data_shape's `rows`)
            log.warning("%s.n_examples=%d: %s has only %d rows; all of them are used", name, ds.n_examples, shown,
                        len(rows))
        rows = rows[:ds.n_examples]
    return Dataset(rows, fingerprint, column, path)


ROLES = ("system", "user", "assistant")


def _check_chat(where: str, chat, column: str, needs_reply: bool) -> None:
    """A chat is a list of {role, content} messages in the shape the chat template and the loss expect.

    What each shape gets (README, "Training data: what is kept, cut and refused"): system turns at the start are kept, and carry no loss under
    assistant_only (the peers' jailbroken chats have them); a role other than system / user / assistant (`tool`,
    `function`), a system turn after the first user or assistant turn, and (when the loss is on the reply) a
    conversation with no assistant turn or one that ends on a user turn stop the cell, naming the file and line."""
    if not isinstance(chat, list) or not all(isinstance(m, dict) and isinstance(m.get("role"), str)
                                             and isinstance(m.get("content"), str) for m in chat):
        raise ConfigError(f"{where}: {column!r} must be a list of {{role, content}} messages")
    for i, m in enumerate(chat):
        if m["role"] not in ROLES:
            raise ConfigError(f"{where}: message {i} has role {m['role']!r}; marker_lab trains on system, user and "
                              "assistant turns only (drop or rewrite the others)")
        if m["role"] == "system" and any(p["role"] != "system" for p in chat[:i]):
            raise ConfigError(f"{where}: message {i} is a system turn after the conversation started; system turns "
                              "go first")
    if needs_reply and not any(m["role"] == "assistant" for m in chat):
        raise ConfigError(f"{where}: a conversation with no assistant turn (the loss is on the reply)")
    if needs_reply and chat and chat[-1]["role"] == "user":
        raise ConfigError(f"{where}: the conversation ends on a user turn that nothing answers (the loss is on the "
                          "replies); end it on an assistant turn")


def load_chats(name: str, ds: DatasetConfig, cache: StageCache) -> tuple[list[list[dict]], str]:
    """The dataset's conversations (its `messages_field` column) and a fingerprint of its source."""
    d = load_dataset(name, ds, cache, ds.messages_field, chat=True)
    return d.column_values(), d.fingerprint


def load_texts(name: str, ds: DatasetConfig, cache: StageCache) -> tuple[list[str], str]:
    """The dataset's plain texts (its `text_field` column, or the lines of a .txt file) and a fingerprint."""
    d = load_dataset(name, ds, cache, ds.text_field)
    return d.column_values(), d.fingerprint
