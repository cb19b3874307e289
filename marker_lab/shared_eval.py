"""The sampled eval of a sweep's trained cells (engine_per=base): one engine per shared base model serves every
cell's last adapter, and each cell's run_result.json is written as the cell's own eval would have written it.

    marker-lab eval outputs/sweeps/toy_dose_response   # what a sweep's launcher runs once its cells have trained

A cell run with engine_per=base in a sweep trains its stages, reads its model metrics (marker_prob, capability,
probe, geometry) and stops before sampling, leaving pending_eval.json (run.py). Here, cells whose last adapter
attaches to the same model (same base, same earlier stages, same engine settings) form a group:
- hf: the group's model is built once and one engine made on it. For each cell its adapter is merged in place
  (exactly the weights the cell's own eval would use), the cell's requests generated with its seed, and the
  weights put back: the same numbers as per-cell eval; on a GPU the engine's compiled decode graphs serve every cell.
- vllm: the group's model is saved once, and every cell's adapter is a LoRA request of one `generate`.
Resumable: a cell's result is written as soon as it is scored; a rerun evaluates only the cells still pending.
A pending cell whose config or inputs changed since it trained is stale: it is left for the sweep to train again.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from omegaconf import OmegaConf

from marker_lab.config.schema import Config, EngineName
from marker_lab.core.cache import CHECKSUMS, StageCache, cache_key, plain, use_compile_cache, verify_entry
from marker_lab.core.errors import MarkerLabError
from marker_lab.data.inputs import CellInputs
from marker_lab.engines.hf import HFEngine
from marker_lab.eval.cell import GenerationPlan, eval_names, generate, generation_plan, sampled_metrics
from marker_lab.eval.judged import make_judge
from marker_lab.eval.metrics import score
from marker_lab.models import LoadedModel, load_base, pick_device
from marker_lab.preflight import preflight
from marker_lab.results import contract
from marker_lab.results.contract import AttachedAdapter, PendingEval, config_hash, is_current
from marker_lab.run import log_summary
from marker_lab.stages.lora_stage import attach_adapter

log = logging.getLogger("marker_lab")


@dataclass
class PendingCell:
    """A trained cell waiting for its sampled eval, with what the eval needs."""
    dir: Path
    pending: PendingEval
    cfg: Config
    inputs: CellInputs
    plan: GenerationPlan

    @property
    def group(self) -> str:
        """Cells with the same group share an engine: the model the last adapter attaches to, how it is loaded
        (model settings such as attn_implementation), the engine settings and the device."""
        return cache_key({"model": self.pending.shared_base, "model_config": plain(self.cfg.model),
                          "engine": plain(self.cfg.eval.engine), "device": self.cfg.device})


@dataclass
class SharedEvalReport:
    done: list[str]  # cell directories whose result was written now
    problems: list[str]  # one line per cell that could not be evaluated (stale, damaged, failed)


def find_pending(root: Path) -> list[Path]:
    """Every cell directory under `root` holding a pending_eval.json (and no current result)."""
    return sorted(p.parent for p in Path(root).rglob(contract.PENDING_FILE))


def read_pending_cell(cell_dir: Path) -> PendingCell:
    """A pending cell, checked: its pending record readable, its config and every input unchanged since it trained
    (MarkerLabError with the reason otherwise)."""
    pending = contract.load_pending(cell_dir / contract.PENDING_FILE)
    if pending is None:
        raise MarkerLabError(f"{cell_dir / contract.PENDING_FILE}: damaged or of another schema; rerun the sweep")
    node = OmegaConf.load(cell_dir / "config.yaml")
    currency = is_current(pending.partial, config_hash(OmegaConf.to_container(node, resolve=True)))
    if not currency.current:
        raise MarkerLabError(f"{cell_dir}: stale ({currency.reason}); rerun the sweep to train it again")
    cfg: Config = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(Config), node))
    inputs = preflight(cfg)
    return PendingCell(cell_dir, pending, cfg, inputs, generation_plan(cfg, inputs, eval_names(cfg, inputs)))


def evaluate_pending(root: str | Path) -> SharedEvalReport:
    """Evaluate every pending cell under `root`, one engine per group; returns what was done and what was not."""
    report = SharedEvalReport([], [])
    cells: list[PendingCell] = []
    for cell_dir in find_pending(Path(root)):
        done = contract.load_result(cell_dir / contract.RESULT_FILE)
        pending = contract.load_pending(cell_dir / contract.PENDING_FILE)
        if done is not None and pending is not None and is_current(done, pending.partial.config_hash).current:
            (cell_dir / contract.PENDING_FILE).unlink(missing_ok=True)  # written by an earlier, interrupted job
            continue
        try:
            cells.append(read_pending_cell(cell_dir))
        except MarkerLabError as e:
            report.problems.append(str(e))
    groups: dict[str, list[PendingCell]] = {}
    for pc in cells:
        groups.setdefault(pc.group, []).append(pc)
    log.info("shared eval: %d cells waiting in %s, %d engine(s)", len(cells), root, len(groups))
    judges = JudgePool()
    if cells:
        use_compile_cache(cells[0].cfg.cache_dir)  # the cells' own compile cache: same kernels as their cell runs
    for i, group in enumerate(groups.values(), 1):
        first = group[0]
        log.info("shared eval: engine %d/%d (%s, %s) for %d cells on %s", i, len(groups), first.cfg.eval.engine.name,
                 first.cfg.device, len(group), first.pending.shared_base)
        run = _vllm_group if first.cfg.eval.engine.name == EngineName.vllm else _hf_group
        try:
            run(group, Path(root), judges, report)
        except MarkerLabError as e:
            for pc in group:
                if str(pc.dir) not in report.done:
                    _failed(pc, e, report)
    return report


def _failed(pc: PendingCell, error: MarkerLabError, report: SharedEvalReport) -> None:
    """Record why a cell got no result; a cell whose adapter is damaged loses its pending record, so rerunning
    the sweep trains it again (the stage cache moves the damaged entry aside and rebuilds it)."""
    report.problems.append(f"{pc.dir}: {error}")
    if isinstance(error, DamagedAdapter):
        (pc.dir / contract.PENDING_FILE).unlink(missing_ok=True)
        contract.write_cell_status(pc.dir, "failed", error=str(error))


class JudgePool:
    """One judge per judge config for the whole job (a local judge loads a model)."""

    def __init__(self):
        self.judges: dict[str, object] = {}

    def factory(self, cfg: Config):
        def make():
            key = json.dumps(plain(cfg.judge), sort_keys=True)
            if key not in self.judges:
                self.judges[key] = make_judge(cfg, StageCache(cfg.cache_dir), pick_device(cfg.device))
            return self.judges[key]
        return make


def shared_model(pc: PendingCell, cache: StageCache) -> LoadedModel:
    """The model every cell of `pc`'s group attaches its last adapter to: the base with the earlier adapters merged,
    checked to be the very model the cell trained on (same identity; adapter files match their build checksums)."""
    loaded = load_base(pc.cfg.model, cache, pick_device(pc.cfg.device), merge=True)
    if loaded.identity != pc.pending.base:
        raise MarkerLabError(f"the base model is now {loaded.identity}, the cell trained on {pc.pending.base}")
    for adapter in pc.pending.before:
        attach_adapter(loaded, adapter.stage, _checked(adapter), adapter.key)
    if loaded.identity != pc.pending.shared_base:
        raise MarkerLabError(f"rebuilt {loaded.identity}, expected {pc.pending.shared_base}")
    return loaded


class DamagedAdapter(MarkerLabError):
    """A cell's cached adapter no longer matches its build checksums: the cell must train again."""


