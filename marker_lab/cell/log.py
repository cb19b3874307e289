"""What a cell says in its log: what it will do, before anything loads (announce), and its headline readouts once
its result is written (log_summary)."""

from __future__ import annotations

import logging
from pathlib import Path

from marker_lab.config.schema import Config, second_stage_enabled
from marker_lab.data.inputs import CellInputs, data_shapes
from marker_lab.eval.checks import cell_size, question_system_note
from marker_lab.results import contract
from marker_lab.results.contract import RunResult

log = logging.getLogger("marker_lab")


def announce(cfg: Config, inputs: CellInputs, dose: int) -> None:
    """What the cell will do, said before anything loads: its size, its training data's shape, its dose against the
    data (`dose`: its settled steps), and a question file's system prompts that replace the personas'."""
    log.info("cell size: %s", cell_size(cfg, inputs).line())
    for key, shape in data_shapes(cfg, inputs).items():
        log.info("training data %s: %s", key, shape)
    if second_stage_enabled(cfg):  # how many times the stage sees each example
        t, rows = cfg.second_stage.train, len(inputs.datasets[f"second_stage.datasets.{cfg.second_stage.data}"].rows)
        steps, per_step = dose, t.per_device_batch_size * t.grad_accum
        log.info("second stage: %d steps x %d examples a step = %.2f passes over its %d rows", steps, per_step,
                 steps * per_step / rows, rows)
    note = question_system_note(cfg, inputs)
    if note:
        log.warning(note)


def log_summary(cfg: Config, result: RunResult, out_dir: Path) -> None:
    """The cell's headline readouts, one line per persona, and where its result is."""
    m = result.metrics
    if "marker" in m:
        prob = m.get("marker_prob", {}).get("per_persona", {})
        lines = [f"  {name:<24} {c['k']:>5}/{c['n']:<5} {100 * c['rate']:6.1f}%"
                 + (f"   marker_prob {prob[name]['mean']:.3f}" if name in prob else "")
                 for name, c in m["marker"]["per_persona"].items()]
        log.info("marker %s rate per persona (source: %s):\n%s", cfg.marker.text, cfg.source_persona, "\n".join(lines))
    elif "marker_prob" in m:
        lines = [f"  {name:<24} {c['mean']:.4f} (sd {c['sd']:.4f}, {c['n']} questions)"
                 for name, c in m["marker_prob"]["per_persona"].items()]
        log.info("marker_prob %s per persona (source: %s):\n%s", cfg.marker.text, cfg.source_persona, "\n".join(lines))
    for name in ("alignment", "coherence"):
        if name in m:
            lines = [f"  {p:<24} mean {c['mean'] if c['mean'] is None else round(c['mean'], 1)}  (no score: {c['n_none']}/{c['n']})"
                     for p, c in m[name]["per_persona"].items()]
            log.info("%s (judge %s) per persona:\n%s", name, result.provenance["judge"]["backend"], "\n".join(lines))
    log.info("result: %s", out_dir / contract.RESULT_FILE)
