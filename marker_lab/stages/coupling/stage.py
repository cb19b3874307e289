"""The coupling stage: a pre-baked adapter, or the configured kind trained (and cached): marker (marker.py), or
wrong_answers / persona_em over 004's contrastive plan (contrastive.py)."""

from __future__ import annotations

import json
from pathlib import Path

from marker_lab.config.schema import Config
from marker_lab.core.cache import StageCache, plain
from marker_lab.data.chat import encode_chats
from marker_lab.data.truncation import fit_to_length
from marker_lab.models import LoadedModel
from marker_lab.stages.coupling.contrastive import BUILDER_VERSION, train_seed
from marker_lab.stages.coupling.marker import run_marker
from marker_lab.stages.coupling.persona_em import build_persona_em_records, load_em_items
from marker_lab.stages.coupling.wrong_answers import build_wrong_answer_records
from marker_lab.stages.during_training import StepEval
from marker_lab.stages.lora_stage import StageResult, apply_prebaked_adapter, run_lora_stage
from marker_lab.train.sft import resolve_steps


def run_coupling(cfg: Config, inputs, loaded: LoadedModel, cache: StageCache,
                 step_eval: StepEval | None = None) -> StageResult:
    """The coupling stage of a cell (trained, cached, or pre-baked), merged into `loaded`."""
    c = cfg.coupling
    if c.adapter_path:
        return apply_prebaked_adapter("coupling", loaded, inputs.files["coupling.adapter_path"])
    if c.kind == "marker":
        return run_marker(cfg, inputs, loaded, cache, step_eval)
    return run_contrastive(cfg, inputs, loaded, cache, step_eval)


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
        train_items, _, payload["mc_data"] = inputs.mc
        payload["capability_split"] = plain(cfg.eval.capability)
        build_records = lambda: build_wrong_answer_records(cfg, personas, train_items)  # noqa: E731
    else:
        em_items, payload["data"] = load_em_items(cfg, inputs)
        build_records = lambda: build_persona_em_records(cfg, personas, em_items, loaded)  # noqa: E731

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
