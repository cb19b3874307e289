"""Run one LoRA stage through the stage cache, then attach its adapter to the model in hand.

Attaching means merging into the weights (merge_between_stages=true, as in the write-ups) or stacking: the
adapter stays a separate, frozen LoRA that is active in every later stage and in the eval. Whether the adapter
was trained now or found in the cache, it is loaded from the cache and attached the same way, so a cell that
reuses a stage sees exactly the weights a cell that trained it saw.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable

from marker_lab.config.schema import TrainConfig
from marker_lab.data.chat import Encoded
from marker_lab.data.truncation import TruncationReport
from marker_lab.stages.during_training import StepEval, evaluate_in_place
from marker_lab.models import LoadedModel, device_description
from marker_lab.core.cache import CHECKSUMS, StageCache, cache_key
from marker_lab.train.lora import apply_lora
from marker_lab.train.sft import train

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StageStats:
    """What a stage's cache entry recorded of its training (train_stats.json): train.sft.TrainStats, the device,
    and for a dose checkpoint the longer run it was cut from."""
    steps: int | None = None  # optimizer steps of the attached adapter (None: not trained by marker_lab, pre-baked)
    examples_seen: int = 0
    tokens_seen: int = 0
    seconds: float = 0.0  # the training loop's wall time
    losses: list[float] = field(default_factory=list)  # one per optimizer step
    step_seconds: list[float] = field(default_factory=list)  # each optimizer step's wall time (the first compiles)
    device: str | None = None  # where it trained (None: an entry older than the record)
    checkpoint_of: int | None = None  # a dose checkpoint: the steps of the run it was saved from

    @classmethod
    def from_json(cls, obj: dict) -> "StageStats":
        return cls(**{k: obj[k] for k in cls.__dataclass_fields__ if k in obj})

    @property
    def final_loss(self) -> float | None:
        return self.losses[-1] if self.losses else None


@dataclass
class StageResult:
    name: str  # coupling | second_stage
    key: str  # cache key
    path: str  # cache entry
    built_now: bool
    seconds: float  # wall time of this stage in this process (training, or loading a cached adapter)
    data_md5: dict = field(default_factory=dict)  # data files the stage trained on
    train_stats: StageStats = field(default_factory=StageStats)
    metrics_by_step: list = field(default_factory=list)  # evals during training: [{step, seconds, metrics}]
    adapter_checksums: dict = field(default_factory=dict)  # the attached adapter's files: {name: checksum}
    adapter: str = ""  # the attached adapter's directory (peft format)
    truncation: dict | None = None  # what max_seq_len cut (data/truncation.py); None: an entry older than the record


# builds a stage's training examples into `data_dir`, returns them (cut to max_seq_len) and what the cut did
ExampleBuilder = Callable[[Path], tuple[list[Encoded], TruncationReport]]


def run_lora_stage(name: str, loaded: LoadedModel, cache: StageCache, payload: dict, build_examples: ExampleBuilder,
                   train_cfg: TrainConfig, steps: int, seed: int, checkpoints: list[int] | None = None,
                   step_eval: StepEval | None = None) -> StageResult:
    """Train (or reuse) the stage's adapter, attach it to `loaded.model`, and update `loaded.identity`.

    With `checkpoints`, the entry is one run to the largest of them that also saved the adapter after each; the
    checkpoint at `steps` is attached (a dose sweep trains once, see second_stage.dose_checkpoints).
    With `step_eval`, the stage evaluates the model as it trains; the series is kept in the cache entry.
    """
    t0 = time.perf_counter()
    run_steps = max(checkpoints) if checkpoints else steps
    payload = _stage_payload(payload, name, loaded.identity, run_steps, seed, checkpoints, step_eval)
    key = cache_key(payload)

    def build(tmp: Path) -> None:
        log.info("stage %s: training (cache entry %s)", name, cache.path("stages", key))
        _train_adapter(tmp, name, loaded, build_examples, train_cfg, run_steps, seed, checkpoints, step_eval)

    entry, built_now = cache.get_or_build("stages", key, build, payload)
    if not built_now:
        log.info("stage %s: reusing cached adapter %s", name, entry)
    stats, truncation, series = _read_entry(entry, steps)
    adapter = entry / "adapter"
    if steps != run_steps:  # a checkpoint of the longer run
        adapter, key = entry / "checkpoints" / f"step_{steps}" / "adapter", f"{key}@{steps}"
        stats = replace(stats, steps=steps, losses=stats.losses[:steps], checkpoint_of=run_steps)
        log.info("stage %s: checkpoint at step %d of a %d-step run", name, steps, run_steps)
    attach_adapter(loaded, name, adapter, key)
    data_md5, adapter_sums = _recorded_checksums(entry, adapter)
    return StageResult(name, key, str(entry), built_now, time.perf_counter() - t0, data_md5, stats, series,
                       adapter_sums, str(adapter), truncation)


def _stage_payload(payload: dict, name: str, input_model: str, run_steps: int, seed: int,
                   checkpoints: list[int] | None, step_eval: StepEval | None) -> dict:
    """What the stage's cache entry is keyed on: the caller's `payload`, the stage, its input model, the run's
    steps and seed, and the dose checkpoints and evals during training when there are any."""
    payload = {**payload, "stage": name, "input_model": input_model, "steps": run_steps, "seed": seed}
    if checkpoints:
        payload["checkpoints"] = sorted(set(checkpoints))
    if step_eval:
        payload["during_training"] = step_eval.payload
    return payload


def _train_adapter(tmp: Path, name: str, loaded: LoadedModel, build_examples: ExampleBuilder, train_cfg: TrainConfig,
                   run_steps: int, seed: int, checkpoints: list[int] | None, step_eval: StepEval | None) -> None:
    """Build the stage's cache entry in `tmp`: its examples (data/, truncation.json), a fresh adapter trained on
    `loaded.model` and saved (adapter/, and checkpoints/ at the doses), train_stats.json and the evals during
    training (metrics_by_step.json). Afterwards `loaded.model` is the input model again."""
    (tmp / "data").mkdir()
    examples, truncation = build_examples(tmp / "data")
    (tmp / "truncation.json").write_text(json.dumps(truncation.record()))
    stacked_on = _adapter_names(loaded.model)
    peft_model = apply_lora(loaded.model, train_cfg.lora, seed, adapter_name=name)

    series = []
    # with dose checkpoints, each dose's series ends at that dose
    eval_at = {s for total in (checkpoints or [run_steps]) for s in step_eval.steps_for(total)} if step_eval else set()
    if 0 in eval_at:
        series.append(evaluate_in_place(peft_model, 0, step_eval.run))

    def after_step(step: int) -> None:
        if step in (checkpoints or ()) and step != run_steps:
            _save_adapter(peft_model, name, tmp / "checkpoints" / f"step_{step}")
        if step in eval_at:
            series.append(evaluate_in_place(peft_model, step, step_eval.run))

    stats = train(peft_model, examples, train_cfg, steps=run_steps, seed=seed, pad_id=loaded.tokenizer.pad_token_id,
                  desc=name, on_step=after_step if (checkpoints or eval_at) else None)
    _save_adapter(peft_model, name, tmp)
    device = next(peft_model.parameters()).device
    (tmp / "train_stats.json").write_text(json.dumps({**asdict(stats), "device": device_description(device)}))
    if step_eval:
        (tmp / "metrics_by_step.json").write_text(json.dumps(series))
    # back to the input model; the cached adapter is attached by the caller, as for a cache hit
    if stacked_on:
        peft_model.delete_adapter(name)
        _activate(peft_model, stacked_on)
        loaded.model = peft_model
    else:
        loaded.model = peft_model.unload()


def _read_entry(entry: Path, steps: int) -> tuple[StageStats, dict | None, list]:
    """A stage entry's training stats, what max_seq_len cut (None: an entry older than the record) and its evals
    during training up to step `steps`."""
    stats = StageStats.from_json(json.loads((entry / "train_stats.json").read_text()))
    truncation_file = entry / "truncation.json"
    truncation = json.loads(truncation_file.read_text()) if truncation_file.is_file() else None
    series_file = entry / "metrics_by_step.json"
    series = [p for p in json.loads(series_file.read_text()) if p["step"] <= steps] if series_file.is_file() else []
    return stats, truncation, series


def _recorded_checksums(entry: Path, adapter: Path) -> tuple[dict, dict]:
    """The md5 of the entry's data files ({name: md5}) and of the attached `adapter`'s files ({path in it: md5}),
    as recorded at build: the entry's files were checked against them when the cache handed it out."""
    recorded = json.loads((entry / CHECKSUMS).read_text())
    data_md5 = {Path(rel).name: c["md5"] for rel, c in recorded.items() if rel.startswith("data/")}
    prefix = str(adapter.relative_to(entry)) + "/"
    adapter_sums = {rel[len(prefix):]: c["md5"] for rel, c in recorded.items() if rel.startswith(prefix)}
    return data_md5, adapter_sums


