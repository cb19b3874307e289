"""One cell, end to end: check inputs -> base model -> stages in order (each cached, merged) -> eval -> result.

    python -m marker_lab.run                       # the default toy cell (same as `marker-lab run`)
    python -m marker_lab.run condition=c4 seed=137  # any Hydra override

Read top to bottom, this file is the whole recipe; each step is a small function in its own module.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable

import hydra
import torch
from omegaconf import DictConfig, OmegaConf

from marker_lab.config.schema import Config, EnginePer, coupling_enabled, register_configs, second_stage_enabled
from marker_lab.core.cache import StageCache, use_compile_cache
from marker_lab.core.errors import ConfigError, MarkerLabError
from marker_lab.core.files import CONF
from marker_lab.cell_log import announce, log_summary
from marker_lab.data.inputs import CellInputs, data_shapes
from marker_lab.eval.cell import baseline_metrics, evaluate, precompiling, sampled_metrics, step_eval_for
from marker_lab.eval.model_readouts import ModelReadouts
from marker_lab.models import LoadedModel, device_description, load_base, load_tokenizer, pick_device
from marker_lab.preflight import preflight
from marker_lab.results import contract
from marker_lab.results.contract import AttachedAdapter, PendingEval, RunResult, cell_keys, config_hash, is_current
from marker_lab.stages.coupling import run_coupling
from marker_lab.stages.disk import check_disk
from marker_lab.stages.lengths import check_lengths
from marker_lab.stages.lora_stage import StageResult
from marker_lab.stages.second_stage import run_second_stage
from marker_lab.train.checks import check_train_device

log = logging.getLogger("marker_lab")
CONF_DIR = str(CONF)
STAGES = {"coupling": run_coupling, "second_stage": run_second_stage}

register_configs()


def stage_order(cfg: Config) -> list[str]:
    """The stages this cell runs, in order (forward: couple then second stage; reverse: the other way)."""
    names = ["coupling", "second_stage"] if cfg.order == "forward" else ["second_stage", "coupling"]
    enabled = {"coupling": coupling_enabled(cfg), "second_stage": second_stage_enabled(cfg)}
    return [n for n in names if enabled[n]]


def run_cell(cfg_node: DictConfig, in_sweep: bool = False,
             on_phase: Callable[[str], None] = lambda phase: None) -> RunResult | PendingEval:
    """Run one cell and write its run_result.json; returns the result (a current one is returned as it is).

    In a sweep with engine_per=base (`in_sweep`), the cell stops before sampling: it writes pending_eval.json
    and returns that, and the sweep's shared engine finishes it (shared_eval.py). `on_phase` hears each phase as it
    starts (checks, load, baseline, each stage, eval, write): cell_main records it for `status` and an interrupt."""
    started = time.perf_counter()
    on_phase("checks")
    cfg: Config = OmegaConf.to_object(cfg_node)
    inputs = preflight(cfg)  # every check and input file, before any model is loaded
    device = pick_device(cfg.device)
    for name in stage_order(cfg):  # what needs the resolved device (cfg.device=auto)
        check_train_device(f"{name}.train", getattr(cfg, name).train, device.type, cfg.model.dtype.value)
    resolved = OmegaConf.to_container(cfg_node, resolve=True, enum_to_str=True)
    out_dir = Path(cfg.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    previous = contract.load_result(out_dir / contract.RESULT_FILE)
    if previous is not None:
        currency = is_current(previous, config_hash(resolved))
        if currency.current:
            log.info("cell already complete and current: %s (delete it to rerun)", out_dir)
            return previous
        log.info("the result in %s is stale (%s): running the cell again", out_dir, currency.reason)
    defer = in_sweep and cfg.engine_per == EnginePer.base and bool(sampled_metrics(cfg.eval.metrics))
    pending = contract.load_pending(out_dir / contract.PENDING_FILE)
    if defer and pending is not None and is_current(pending.partial, config_hash(resolved)).current:
        log.info("cell trained and current, waiting for the sweep's shared eval: %s", out_dir)
        return pending
    (out_dir / contract.RESULT_FILE).unlink(missing_ok=True)  # a rerun never leaves an old result looking current
    (out_dir / contract.PENDING_FILE).unlink(missing_ok=True)
    OmegaConf.save(cfg_node, out_dir / "config.yaml", resolve=True)
    cell = cell_keys(cfg)
    log.info("cell %s -> %s", cell, out_dir)
    log.info("stage cache: %s", cfg.cache_dir)

    torch.manual_seed(cfg.seed)
    cache = StageCache(cfg.cache_dir)
    use_compile_cache(cfg.cache_dir)  # compiled graphs and kernel choices shared by every cell of the cache
    # the result's timing: phases that add up to the cell's time, and "phase.part" keys inside them
    timing: dict[str, float] = {"setup": time.perf_counter() - started}  # config, input checks, cache lookups
    announce(cfg, inputs)
    readouts = ModelReadouts(cfg, inputs, cache)  # geometry and probe: read from every model of the cell
    with timed(timing, "setup"):  # free space for what the cell writes; what max_seq_len cuts: before the model loads
        writes = check_disk(cfg)
        log.info("disk: this cell writes up to %s", "; ".join(writes.parts) or "nothing large")
        tokenizer = load_tokenizer(cfg.model, cache)
        check_lengths(cfg, inputs, tokenizer)
    on_phase("load")
    with timed(timing, "load"):
        loaded = load_base(cfg.model, cache, device, merge=cfg.merge_between_stages, tokenizer=tokenizer)
    base_identity = loaded.identity
    with timed(timing, "readouts", readouts.active):
        readouts.read("base", loaded)
    baseline = None
    if cfg.eval.baseline:
        on_phase("baseline")
        with timed(timing, "baseline"):
            baseline = baseline_metrics(cfg, inputs, loaded, cache)

    stages: dict[str, StageResult] = {}
    input_identity = loaded.identity  # of the model the last stage's adapter attaches to
    # eval.engine.precompile: the eval's decode step compiles in a sibling process while the stages train (stopped
    # if the cell fails before its eval)
    with precompiling(cfg, inputs, loaded, out_dir, stage_order(cfg), sample=not defer) as precompile:
        for name in stage_order(cfg):
            log.info("stage %s: starting (input model %s)", name, loaded.identity)
            on_phase(name)
            input_identity = loaded.identity
            stages[name] = STAGES[name](cfg, inputs, loaded, cache, step_eval_for(cfg, inputs, name, loaded))
            timing[name] = stages[name].seconds
            timing.update(_training_parts(name, stages[name]))
            with timed(timing, "readouts", readouts.active):
                readouts.read(f"after_{name}", loaded)
        if "second_stage" in stages and cell["dose"] is None:
            cell["dose"] = stages["second_stage"].train_stats.get("steps")
        with timed(timing, "readouts", readouts.active):
            probed = readouts.probe_result()  # before the eval: a probe that cannot report fails early
        with timed(timing, "precompile_wait", precompile is not None):  # the sibling's compile, if it still runs
            if precompile is not None:
                precompile.wait()
    on_phase("eval")
    with timed(timing, "eval"):
        metrics, judge, rows = evaluate(cfg, inputs, loaded, out_dir, sample=not defer)
    if precompile is not None:
        precompile.log_cache_use()  # did the eval find the sibling's graphs
    if probed:
        metrics["probe"], timing["readouts.probe"] = probed
    on_phase("write")
    with timed(timing, "write"):  # the completions and the provenance (checksums, versions); the result follows
        if cfg.eval.save_completions:
            contract.write_completions(out_dir / contract.COMPLETIONS_FILE, rows)
        provenance = _provenance(cfg, inputs, resolved, stages, base_identity, loaded, judge, device)
    with timed(timing, "readouts", readouts.active):
        extra = readouts.finish(out_dir, provenance["data_md5"])
    series = {n: st.metrics_by_step for n, st in stages.items() if st.metrics_by_step}
    result = RunResult(cell, metrics, provenance, {k: round(v, 3) for k, v in timing.items()},
                       metrics_by_step=series or None, metrics_baseline=baseline, **extra)
    if defer:
        attached = [AttachedAdapter(n, st.adapter, st.key, st.path) for n, st in stages.items()]
        pending = PendingEval(result, base_identity, attached[:-1], attached[-1] if attached else None,
                              input_identity if attached else base_identity)
        contract.write_pending(out_dir, pending)
        log.info("trained; sampled eval deferred to the sweep's shared engine (engine_per=base): %s",
                 out_dir / contract.PENDING_FILE)
        return pending
    contract.write_result(out_dir, result)
    log_summary(cfg, result, out_dir)
    return result


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
    steps = stage.train_stats.get("step_seconds") if stage.built_now else None
    if not steps:
        return {}
    return {f"{name}.train": stage.train_stats["seconds"], f"{name}.first_step": steps[0]}


def _provenance(cfg: Config, inputs: CellInputs, resolved: dict, stages: dict[str, StageResult], base_identity: str,
                loaded: LoadedModel, judge: dict | None, device) -> dict:
    """What produced the result: config, code, packages, every input's checksum, adapters, device, models."""
    data_md5 = {"persona_set": inputs.checksum("persona_set.path")}
    if "eval.questions" in inputs.files:
        data_md5["eval_questions"] = inputs.checksum("eval.questions")
    for name, st in stages.items():
        data_md5.update({f"{name}/{k}": v for k, v in st.data_md5.items()})
    return {
        "config_hash": config_hash(resolved),
        "resolved_config": resolved,
        "git_commit": contract.git_commit(),
        "versions": contract.package_versions(),
        "inputs": inputs.checksums(),
        "data_md5": data_md5,
        "data_shape": data_shapes(cfg, inputs),  # rows, system turns and what was done with them
        "adapters": {n: st.adapter_checksums for n, st in stages.items()},
        "seed": cfg.seed,
        "device": device_description(device),
        "base_model": base_identity,
        "final_model": loaded.identity,
        "stage_cache_keys": {n: st.key for n, st in stages.items()},
        "judge": judge,
        "engine": {"name": str(cfg.eval.engine.name), "per": "cell"},
        # trained_on: the device a cached stage was trained on, which can be another machine's (null: an entry
        # older than the record)
        "stages": {n: {"cache_entry": st.path, "trained_now": st.built_now, "steps": st.train_stats.get("steps"),
                       "final_loss": (st.train_stats.get("losses") or [None])[-1],
                       "trained_on": st.train_stats.get("device"), "truncation": st.truncation}
                   for n, st in stages.items()},
    }


