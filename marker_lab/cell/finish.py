"""The one writer of a cell's result: what produced it (provenance), its timing, its completions, and
`run_result.json` (atomic), or, for a cell whose sampled eval waits for a sweep's shared engine,
`pending_eval.json`. A cell's own eval and a sweep's shared one both end here.
"""

from __future__ import annotations

import logging

from marker_lab.cell.log import log_summary
from marker_lab.cell.plan import CellPlan
from marker_lab.cell.sample import Sampled
from marker_lab.cell.trained import TrainedCell
from marker_lab.data.inputs import data_shapes
from marker_lab.results import contract
from marker_lab.results.code_version import git_commit, package_versions
from marker_lab.results.contract import PendingEval, RunResult, Timing
from marker_lab.stages.lora_stage import StageResult

log = logging.getLogger("marker_lab")


def finish(trained: TrainedCell, sampled: Sampled) -> RunResult:
    """The cell's result from its record and its sampled eval, written with its completions; the pending record
    (if any) goes."""
    record, out_dir = trained.pending.partial, trained.dir
    t = record.timing
    eval_seconds = t.phases.get("eval", 0.0) + sampled.seconds
    if sampled.engine["per"] == "cell":  # the engine was the cell's own: its start-up is part of the cell's eval
        timing = Timing({**t.phases, "eval": round(eval_seconds + sampled.setup, 3)}, t.parts)
    else:  # eval.shared is inside eval; eval.shared_engine_setup is the group's one-off setup, the same in each cell
        timing = Timing({**t.phases, "eval": round(eval_seconds, 3)},
                        {**t.parts, "eval.shared": round(sampled.seconds, 3),
                         "eval.shared_engine_setup": round(sampled.setup, 3)})
    fields = {**{k: getattr(record, k) for k in record.__dataclass_fields__}, "timing": timing,
              "metrics": {**record.metrics, **sampled.metrics},
              "provenance": {**record.provenance, "judge": sampled.judge, "engine": sampled.engine}}
    result = RunResult(**fields)
    if trained.plan.cfg.eval.save_completions:
        contract.write_completions(out_dir / contract.COMPLETIONS_FILE, sampled.rows)
    contract.write_result(out_dir, result)
    (out_dir / contract.PENDING_FILE).unlink(missing_ok=True)
    log_summary(trained.plan.cfg, result, out_dir)
    return result


def defer(trained: TrainedCell) -> PendingEval:
    """Leave the cell for its sweep's shared engine: its record and adapters in pending_eval.json."""
    contract.write_pending(trained.dir, trained.pending)
    log.info("trained; sampled eval deferred to the sweep's shared engine (engine_per=base): %s",
             trained.dir / contract.PENDING_FILE)
    return trained.pending


def provenance(plan: CellPlan, stages: dict[str, StageResult], base_identity: str, final_identity: str,
               device: str) -> dict:
    """What produced the result: config, code, packages, every input's checksum, adapters, device, models (the
    judge and the engine are added when the cell is sampled)."""
    cfg, inputs = plan.cfg, plan.inputs
    data_md5 = {"persona_set": inputs.checksum("persona_set.path")}
    if "eval.questions" in inputs.files:
        data_md5["eval_questions"] = inputs.checksum("eval.questions")
    for name, st in stages.items():
        data_md5.update({f"{name}/{k}": v for k, v in st.data_md5.items()})
    return {
        "config_hash": plan.config_hash,
        "resolved_config": plan.resolved,
        "git_commit": git_commit(),
        "versions": package_versions(),
        "inputs": inputs.checksums(),
        "data_md5": data_md5,
        "data_shape": data_shapes(cfg, inputs),  # rows, system turns and what was done with them
        "adapters": {n: st.adapter_checksums for n, st in stages.items()},
        "seed": cfg.seed,
        "device": device,
        "base_model": base_identity,
        "final_model": final_identity,
        "stage_cache_keys": {n: st.key for n, st in stages.items()},
        "judge": None,
        "engine": {"name": str(cfg.eval.engine.name), "per": "cell"},
        # trained_on: the device a cached stage was trained on, which can be another machine's (null: an entry
        # older than the record)
        "stages": {n: {"cache_entry": st.path, "trained_now": st.built_now, "steps": st.train_stats.steps,
                       "final_loss": st.train_stats.final_loss, "trained_on": st.train_stats.device,
                       "truncation": st.truncation}
                   for n, st in stages.items()},
    }

