"""One cell, end to end: plan (every check, the cell's identity) -> train (base model, stages in order, each cached
and attached; readouts; model metrics) -> sample (the eval's completions, scored) -> write (run_result.json).

    marker-lab run condition=c4 seed=137     # any Hydra override; or: python -m marker_lab.run ...

`run_cell` below is the whole recipe; each step is a small function in its own module of this package.
"""

from __future__ import annotations

import logging
import time
from contextlib import contextmanager
from typing import Callable

import torch
from omegaconf import DictConfig, OmegaConf

from marker_lab.cell.finish import defer, finish, provenance
from marker_lab.cell.log import announce
from marker_lab.cell.plan import CellPlan, plan_cell
from marker_lab.cell.precompiling import precompiling
from marker_lab.cell.sample import JudgePool, sample_cells
from marker_lab.cell.trained import TrainedCell
from marker_lab.core.cache import StageCache, use_compile_cache
from marker_lab.eval.checks import eval_names
from marker_lab.eval.evaluate import baseline_metrics, model_metrics, step_eval_for
from marker_lab.eval.model_readouts import ModelReadouts
from marker_lab.models import LoadedModel, device_description, load_base, load_tokenizer, pick_device
from marker_lab.results import contract
from marker_lab.results.contract import AttachedAdapter, PendingEval, RunResult, Timing, TrainedRecord, is_current
from marker_lab.stages.coupling import run_coupling
from marker_lab.stages.disk import check_disk
from marker_lab.stages.during_training import StepEval
from marker_lab.stages.lengths import check_lengths
from marker_lab.stages.lora_stage import StageResult
from marker_lab.stages.second_stage import run_second_stage
from marker_lab.train.checks import check_train_device

log = logging.getLogger("marker_lab")

# each stage of a cell, run on the model in hand (attached to it when done)
STAGES: dict[str, Callable[[CellPlan, LoadedModel, StageCache, StepEval | None], StageResult]] = {
    "coupling": lambda plan, loaded, cache, ev: run_coupling(plan.cfg, plan.inputs, loaded, cache, ev),
    "second_stage": lambda plan, loaded, cache, ev: run_second_stage(plan.cfg, plan.inputs, loaded, cache,
                                                                      plan.key.dose, ev),
}


def run_cell(cfg_node: DictConfig, in_sweep: bool = False,
             on_phase: Callable[[str], None] = lambda phase: None) -> RunResult | PendingEval:
    """Run one cell and write its run_result.json; returns the result (a current one is returned as it is).

    In a sweep with engine_per=base (`in_sweep`), the cell stops before sampling: it writes pending_eval.json and
    returns that, and the sweep's shared engine samples it (cell/shared.py). `on_phase` hears each phase as it
    starts (checks, load, baseline, each stage, eval, write): cell_main records it for `status` and an interrupt."""
    started = time.perf_counter()
    on_phase("checks")
    plan = plan_cell(cfg_node, in_sweep)
    done = current_outcome(plan)
    if done is not None:
        return done
    start(plan)
    trained = train_cell(plan, on_phase, started)
    if not plan.samples_here:
        return defer(trained)
    on_phase("eval")
    sampled = sample_cells([trained], trained.loaded, JudgePool(), plan.out_dir / "merged_model")[0]
    if trained.precompile is not None:
        trained.precompile.log_cache_use()  # did the eval find the sibling's graphs
    if isinstance(sampled, Exception):
        raise sampled
    on_phase("write")
    return finish(trained, sampled)


def current_outcome(plan: CellPlan) -> RunResult | PendingEval | None:
    """The cell's result if it is complete and current; its pending record if it waits for its sweep's shared
    engine and is current; else None (a stale result is said and left for the rerun to replace)."""
    previous = contract.load_result(plan.out_dir / contract.RESULT_FILE)
    if previous is not None:
        currency = is_current(previous, plan.config_hash)
        if currency.current:
            log.info("cell already complete and current: %s (delete it to rerun)", plan.out_dir)
            return previous
        log.info("the result in %s is stale (%s): running the cell again", plan.out_dir, currency.reason)
    pending = contract.load_pending(plan.out_dir / contract.PENDING_FILE)
    if not plan.samples_here and pending is not None and is_current(pending.partial, plan.config_hash).current:
        log.info("cell trained and current, waiting for the sweep's shared eval: %s", plan.out_dir)
        return pending
    return None


def start(plan: CellPlan) -> None:
    """The cell's directory: no old result that could look current, the resolved config saved, what runs logged."""
    plan.out_dir.mkdir(parents=True, exist_ok=True)
    (plan.out_dir / contract.RESULT_FILE).unlink(missing_ok=True)
    (plan.out_dir / contract.PENDING_FILE).unlink(missing_ok=True)
    OmegaConf.save(OmegaConf.create(plan.resolved), plan.out_dir / "config.yaml")
    log.info("cell %s -> %s", plan.key.as_dict(), plan.out_dir)
    log.info("stage cache: %s", plan.cfg.cache_dir)
    announce(plan.cfg, plan.inputs, plan.key.dose)


