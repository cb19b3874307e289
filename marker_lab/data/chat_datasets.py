"""Chat datasets for the training stages: a jsonl file, a `datasets` dataset (local or hub), or toy data generated
into the stage cache; shuffled and cut as configured, with a fingerprint of the source for provenance."""

from __future__ import annotations

import json
import random
from pathlib import Path

from marker_lab.config.schema import DatasetConfig
from marker_lab.data.files import md5_file, resolve_path
from marker_lab.stages.cache import StageCache, cache_key
from marker_lab.toy import world

TOY_DATASET_SIZE = 2000  # chats generated when a toy dataset sets no n_examples
TOY_DATASET_SEED = 7


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
    raise ValueError(f"{name}: set path, hf_name or toy")


def load_rows(name: str, ds: DatasetConfig, cache: StageCache) -> tuple[list[dict], str]:
    """The dataset's rows (shuffled and cut as configured) and a fingerprint of its source."""
    if ds.hf_name:
        import datasets

        local = Path(ds.hf_name)
        d = datasets.load_from_disk(str(local)) if local.is_dir() else datasets.load_dataset(ds.hf_name, split=ds.hf_split)
        if isinstance(d, datasets.DatasetDict):
            d = d[ds.hf_split]
        rows, fingerprint = list(d), f"datasets:{d._fingerprint}"
    else:
        path = dataset_file(name, ds, cache)
        if not path.is_file():
            raise FileNotFoundError(f"{name}.path: file not found: {path}")
        with open(path) as f:
            if path.suffix == ".txt":  # plain text: one document per non-empty line
                rows = [{ds.text_field: line.rstrip("\n")} for line in f if line.strip()]
            else:
                rows = [json.loads(line) for line in f if line.strip()]
        fingerprint = md5_file(path)
    if ds.shuffle_seed is not None:
        random.Random(ds.shuffle_seed).shuffle(rows)
    if ds.n_examples is not None:
        rows = rows[:ds.n_examples]
    return rows, fingerprint


def load_chats(name: str, ds: DatasetConfig, cache: StageCache) -> tuple[list[list[dict]], str]:
    """The dataset's conversations (its `messages_field` column) and a fingerprint of its source."""
    return load_column(name, ds, cache, "messages_field")


def load_texts(name: str, ds: DatasetConfig, cache: StageCache) -> tuple[list[str], str]:
    """The dataset's plain texts (its `text_field` column, or the lines of a .txt file) and a fingerprint."""
    return load_column(name, ds, cache, "text_field")


def load_column(name: str, ds: DatasetConfig, cache: StageCache, field_key: str) -> tuple[list, str]:
    rows, fingerprint = load_rows(name, ds, cache)
    column = getattr(ds, field_key)
    if rows and column not in rows[0]:
        raise KeyError(f"{name}.{field_key}: no column {column!r} (has {sorted(rows[0])})")
    return [r[column] for r in rows], fingerprint