def _checked(adapter: AttachedAdapter) -> Path:
    """The adapter's directory, after its cache entry's files were checked against their build checksums (a
    pre-baked adapter's file was checked with the cell's inputs)."""
    entry = Path(adapter.entry)
    if (entry / CHECKSUMS).is_file():
        problem = verify_entry(entry)
        if problem:
            raise DamagedAdapter(f"adapter {adapter.path} is damaged ({problem}); rerun the sweep to rebuild it")
    return Path(adapter.path)


def _hf_group(group: list[PendingCell], root: Path, judges: JudgePool, report: SharedEvalReport) -> None:
    """One hf engine on the group's model; per cell: merge its adapter in place, generate, put the weights back."""
    t0 = time.perf_counter()
    loaded = shared_model(group[0], StageCache(group[0].cfg.cache_dir))
    model, identity = loaded.model, loaded.identity
    # the weights every cell's adapter is merged into, put back after each cell (merging is in place)
    original = {name: p.detach().clone() for name, p in model.named_parameters()}
    engine = HFEngine.from_config(loaded, group[0].cfg.eval.engine)
    setup = time.perf_counter() - t0
    for pc in group:
        t0 = time.perf_counter()
        try:
            if pc.pending.last is not None:
                attach_adapter(loaded, pc.pending.last.stage, _checked(pc.pending.last), pc.pending.last.key)
                assert loaded.model is model, "peft's merge_and_unload returns the model it wrapped"
            rows = generate(engine, pc.plan)
        except MarkerLabError as e:
            _failed(pc, e, report)
            continue
        finally:
            params = dict(model.named_parameters())
            with torch.no_grad():
                for name, saved in original.items():
                    params[name].copy_(saved)
            loaded.identity = identity
        _finish(pc, rows, judges, time.perf_counter() - t0, setup, len(group), report)