_PHASES = {"checks": "its start-up checks", "load": "loading the model", "baseline": "the baseline eval",
           "coupling": "the coupling stage", "second_stage": "the second stage", "eval": "the eval",
           "write": "writing its result"}  # how the interrupt line names a phase


class Killed(BaseException):
    """The cell's process got a termination signal (recorded before it exits; SIGKILL leaves no chance to)."""


def _on_signal(signum, _frame):
    raise Killed(f"killed by signal {signum} ({signal.Signals(signum).name})")


def cell_main(cfg: DictConfig):
    """What Hydra runs for a cell: its status record, the cell, and how it ended (a config, input or endpoint
    problem is one line and exit code 2 or 1; anything else is recorded, then raised for Hydra / submitit)."""
    out_dir = Path(cfg.output_dir)
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _on_signal)
    signal.signal(signal.SIGINT, signal.default_int_handler)  # a sweep's launcher starts cells with it ignored
    phase = ["start"]  # the phase running now, for the status file and an interrupt's line

    def on_phase(name: str) -> None:
        phase[0] = name
        contract.write_cell_status(out_dir, "running", phase=name)

    contract.write_cell_status(out_dir, "running", phase=phase[0])
    try:
        result = run_cell(cfg, in_sweep=_in_sweep(), on_phase=on_phase)
    except KeyboardInterrupt:  # Ctrl-C: one line, the phase recorded; the stage cache keeps what finished
        contract.write_cell_status(out_dir, "interrupted", phase=phase[0], error=f"interrupted during {phase[0]}")
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        print(f"marker-lab: interrupted: cell {out_dir} during {_PHASES.get(phase[0], phase[0])}; rerun the same "
              "command to resume", file=sys.stderr, flush=True)
        sys.exit(130)
    except MarkerLabError as e:  # a config, input or endpoint problem: one line, no traceback
        kind = "config error" if isinstance(e, ConfigError) else "error"
        contract.write_cell_status(out_dir, "failed", error=f"{kind}: {e}")
        log.error("%s: %s", kind, e)
        sys.exit(2 if isinstance(e, ConfigError) else 1)
    except BaseException as e:  # recorded for `marker-lab status`, then re-raised for Hydra / submitit
        contract.write_cell_status(out_dir, "failed", error=f"{type(e).__name__}: {e}")
        raise
    if isinstance(result, PendingEval):
        contract.write_cell_status(out_dir, "awaiting_eval")
        return result.partial.config_hash
    contract.write_cell_status(out_dir, "complete")
    return result.config_hash


def _in_sweep() -> bool:
    """Whether this cell runs as one job of a multirun sweep (whose launcher runs the shared eval afterwards)."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


main = hydra.main(config_path=CONF_DIR, config_name="config", version_base="1.3")(cell_main)

if __name__ == "__main__":
    main()