def _save_adapter(peft_model, name: str, dest: Path) -> None:
    """Save adapter `name` as the plain peft directory `dest/adapter` (the format peft and vLLM load)."""
    peft_model.save_pretrained(dest / "peft_save", selected_adapters=[name])
    # peft nests a non-default adapter under its name
    adapter_dir(dest / "peft_save").rename(dest / "adapter")
    shutil.rmtree(dest / "peft_save", ignore_errors=True)
    _sort_set_fields(dest / "adapter" / "adapter_config.json", peft_model.peft_config[name])


def _sort_set_fields(config_file: Path, config) -> None:
    """peft writes a set-valued field (target_modules) in the order of Python's string hashing, which changes with
    every process (PYTHONHASHSEED): the same training would record a different adapter_config.json checksum in
    each run. Sorted, the file's bytes depend only on what was trained."""
    saved = json.loads(config_file.read_text())
    for key, value in vars(config).items():
        if isinstance(value, (set, frozenset)) and isinstance(saved.get(key), list):
            saved[key] = sorted(saved[key])
    config_file.write_text(json.dumps(saved, indent=2, sort_keys=True))  # peft's own layout


def adapter_dir(root: Path) -> Path:
    """The directory holding adapter_config.json (peft nests non-default adapter names one level down)."""
    found = sorted(root.rglob("adapter_config.json"))
    if not found:
        raise FileNotFoundError(f"no adapter_config.json under {root}")
    return found[0].parent


