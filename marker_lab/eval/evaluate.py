"""Evals on the model in hand: the metrics read from the model, the base model's readout (eval.baseline) and the
evals a stage runs while it trains (eval.during_training). A cell's own eval of its final model is
cell/sample.py, on the same plan, engine and scoring."""

from __future__ import annotations

import json
from dataclasses import replace
import logging
from pathlib import Path
from typing import Callable

from marker_lab.config.schema import Config
from marker_lab.core.cache import StageCache, cache_key, plain
from marker_lab.data.inputs import CellInputs
from marker_lab.engines.hf import HFEngine
from marker_lab.eval.checks import eval_names
from marker_lab.eval.judge.registry import JUDGES
from marker_lab.eval.judged import make_judge
from marker_lab.eval.metrics import METRICS, Reads, metrics_reading, needs_of, score
from marker_lab.eval.plan import generate, generation_plan
from marker_lab.models import LoadedModel
from marker_lab.stages.during_training import StepEval, eval_steps

log = logging.getLogger(__name__)


def model_metrics(cfg: Config, inputs: CellInputs, loaded: LoadedModel, names: list[str], metrics: list) -> dict:
    """The metrics of `metrics` read from the model itself (capability, marker_prob), on personas `names`. They run
    before any sampling engine starts: the vllm engine takes the GPU from the HF model."""
    return {m: METRICS.get(m).compute(cfg, inputs, loaded, names) for m in metrics_reading(metrics, Reads.model)}


def evaluate_in_hand(cfg: Config, inputs: CellInputs, loaded: LoadedModel, metrics: list,
                     personas: list[str] | None = None, judge_factory: Callable[[], object] | None = None) -> dict:
    """`metrics` on the model in hand (the hf engine on it, whatever eval.engine.name says): personas x questions x
    K completions, scored, plus the metrics read from the model. The baseline and the evals during training."""
    names = eval_names(cfg, inputs, personas)
    results = model_metrics(cfg, inputs, loaded, names, metrics)
    sampled = metrics_reading(metrics, Reads.completions)
    if not sampled:
        return results
    plan = generation_plan(cfg, inputs, names)
    engine = HFEngine.from_config(loaded, cfg.eval.engine)
    try:
        rows = generate(engine, plan)
    finally:
        engine.close()
    judge_factory = judge_factory or (lambda: make_judge(cfg, StageCache(cfg.cache_dir),
                                                         next(loaded.model.parameters()).device))
    return {**results, **score(cfg, rows, judge_factory, sampled)[0]}


def step_eval_for(cfg: Config, inputs: CellInputs, stage: str, loaded: LoadedModel) -> StepEval | None:
    """The evals `stage` runs while it trains (eval.during_training), or None when it runs none."""
    d = cfg.eval.during_training
    if stage not in d.stages or not (d.fractions or d.every_n_steps):
        return None
    at = series_config(cfg, stage)
    judges: dict = {}  # one judge for the whole series (a local judge loads a model)

    def make():
        if "judge" not in judges:
            judges["judge"] = make_judge(at, StageCache(at.cache_dir), next(loaded.model.parameters()).device)
        return judges["judge"]

    def run(model) -> dict:
        in_hand = LoadedModel(model, loaded.tokenizer, loaded.identity, loaded.merge, loaded.no_system)
        return evaluate_in_hand(at, inputs, in_hand, d.metrics or at.eval.metrics, d.personas, judge_factory=make)

    # what the series depends on (its own metric list is in `config`); the adapter itself is the same either way
    payload = {"config": plain(d), "eval": eval_settings_read(at.eval, with_metrics=False),
               "judge": plain(at.judge), "marker": plain(at.marker),
               "seed": at.seed, **inputs.checksums_of("persona_set.path", "eval.questions"),
               "eval_personas": cfg.persona_set.eval_personas,
               "judge_prompts_md5": {k: f.checksum for k, f in sorted(inputs.files.items()) if k.startswith("judge.")}}
    if needs_of(at, d.metrics).capability_split:
        payload["capability_data"] = inputs.mc.fingerprint
    return StepEval(lambda total: eval_steps(d.fractions, d.every_n_steps, total, d.include_start), run, payload)


def series_config(cfg: Config, stage: str) -> Config:
    """The config a during-training series evaluates with: the stage's own seed (so shared stages stay shared) and
    the series' sample count. Its engine is the cell's (`eval.engine.cache`: auto = the static-cache, compiled
    decode on CUDA), run on the training LoRA model in hand (docs/benchmarks.md measures it against stock
    `generate`). A new config: the cell's is not changed."""
    d = cfg.eval.during_training
    generation = replace(cfg.eval.generation, samples_per_question=d.samples_per_question) \
        if d.samples_per_question else cfg.eval.generation
    evaluation = replace(cfg.eval, generation=generation,
                         # the series' own sample count wins over a question file's
                         file_samples=cfg.eval.file_samples and not d.samples_per_question)
    return replace(cfg, seed=cfg.coupling.seed if stage == "coupling" else cfg.seed, eval=evaluation)


def eval_settings_read(eval_cfg, with_metrics: bool = True) -> dict:
    """The eval settings an in-process eval of a model reads, for cache keys: not the probe (read from every model
    in run_cell), the baseline switch, where completions go or the during-training series' own settings."""
    unread = ({"probe", "baseline", "save_completions", "during_training", "max_completions"}
              | (set() if with_metrics else {"metrics"}))
    return {k: v for k, v in plain(eval_cfg).items() if k not in unread}


def baseline_metrics(cfg: Config, inputs: CellInputs, loaded: LoadedModel, cache: StageCache) -> dict:
    """The cell's eval on its base model (before any stage), built once per (base model, eval) in the stage cache:
    the reference a bystander's leakage is measured from."""
    payload = {"baseline_of": loaded.identity, "eval": eval_settings_read(cfg.eval),
               "judge": plain(cfg.judge),
               # the key's name is older than the registry: a judge whose own code versions its scores
               "toy_judge_version": JUDGES.get(cfg.judge.backend).code_version(),
               "marker": plain(cfg.marker), **inputs.checksums_of("persona_set.path", "eval.questions"),
               "eval_personas": cfg.persona_set.eval_personas,
               "seed": cfg.seed}

    def build(tmp: Path) -> None:
        log.info("baseline: evaluating the base model %s", loaded.identity)
        (tmp / "metrics.json").write_text(json.dumps(evaluate_in_hand(cfg, inputs, loaded, cfg.eval.metrics)))

    entry, _ = cache.get_or_build("baseline", cache_key(payload), build, payload)
    return json.loads((entry / "metrics.json").read_text())
