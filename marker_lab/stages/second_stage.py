"""The second stage: LoRA SFT on a chat dataset (EM, benign, ...) for `dose` optimizer steps."""

from __future__ import annotations

from pathlib import Path

from marker_lab.config.schema import Config
from marker_lab.data.chat import encode_chat
from marker_lab.data.chat_datasets import load_chats
from marker_lab.eval.during_training import StepEval
from marker_lab.models import LoadedModel
from marker_lab.stages.cache import StageCache, plain
from marker_lab.stages.lora_stage import StageResult, run_lora_stage
from marker_lab.stages.sft import resolve_steps


def run_second_stage(cfg: Config, loaded: LoadedModel, cache: StageCache, step_eval: StepEval | None = None) -> StageResult:
    s = cfg.second_stage
    ds = s.datasets[s.data]
    chats, fingerprint = load_chats(f"second_stage.datasets.{s.data}", ds, cache)
    steps = resolve_steps(s.train, len(chats), cfg.dose)

    def build_examples(data_dir: Path):
        (data_dir / f"{s.data}.source").write_text(fingerprint + "\n")
        return [encode_chat(loaded.tokenizer, m, s.train.loss_mode.value, max_len=s.train.max_seq_len) for m in chats]

    payload = {"data": s.data, "dataset": plain(ds), "data_fingerprint": fingerprint, "train": plain(s.train)}
    result = run_lora_stage("second_stage", loaded, cache, payload, build_examples, s.train, steps, cfg.seed,
                            checkpoints=s.dose_checkpoints, step_eval=step_eval)
    result.data_md5[s.data] = fingerprint
    return result