def train_cell(plan: CellPlan, on_phase: Callable[[str], None], started: float) -> TrainedCell:
    """The base model, the cell's stages in order (each trained or found in the stage cache, then attached), the
    readouts of every model, and the metrics read from the final model: everything but the sampled eval."""
    cfg, cache = plan.cfg, StageCache(plan.cfg.cache_dir)
    device = pick_device(cfg.device)
    for name in plan.stages:  # what needs the resolved device (cfg.device=auto)
        check_train_device(f"{name}.train", getattr(cfg, name).train, device.type, cfg.model.dtype.value)
    torch.manual_seed(cfg.seed)
    use_compile_cache(cfg.cache_dir)  # compiled graphs and kernel choices shared by every cell of the cache
    # the result's timing: phases that add up to the cell's time, and "phase.part" keys inside them
    timing: dict[str, float] = {"setup": time.perf_counter() - started}  # config, input checks, cache lookups
    readouts = ModelReadouts(cfg, plan.inputs, cache)  # geometry and probe: read from every model of the cell
    loaded, baseline = _base_model(plan, cache, device, readouts, timing, on_phase)
    base_identity, input_identity = loaded.identity, loaded.identity  # input: what the last adapter attaches to
    stages: dict[str, StageResult] = {}
    with precompiling(plan, loaded) as precompile:  # stopped if the cell fails before its eval
        for name in plan.stages:
            log.info("stage %s: starting (input model %s)", name, loaded.identity)
            on_phase(name)
            input_identity = loaded.identity
            stages[name] = STAGES[name](plan, loaded, cache, step_eval_for(cfg, plan.inputs, name, loaded))
            timing[name] = stages[name].seconds
            timing.update(_training_parts(name, stages[name]))
            with timed(timing, "readouts", readouts.active):
                readouts.read(f"after_{name}", loaded)
        with timed(timing, "readouts", readouts.active):
            read_every_model = readouts.metric_results()  # before the eval: a probe that cannot report fails early
        with timed(timing, "precompile_wait", precompile is not None):  # the sibling's compile, if it still runs
            if precompile is not None:
                precompile.wait()
    on_phase("eval")
    with timed(timing, "eval"):  # the metrics read from the model; the sampled eval adds its own time
        metrics = model_metrics(cfg, plan.inputs, loaded, eval_names(cfg, plan.inputs), cfg.eval.metrics)
    for name, (result, seconds) in read_every_model.items():
        metrics[name], timing[f"readouts.{name}"] = result, seconds
    with timed(timing, "write"):  # the provenance (checksums, versions)
        record = provenance(plan, stages, base_identity, loaded.identity, device_description(device))
    with timed(timing, "readouts", readouts.active):
        extra = readouts.finish(plan.out_dir, record["data_md5"])
    series = {n: st.metrics_by_step for n, st in stages.items() if st.metrics_by_step}
    partial = TrainedRecord(plan.key, metrics, record, Timing.from_json({k: round(v, 3) for k, v in timing.items()}),
                            metrics_by_step=series or None, metrics_baseline=baseline, **extra)
    attached = [AttachedAdapter(n, st.adapter, st.key, st.path) for n, st in stages.items()]
    pending = PendingEval(partial, base_identity, attached[:-1], attached[-1] if attached else None,
                          input_identity if attached else base_identity)
    return TrainedCell(plan, pending, loaded, precompile)


def _base_model(plan: CellPlan, cache: StageCache, device, readouts: ModelReadouts, timing: dict,
                on_phase: Callable[[str], None]) -> tuple[LoadedModel, dict | None]:
    """The cell's base model, after the checks that need its tokenizer, read by the readouts; and its baseline
    eval (eval.baseline)."""
    cfg = plan.cfg
    with timed(timing, "setup"):  # free space for what the cell writes; what max_seq_len cuts: before the model loads
        writes = check_disk(cfg)
        log.info("disk: this cell writes up to %s", "; ".join(writes.parts) or "nothing large")
        tokenizer = load_tokenizer(cfg.model, cache)
        check_lengths(cfg, plan.inputs, tokenizer)
    on_phase("load")
    with timed(timing, "load"):
        loaded = load_base(cfg.model, cache, device, merge=cfg.merge_between_stages, tokenizer=tokenizer)
    with timed(timing, "readouts", readouts.active):
        readouts.read("base", loaded)
    if not cfg.eval.baseline:
        return loaded, None
    on_phase("baseline")
    with timed(timing, "baseline"):
        return loaded, baseline_metrics(cfg, plan.inputs, loaded, cache)


@contextmanager
def timed(timing: dict[str, float], phase: str, on: bool = True):
    """Add the block's wall time to `timing[phase]` (phases that run in several pieces add up); `on=False`: run it
    untimed (a phase the cell does not have, so its key stays out of the result)."""
    t0 = time.perf_counter()
    try:
        yield
    finally:
        if on:
            timing[phase] = timing.get(phase, 0.0) + time.perf_counter() - t0


def _training_parts(name: str, stage: StageResult) -> dict[str, float]:
    """A stage trained now: its training loop and first optimizer step (compile included) as parts of its phase."""
    steps = stage.train_stats.step_seconds if stage.built_now else None
    if not steps:
        return {}
    return {f"{name}.train": stage.train_stats.seconds, f"{name}.first_step": steps[0]}
