"""The coupling stage: a pre-baked adapter, or the configured kind (stages/coupling_kinds.py) trained and cached:
marker (marker.py), or wrong_answers / persona_em over 004's contrastive plan (contrastive.py)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

from marker_lab.config.schema import Config
from marker_lab.core.cache import StageCache, plain
from marker_lab.data.chat import encode_chats
from marker_lab.data.truncation import fit_to_length
from marker_lab.models import LoadedModel
from marker_lab.stages.coupling.contrastive import BUILDER_VERSION, train_seed
from marker_lab.stages.coupling.persona_em import build_persona_em_records, load_em_items
from marker_lab.stages.coupling.wrong_answers import build_wrong_answer_records
from marker_lab.stages.coupling_kinds import COUPLING_KINDS
from marker_lab.stages.during_training import StepEval
from marker_lab.stages.lora_stage import StageResult, apply_prebaked_adapter, run_lora_stage
from marker_lab.train.steps import resolve_steps


def run_coupling(cfg: Config, inputs, loaded: LoadedModel, cache: StageCache,
                 step_eval: StepEval | None = None) -> StageResult:
    """The coupling stage of a cell (trained, cached, or pre-baked), merged into `loaded`."""
    if cfg.coupling.adapter_path:
        return apply_prebaked_adapter("coupling", loaded, inputs.files["coupling.adapter_path"])
    return COUPLING_KINDS.get(cfg.coupling.kind).stage()(cfg, inputs, loaded, cache, step_eval)


def run_wrong_answers(cfg: Config, inputs, loaded: LoadedModel, cache: StageCache,
                      step_eval: StepEval | None) -> StageResult:
    """004's wrong answers: the source persona answers the train half of the capability split wrongly."""
    train_items, _, mc_data = inputs.mc
    extra = {"mc_data": mc_data, "capability_split": plain(cfg.eval.capability)}
    return run_contrastive(cfg, inputs, loaded, cache, step_eval, extra,
                           lambda: build_wrong_answer_records(cfg, inputs.personas, train_items))


def run_persona_em(cfg: Config, inputs, loaded: LoadedModel, cache: StageCache,
                   step_eval: StepEval | None) -> StageResult:
    """004's Exp B: the source persona gives EM replies, bystanders benign ones."""
    em_items, data = load_em_items(cfg, inputs)
    return run_contrastive(cfg, inputs, loaded, cache, step_eval, {"data": data},
                           lambda: build_persona_em_records(cfg, inputs.personas, em_items, loaded))


def run_contrastive(cfg: Config, inputs, loaded: LoadedModel, cache: StageCache, step_eval: StepEval | None,
                    extra: dict, build_records: Callable[[], list[dict]]) -> StageResult:
    """A kind over 004's contrastive plan: build the dataset (saved as coupling.jsonl), train on the replies.
    `extra`: what the kind's records depend on besides the coupling config, for the stage's cache key."""
    c = cfg.coupling
    steps = resolve_steps(c.train, COUPLING_KINDS.get(c.kind).examples(c))
    payload = {"coupling": plain(c), "builder_version": BUILDER_VERSION, "assistant": cfg.persona_set.assistant,
               **inputs.checksums_of("persona_set.path"), **extra}

    def build_examples(data_dir: Path):
        records = build_records()
        with open(data_dir / "coupling.jsonl", "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in records)
        whole = encode_chats(loaded.tokenizer, [r["messages"] for r in records], c.train.loss_mode.value,
                             no_system=loaded.no_system)
        return fit_to_length("coupling data", "coupling.train", whole, c.train.max_seq_len, c.train.truncation.value,
                             names=[r["persona"] for r in records])

    return run_lora_stage("coupling", loaded, cache, payload, build_examples, c.train, steps, train_seed(c),
                          step_eval=step_eval)