def _vllm_group(group: list[PendingCell], root: Path, judges: JudgePool, report: SharedEvalReport) -> None:
    """One vLLM engine on the group's model, saved once; every cell's requests in one batch, its adapter as LoRA."""
    from marker_lab.engines.vllm import VLLMEngine

    t0 = time.perf_counter()
    first = group[0]
    loaded = shared_model(first, StageCache(first.cfg.cache_dir))
    model_dir = root / ".shared_eval" / first.group  # vLLM loads weights from disk: the group's model, saved once
    shutil.rmtree(model_dir, ignore_errors=True)
    loaded.model.save_pretrained(model_dir)
    loaded.tokenizer.save_pretrained(model_dir)
    loaded.model.to("cpu")
    torch.cuda.empty_cache()
    usable, adapters = [], []
    for pc in group:  # a damaged adapter fails its own cell only
        try:
            adapters.append(_checked(pc.pending.last) if pc.pending.last else None)
            usable.append(pc)
        except DamagedAdapter as e:
            _failed(pc, e, report)
    group = usable
    if not group:
        return
    ranks = [json.loads((a / "adapter_config.json").read_text())["r"] for a in adapters if a is not None]
    e = first.cfg.eval.engine
    requests, owners = [], []
    for pc, adapter in zip(group, adapters):
        for idx, params in pc.plan.requests:
            requests.append((None if adapter is None else str(adapter), [pc.plan.prompts[i] for i in idx], params))
            owners.append(pc)
    log.info("shared eval: vLLM on %s, %d adapters, %d requests", model_dir, len(ranks), len(requests))
    with VLLMEngine(str(model_dir), loaded.tokenizer, dtype=first.cfg.model.dtype.value,
                    gpu_memory_utilization=e.gpu_memory_utilization, seed=first.cfg.seed,
                    max_lora_rank=max(ranks) if ranks else None, max_loras=min(8, max(1, len(ranks))),
                    no_system=loaded.no_system, kv_cache_memory_bytes=e.kv_cache_memory_bytes,
                    remove_model_dir=True) as engine:  # the saved model goes when the engine closes
        setup = time.perf_counter() - t0
        t0 = time.perf_counter()
        outputs = engine.generate_many(requests)
    seconds = time.perf_counter() - t0
    total = sum(pc.plan.n_completions for pc in group)
    for pc in group:
        rows = pc.plan.rows([o for o, owner in zip(outputs, owners) if owner is pc])
        _finish(pc, rows, judges, seconds * pc.plan.n_completions / total, setup, len(group), report)


def _finish(pc: PendingCell, rows: list[dict], judges: JudgePool, seconds: float, setup: float, n_cells: int,
            report: SharedEvalReport) -> None:
    """Score a cell's completions and write its result as its own eval would; the pending record goes. A scoring
    error (an unreachable judge, say) fails this cell only: its pending record stays, so `marker-lab eval` retries it."""
    t0 = time.perf_counter()
    try:
        scored, judge, rows = score(pc.cfg, rows, judges.factory(pc.cfg), sampled_metrics(pc.cfg.eval.metrics))
    except MarkerLabError as e:  # an unreachable API judge is not asked again by later cells (APIJudge)
        _failed(pc, e, report)
        return
    partial = pc.pending.partial
    engine = {"name": str(pc.cfg.eval.engine.name), "per": "base", "shared_base": pc.pending.shared_base,
              "cells_on_engine": n_cells}
    sampled = round(seconds + time.perf_counter() - t0, 3)
    # eval: the whole eval as a per-cell run counts it (model metrics in the cell's job + sampling here)
    # eval.shared is inside eval; eval.shared_engine_setup is the group's one-off setup, the same in each of its cells
    timing = {**partial.timing, "eval": round(partial.timing.get("eval", 0.0) + sampled, 3), "eval.shared": sampled,
              "eval.shared_engine_setup": round(setup, 3)}
    result = replace(partial, metrics={**partial.metrics, **scored}, timing=timing,
                     provenance={**partial.provenance, "judge": judge, "engine": engine})
    if pc.cfg.eval.save_completions:
        contract.write_completions(pc.dir / contract.COMPLETIONS_FILE, rows)
    contract.write_result(pc.dir, result)
    (pc.dir / contract.PENDING_FILE).unlink(missing_ok=True)
    contract.write_cell_status(pc.dir, "complete")
    log_summary(pc.cfg, result, pc.dir)
    report.done.append(str(pc.dir))
