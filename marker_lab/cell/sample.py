"""The sampled eval of trained cells: one engine on one model, every cell's requests, each cell's metrics.

    outcomes = sample_cells(cells, loaded, judges, model_dir)

A cell's own eval is this on a group of one, on its final model already in memory; a sweep's shared eval
(engine_per=base, cell/shared.py) is this on every cell whose last adapter attaches to the same model. The engine
is the registry entry `eval.engine.name` names (engines/__init__.py):
- hf (`sample_merging_each`): one engine on the model; a cell whose model is not the one in hand has its last
  adapter merged in place (exactly the weights its own eval would use), its requests generated with its seed, and
  the weights put back: the same numbers either way; on a GPU the compiled decode graphs serve every cell.
- vllm (`sample_lora_requests`): the model saved once, each cell's last adapter a LoRA request of one `generate`.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from marker_lab.cell.trained import DamagedAdapter, TrainedCell, checked_adapter
from marker_lab.config.schema import Config
from marker_lab.core.cache import StageCache, plain
from marker_lab.core.errors import MarkerLabError
from marker_lab.engines import ENGINES
from marker_lab.engines.hf import HFEngine
from marker_lab.eval.judged import make_judge
from marker_lab.eval.metrics import score
from marker_lab.eval.plan import generate
from marker_lab.models import LoadedModel, pick_device
from marker_lab.stages.lora_stage import attach_adapter

log = logging.getLogger("marker_lab")


@dataclass
class Sampled:
    """What the sampled eval gave one cell."""
    metrics: dict  # the completion metrics
    judge: dict | None  # the judge's identity, if a judged metric ran
    rows: list[dict]  # the completion rows, annotated by the metrics
    seconds: float  # its share of the engine's sampling, and its scoring
    setup: float  # the engine's one-off setup (the same in each cell of the group)
    engine: dict  # provenance.engine: name, per (cell | base), and for a shared engine its base and cell count


class JudgePool:
    """One judge per judge config for the whole process (a local judge loads a model)."""

    def __init__(self):
        self.judges: dict[str, object] = {}

    def factory(self, cfg: Config):
        def make():
            key = json.dumps(plain(cfg.judge), sort_keys=True)
            if key not in self.judges:
                self.judges[key] = make_judge(cfg, StageCache(cfg.cache_dir), pick_device(cfg.device))
            return self.judges[key]
        return make


def sample_cells(cells: list[TrainedCell], loaded: LoadedModel, judges: JudgePool, model_dir: Path,
                 shared: bool = False) -> list[Sampled | MarkerLabError]:
    """Each cell's sampled metrics from one engine on `loaded` (cells with none get an empty outcome, no engine).
    `model_dir`: where an engine that loads from disk saves the model (deleted when it closes). `shared`: the
    engine is a sweep's, not the cell's own. A problem of one cell (a damaged adapter, an unreachable judge) is
    its outcome; the others go on."""
    sampling = [c for c in cells if c.sampled_metrics]
    generated: dict[int, tuple[list[dict] | MarkerLabError, float]] = {id(c): ([], 0.0) for c in cells}
    setup = 0.0
    if sampling:
        e = sampling[0].plan.cfg.eval
        completions = sum(c.generation.n_completions for c in sampling)
        if shared:
            log.info("eval: %d cells on one %s engine, %d completions", len(sampling), e.engine.name, completions)
        else:
            log.info("eval: %s, %d completions (%s engine)", sampling[0].describe_eval(), completions, e.engine.name)
        setup, results = ENGINES.get(e.engine.name).load_sampler()(sampling, loaded, model_dir)
        generated.update({id(c): r for c, r in zip(sampling, results)})
    outcomes: list[Sampled | MarkerLabError] = []
    for c in cells:
        rows, seconds = generated[id(c)]
        if isinstance(rows, MarkerLabError):
            outcomes.append(rows)
            continue
        t0 = time.perf_counter()
        try:
            scored, judge, rows = score(c.plan.cfg, rows, judges.factory(c.plan.cfg), c.sampled_metrics) \
                if c.sampled_metrics else ({}, None, [])
        except MarkerLabError as err:  # an unreachable API judge is not asked again by later cells (APIJudge)
            outcomes.append(err)
            continue
        engine = {"name": str(c.plan.cfg.eval.engine.name), "per": "base" if shared else "cell"}
        if shared:
            engine.update(shared_base=c.pending.shared_base, cells_on_engine=len(cells))
        outcomes.append(Sampled(scored, judge, rows, seconds + time.perf_counter() - t0, setup, engine))
    return outcomes


def _attaches(cell: TrainedCell, loaded: LoadedModel) -> bool:
    """Whether the cell's last adapter must be attached to `loaded` (not when `loaded` is the cell's model)."""
    return cell.pending.last is not None and loaded.identity != cell.pending.partial.provenance["final_model"]


def sample_merging_each(cells: list[TrainedCell], loaded: LoadedModel, model_dir: Path):
    """hf: one engine on `loaded`; per cell: its adapter merged in place if needed, generate, weights put back.
    Returns the engine's setup seconds and, per cell, its rows (or its error) and seconds."""
    t0 = time.perf_counter()
    model, identity = loaded.model, loaded.identity
    # the weights an adapter is merged into, put back after each cell (merging is in place)
    original = {name: p.detach().clone() for name, p in model.named_parameters()} \
        if any(_attaches(c, loaded) for c in cells) else None
    engine = HFEngine.from_config(loaded, cells[0].plan.cfg.eval.engine)
    setup, out = time.perf_counter() - t0, []
    try:
        for c in cells:
            t0 = time.perf_counter()
            try:
                if _attaches(c, loaded):
                    last = c.pending.last
                    attach_adapter(loaded, last.stage, checked_adapter(last), last.key)
                    assert loaded.model is model, "peft's merge_and_unload returns the model it wrapped"
                rows = generate(engine, c.generation)
            except MarkerLabError as err:
                out.append((err, 0.0))
                continue
            finally:
                if original is not None:
                    _put_back(model, original)
                loaded.identity = identity
            out.append((rows, time.perf_counter() - t0))
    finally:
        engine.close()
    return setup, out


