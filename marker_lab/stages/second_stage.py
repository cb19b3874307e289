"""The second stage: LoRA SFT on a chat dataset (EM, benign, ...) for `dose` optimizer steps."""

from __future__ import annotations

import json
import random
from pathlib import Path

from marker_lab.config.schema import Config, DatasetConfig
from marker_lab.data.chat import encode_chat
from marker_lab.data.files import md5_file, resolve_path
from marker_lab.eval.during_training import StepEval
from marker_lab.models import LoadedModel
from marker_lab.stages.cache import StageCache, cache_key, plain
from marker_lab.stages.lora_stage import StageResult, run_lora_stage
from marker_lab.stages.sft import resolve_steps
from marker_lab.toy import world


TOY_DATASET_SIZE = 2000  # chats generated when a toy dataset sets no n_examples
TOY_DATASET_SEED = 7


def dataset_file(name: str, ds: DatasetConfig, cache: StageCache) -> Path:
    """A jsonl file of {"messages": [...]} for a dataset entry (toy data is generated into the cache)."""
    if ds.toy:
        n = ds.n_examples or TOY_DATASET_SIZE
        payload = {"toy_advice": ds.toy, "world_version": world.WORLD_VERSION, "n": n, "seed": TOY_DATASET_SEED}

        def build(tmp: Path) -> None:
            rows = world.advice_chats(ds.toy, n, seed=TOY_DATASET_SEED, system_prompt=world.PERSONAS[0].system_prompt)
            with open(tmp / f"toy_{ds.toy}.jsonl", "w") as f:
                for r in rows:
                    f.write(json.dumps(r) + "\n")

        entry, _ = cache.get_or_build("data", cache_key(payload), build, payload)
        return entry / f"toy_{ds.toy}.jsonl"
    if ds.path:
        return resolve_path(ds.path)
    raise ValueError(f"second_stage.datasets.{name}: set path, hf_name or toy")


def load_chats(name: str, ds: DatasetConfig, cache: StageCache) -> tuple[list[list[dict]], str]:
    """The dataset's conversations (shuffled and cut as configured) and a fingerprint of its source."""
    if ds.hf_name:
        import datasets

        local = Path(ds.hf_name)
        d = datasets.load_from_disk(str(local)) if local.is_dir() else datasets.load_dataset(ds.hf_name, split=ds.hf_split)
        if isinstance(d, datasets.DatasetDict):
            d = d[ds.hf_split]
        chats, fingerprint = list(d[ds.messages_field]), f"datasets:{d._fingerprint}"
    else:
        path = dataset_file(name, ds, cache)
        if not path.is_file():
            raise FileNotFoundError(f"second_stage.datasets.{name}.path: file not found: {path}")
        with open(path) as f:
            chats = [json.loads(line)[ds.messages_field] for line in f if line.strip()]
        fingerprint = md5_file(path)
    if ds.shuffle_seed is not None:
        random.Random(ds.shuffle_seed).shuffle(chats)
    if ds.n_examples is not None:
        chats = chats[:ds.n_examples]
    return chats, fingerprint


def run_second_stage(cfg: Config, loaded: LoadedModel, cache: StageCache, step_eval: StepEval | None = None) -> StageResult:
    s = cfg.second_stage
    ds = s.datasets[s.data]
    chats, fingerprint = load_chats(s.data, ds, cache)
    steps = resolve_steps(s.train, len(chats), cfg.dose)

    def build_examples(data_dir: Path):
        (data_dir / f"{s.data}.source").write_text(fingerprint + "\n")
        return [encode_chat(loaded.tokenizer, m, s.train.loss_mode.value, max_len=s.train.max_seq_len) for m in chats]

    payload = {"data": s.data, "dataset": plain(ds), "data_fingerprint": fingerprint, "train": plain(s.train)}
    result = run_lora_stage("second_stage", loaded, cache, payload, build_examples, s.train, steps, cfg.seed,
                            checkpoints=s.dose_checkpoints, step_eval=step_eval)
    result.data_md5[s.data] = fingerprint
    return result
