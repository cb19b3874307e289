"""Run one LoRA stage through the stage cache, then merge its adapter into the model in hand.

Whether the adapter was trained now or found in the cache, it is loaded from the cache and merged the same
way, so a cell that reuses a stage sees exactly the weights a cell that trained it saw.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

from marker_lab.config.schema import TrainConfig
from marker_lab.data.chat import Encoded
from marker_lab.data.files import md5_file
from marker_lab.models import LoadedModel
from marker_lab.stages.cache import StageCache, cache_key
from marker_lab.stages.sft import apply_lora, train

log = logging.getLogger(__name__)


@dataclass
class StageResult:
    name: str  # coupling | second_stage
    key: str  # cache key
    path: str  # cache entry
    built_now: bool
    seconds: float  # wall time of this stage in this process (training, or loading a cached adapter)
    data_md5: dict = field(default_factory=dict)  # data files the stage trained on
    train_stats: dict = field(default_factory=dict)


# builds a stage's training examples into `data_dir`, returns them
ExampleBuilder = Callable[[Path], list[Encoded]]


def run_lora_stage(name: str, loaded: LoadedModel, cache: StageCache, payload: dict, build_examples: ExampleBuilder,
                   train_cfg: TrainConfig, steps: int, seed: int) -> StageResult:
    """Train (or reuse) the stage's adapter, merge it into `loaded.model`, and update `loaded.identity`."""
    from peft import PeftModel

    t0 = time.perf_counter()
    payload = {**payload, "stage": name, "input_model": loaded.identity, "steps": steps, "seed": seed}
    key = cache_key(payload)

    def build(tmp: Path) -> None:
        log.info("stage %s: training (cache entry %s)", name, cache.path("stages", key))
        (tmp / "data").mkdir()
        examples = build_examples(tmp / "data")
        peft_model = apply_lora(loaded.model, train_cfg.lora, seed)
        stats = train(peft_model, examples, train_cfg, steps=steps, seed=seed, pad_id=loaded.tokenizer.pad_token_id,
                      desc=name)
        peft_model.save_pretrained(tmp / "adapter")
        (tmp / "train_stats.json").write_text(json.dumps(asdict(stats)))
        loaded.model = peft_model.unload()  # back to the input weights; the cached adapter is merged below

    entry, built_now = cache.get_or_build("stages", key, build, payload)
    if not built_now:
        log.info("stage %s: reusing cached adapter %s", name, entry)
    return _merge(name, loaded, entry, key, built_now, t0, PeftModel)


def apply_prebaked_adapter(name: str, loaded: LoadedModel, adapter_path: str) -> StageResult:
    """Merge a pre-baked peft adapter (e.g. a published coupling adapter) instead of training."""
    from peft import PeftModel

    t0 = time.perf_counter()
    weights = next(Path(adapter_path).glob("adapter_model.*"), None)
    if weights is None:
        raise FileNotFoundError(f"{name}.adapter_path: no adapter_model.* in {adapter_path}")
    key = cache_key({"prebaked": md5_file(weights)})
    log.info("stage %s: merging pre-baked adapter %s", name, adapter_path)
    model = PeftModel.from_pretrained(loaded.model, adapter_path)
    loaded.model = model.merge_and_unload()
    loaded.identity = f"{loaded.identity}+{name}:{key}"
    return StageResult(name, key, str(adapter_path), False, time.perf_counter() - t0, {"adapter": md5_file(weights)})


def _merge(name, loaded, entry: Path, key, built_now, t0, PeftModel) -> StageResult:
    model = PeftModel.from_pretrained(loaded.model, entry / "adapter")
    loaded.model = model.merge_and_unload()
    loaded.model.eval()
    loaded.identity = f"{loaded.identity}+{name}:{key}"
    data_md5 = {p.name: md5_file(p) for p in sorted((entry / "data").glob("*")) if p.is_file()}
    stats = json.loads((entry / "train_stats.json").read_text())
    return StageResult(name, key, str(entry), built_now, time.perf_counter() - t0, data_md5, stats)
