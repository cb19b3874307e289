"""The sampled eval of a sweep's trained cells (engine_per=base): one engine per shared base model serves every
cell's last adapter, and each cell's result is written by the same code as a cell's own eval (cell/sample.py,
cell/finish.py).

    marker-lab eval outputs/sweeps/toy_dose_response   # what a sweep's launcher runs once its cells have trained

A cell run with engine_per=base in a sweep trains its stages, reads its model metrics (marker_prob, capability,
probe, geometry) and stops before sampling, leaving pending_eval.json. Here, cells whose last adapter attaches to
the same model (same base, same earlier stages, same engine settings) form a group, sampled by `sample_cells` on
that model, rebuilt once. Resumable: a cell's result is written as soon as it is scored; a rerun evaluates only
the cells still pending. A pending cell whose config or inputs changed since it trained is stale: it is left for
the sweep to train again.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from marker_lab.cell.finish import finish
from marker_lab.cell.sample import JudgePool, Sampled, sample_cells
from marker_lab.cell.trained import DamagedAdapter, TrainedCell, checked_adapter, read_trained
from marker_lab.core.cache import StageCache, cache_key, plain, use_compile_cache
from marker_lab.core.errors import MarkerLabError
from marker_lab.models import LoadedModel, load_base, pick_device
from marker_lab.results import contract
from marker_lab.results.contract import is_current
from marker_lab.stages.lora_stage import attach_adapter

log = logging.getLogger("marker_lab")


@dataclass
class SharedEvalReport:
    done: list[str]  # cell directories whose result was written now
    problems: list[str]  # one line per cell that could not be evaluated (stale, damaged, failed)


def find_pending(root: Path) -> list[Path]:
    """Every cell directory under `root` holding a pending_eval.json (and no current result)."""
    return sorted(p.parent for p in Path(root).rglob(contract.PENDING_FILE))


def engine_group(cell: TrainedCell) -> str:
    """Cells with the same group share an engine: the model the last adapter attaches to, how it is loaded (model
    settings such as attn_implementation), the engine settings and the device."""
    cfg = cell.plan.cfg
    return cache_key({"model": cell.pending.shared_base, "model_config": plain(cfg.model),
                      "engine": plain(cfg.eval.engine), "device": cfg.device})


def evaluate_pending(root: str | Path) -> SharedEvalReport:
    """Evaluate every pending cell under `root`, one engine per group; returns what was done and what was not."""
    report = SharedEvalReport([], [])
    groups: dict[str, list[TrainedCell]] = {}
    for cell_dir in find_pending(Path(root)):
        done = contract.load_result(cell_dir / contract.RESULT_FILE)
        pending = contract.load_pending(cell_dir / contract.PENDING_FILE)
        if done is not None and pending is not None and is_current(done, pending.partial.config_hash).current:
            (cell_dir / contract.PENDING_FILE).unlink(missing_ok=True)  # written by an earlier, interrupted job
            continue
        try:
            cell = read_trained(cell_dir, pending)
        except MarkerLabError as e:
            report.problems.append(str(e))
            continue
        groups.setdefault(engine_group(cell), []).append(cell)
    log.info("shared eval: %d cells waiting in %s, %d engine(s)", sum(map(len, groups.values())), root, len(groups))
    judges = JudgePool()
    if groups:  # the cells' own compile cache: same kernels as their cell runs
        use_compile_cache(next(iter(groups.values()))[0].plan.cfg.cache_dir)
    for i, (key, group) in enumerate(groups.items(), 1):
        first = group[0]
        log.info("shared eval: engine %d/%d (%s, %s) for %d cells on %s", i, len(groups),
                 first.plan.cfg.eval.engine.name, first.plan.cfg.device, len(group), first.pending.shared_base)
        try:
            loaded = shared_model(first, StageCache(first.plan.cfg.cache_dir))
            outcomes = sample_cells(group, loaded, judges, Path(root) / ".shared_eval" / key, shared=True)
        except MarkerLabError as e:
            for cell in group:
                _failed(cell, e, report)
            continue
        for cell, outcome in zip(group, outcomes):
            if isinstance(outcome, Sampled):
                finish(cell, outcome)
                contract.write_cell_status(cell.dir, "complete")
                report.done.append(str(cell.dir))
            else:
                _failed(cell, outcome, report)
    return report


def _failed(cell: TrainedCell, error: MarkerLabError, report: SharedEvalReport) -> None:
    """Record why a cell got no result; a cell whose adapter is damaged loses its pending record, so rerunning
    the sweep trains it again (the stage cache moves the damaged entry aside and rebuilds it). Any other problem
    (an unreachable judge, say) leaves the pending record, so `marker-lab eval` retries the cell."""
    report.problems.append(f"{cell.dir}: {error}")
    if isinstance(error, DamagedAdapter):
        (cell.dir / contract.PENDING_FILE).unlink(missing_ok=True)
        contract.write_cell_status(cell.dir, "failed", error=str(error))


def shared_model(cell: TrainedCell, cache: StageCache) -> LoadedModel:
    """The model every cell of `cell`'s group attaches its last adapter to: the base with the earlier adapters
    merged, checked to be the very model the cell trained on (same identity; adapter files match their build
    checksums)."""
    loaded = load_base(cell.plan.cfg.model, cache, pick_device(cell.plan.cfg.device), merge=True)
    if loaded.identity != cell.pending.base:
        raise MarkerLabError(f"the base model is now {loaded.identity}, the cell trained on {cell.pending.base}")
    for adapter in cell.pending.before:
        attach_adapter(loaded, adapter.stage, checked_adapter(adapter), adapter.key)
    if loaded.identity != cell.pending.shared_base:
        raise MarkerLabError(f"rebuilt {loaded.identity}, expected {cell.pending.shared_base}")
    return loaded
