"""The second stage: LoRA SFT on a dataset (EM, benign, ...) for `dose` optimizer steps.

format=chat trains on the dataset's chats through the chat template, with the recipe's loss mode; format=raw is
continued pretraining on plain text: no chat template, loss on every token (000's "non-chat data" next step).
`train.kl_to_input` keeps the outputs near the stage's input model (see train/sft.py).
"""

from __future__ import annotations

from pathlib import Path

from marker_lab.config.schema import Config
from marker_lab.data.chat import Encoded
from marker_lab.data.formats import SECOND_STAGE_FORMATS
from marker_lab.data.truncation import TruncationReport, fit_to_length
from marker_lab.stages.during_training import StepEval
from marker_lab.models import LoadedModel
from marker_lab.core.cache import StageCache, plain
from marker_lab.stages.lora_stage import StageResult, run_lora_stage


def second_stage_examples(cfg: Config, inputs, tokenizer, no_system: str) -> tuple[list[Encoded], TruncationReport]:
    """The stage's training examples, tokenized whole, then cut to max_seq_len under its truncation policy (the
    same call counts them before the model loads, stages/lengths.py, and builds them for training)."""
    s = cfg.second_stage
    key = f"second_stage.datasets.{s.data}"
    rows = inputs.datasets[key].column_values()
    whole = SECOND_STAGE_FORMATS.get(s.format).encode(tokenizer, rows, s.train.loss_mode.value, no_system)
    return fit_to_length(key, "second_stage.train", whole, s.train.max_seq_len, s.train.truncation.value)


def run_second_stage(cfg: Config, inputs, loaded: LoadedModel, cache: StageCache, steps: int,
                     step_eval: StepEval | None = None) -> StageResult:
    """The second stage of a cell: its dataset (loaded and checked at start-up) for `steps` optimizer steps (the
    cell's dose, settled by its plan), attached to `loaded`."""
    s = cfg.second_stage
    ds = s.datasets[s.data]
    dataset = inputs.datasets[f"second_stage.datasets.{s.data}"]
    fingerprint = dataset.fingerprint

    def build_examples(data_dir: Path):
        (data_dir / f"{s.data}.source").write_text(fingerprint + "\n")
        return second_stage_examples(cfg, inputs, loaded.tokenizer, loaded.no_system)

    payload = {"data": s.data, "dataset": plain(ds), "data_fingerprint": fingerprint, "train": plain(s.train)}
    if SECOND_STAGE_FORMATS.get(s.format).label is not None:  # absent for chat: chat stages keep their cache keys
        payload["format"] = s.format.value
    seed = s.train.seed if s.train.seed is not None else cfg.seed  # data order and LoRA init
    result = run_lora_stage("second_stage", loaded, cache, payload, build_examples, s.train, steps, seed,
                            checkpoints=s.dose_checkpoints, step_eval=step_eval)
    result.data_md5[s.data] = fingerprint
    return result