def _put_back(model, original: dict) -> None:
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, saved in original.items():
            params[name].copy_(saved)


def sample_lora_requests(cells: list[TrainedCell], loaded: LoadedModel, model_dir: Path):
    """vllm: `loaded` saved once to `model_dir`; every cell's requests in one batch, its adapter (if not merged in
    already) as a LoRA request. Returns the setup seconds and, per cell, its rows (or its error) and seconds."""
    from marker_lab.engines.vllm import VLLMEngine

    t0 = time.perf_counter()
    out: list = [None] * len(cells)
    adapters: dict[int, Path | None] = {}
    for i, c in enumerate(cells):  # a damaged adapter fails its own cell only
        try:
            adapters[i] = checked_adapter(c.pending.last) if _attaches(c, loaded) else None
        except DamagedAdapter as err:
            out[i] = (err, 0.0)
    if not adapters:
        return 0.0, out
    shutil.rmtree(model_dir, ignore_errors=True)  # what a killed run left
    loaded.model.save_pretrained(model_dir)
    loaded.tokenizer.save_pretrained(model_dir)
    loaded.model.to("cpu")
    torch.cuda.empty_cache()
    ranks = [json.loads((a / "adapter_config.json").read_text())["r"] for a in adapters.values() if a is not None]
    requests, owners = [], []
    for i, adapter in adapters.items():
        for idx, params in cells[i].generation.requests:
            requests.append((None if adapter is None else str(adapter), [cells[i].generation.prompts[j] for j in idx],
                             params))
            owners.append(i)
    first = cells[next(iter(adapters))].plan.cfg
    log.info("eval: vLLM on %s (deleted after the eval), %d adapters, %d requests", model_dir, len(ranks),
             len(requests))
    with VLLMEngine(str(model_dir), loaded.tokenizer, dtype=first.model.dtype.value,
                    gpu_memory_utilization=first.eval.engine.gpu_memory_utilization, seed=first.seed,
                    max_lora_rank=max(ranks) if ranks else None, max_loras=min(8, max(1, len(ranks))),
                    no_system=loaded.no_system, kv_cache_memory_bytes=first.eval.engine.kv_cache_memory_bytes,
                    remove_model_dir=True) as engine:  # the saved model goes when the engine closes
        setup, t0 = time.perf_counter() - t0, time.perf_counter()
        outputs = engine.generate_many(requests)
    seconds = time.perf_counter() - t0
    total = sum(cells[i].generation.n_completions for i in adapters)
    for i in adapters:
        rows = cells[i].generation.rows([o for o, owner in zip(outputs, owners) if owner == i])
        out[i] = (rows, seconds * cells[i].generation.n_completions / total)
    return setup, out