def attach_adapter(loaded: LoadedModel, name: str, path: Path, key: str) -> None:
    """Merge the adapter at `path` into `loaded.model`, or stack it (loaded.merge=False)."""
    from peft import PeftModel

    if loaded.merge:
        loaded.model = PeftModel.from_pretrained(loaded.model, path, adapter_name=name).merge_and_unload()
        loaded.identity = f"{loaded.identity}+{name}:{key}"
    else:
        if isinstance(loaded.model, PeftModel):
            loaded.model.load_adapter(path, adapter_name=name)
        else:
            loaded.model = PeftModel.from_pretrained(loaded.model, path, adapter_name=name)
        _activate(loaded.model, _adapter_names(loaded.model))
        loaded.identity = f"{loaded.identity}+{name}[stacked]:{key}"
    loaded.model.eval()


def _adapter_names(model) -> list[str]:
    return list(getattr(model, "peft_config", {}) or {})


def _activate(peft_model, names: list[str]) -> None:
    """Make every stacked adapter active (their outputs add up) and frozen."""
    peft_model.base_model.set_adapter(names)
    for p in peft_model.parameters():
        p.requires_grad_(False)


def apply_prebaked_adapter(name: str, loaded: LoadedModel, weights) -> StageResult:
    """Attach a pre-baked peft adapter (e.g. a published coupling adapter) instead of training. `weights` is its
    checked weights file (data.inputs.InputFile): a damaged one stopped the cell at start-up."""
    t0 = time.perf_counter()
    path = Path(weights.path).parent
    key = cache_key({"prebaked": weights.checksum})
    log.info("stage %s: attaching pre-baked adapter %s", name, path)
    attach_adapter(loaded, name, path, key)
    return StageResult(name, key, str(path), False, time.perf_counter() - t0, {"adapter": weights.checksum},
                       adapter_checksums={Path(weights.path).name: weights.checksum}, adapter=str(path))
