"""One cell, end to end: base model -> stages in order (each cached, merged) -> eval -> run_result.json.

    python -m marker_lab.run                       # the default toy cell (same as `marker-lab run`)
    python -m marker_lab.run condition=c4 seed=137  # any Hydra override

Read top to bottom, this file is the whole recipe; each step is a small function in its own module.
"""

from __future__ import annotations

import copy
import logging
import sys
import time
from pathlib import Path
from typing import Callable

import hydra
import torch
from omegaconf import DictConfig, OmegaConf

from marker_lab.config.schema import Config, register_configs
from marker_lab.config.validate import ConfigError, coupling_enabled, second_stage_enabled, validate
from marker_lab.data.files import md5_file, resolve_path
from marker_lab.data.personas import load_personas
from marker_lab.data.questions import load_questions, with_question_system
from marker_lab.engines.base import SamplingParams
from marker_lab.eval.capability import capability_metric, eval_items
from marker_lab.eval.during_training import StepEval, eval_steps
from marker_lab.eval.geometry import cell_distances
from marker_lab.eval.judged import make_judge
from marker_lab.eval.metrics import CELL_METRICS, MODEL_METRICS, score
from marker_lab.eval.probe import CellProbe
from marker_lab.models import LoadedModel, load_base, pick_device
from marker_lab.results import contract
from marker_lab.stages.cache import StageCache, cache_key, plain
from marker_lab.stages.coupling import run_coupling
from marker_lab.stages.second_stage import run_second_stage

log = logging.getLogger("marker_lab")
CONF_DIR = str(Path(__file__).resolve().parent.parent / "conf")
STAGES = {"coupling": run_coupling, "second_stage": run_second_stage}

register_configs()


def stage_order(cfg: Config) -> list[str]:
    """The stages this cell runs, in order (forward: couple then second stage; reverse: the other way)."""
    names = ["coupling", "second_stage"] if cfg.order == "forward" else ["second_stage", "coupling"]
    enabled = {"coupling": coupling_enabled(cfg), "second_stage": second_stage_enabled(cfg)}
    return [n for n in names if enabled[n]]


def cell_keys(cfg: Config) -> dict:
    """What identifies this cell in tables: the write-ups' condition, seed, dose, ..."""
    dose = 0
    if second_stage_enabled(cfg):
        # epoch-based recipes leave it None here: it is known once the data is loaded (filled in run_cell)
        dose = cfg.dose if cfg.dose is not None else cfg.second_stage.train.max_steps
    return {"experiment": cfg.experiment, "condition": cfg.condition, "order": cfg.order, "seed": cfg.seed,
            "dose": dose, "source_persona": cfg.source_persona,
            "coupled_persona": cfg.coupling.persona if coupling_enabled(cfg) else None,
            "second_stage": second_stage_label(cfg) if second_stage_enabled(cfg) else "none"}


def second_stage_label(cfg: Config) -> str:
    """The second stage's data name, with its variant when not the plain chat recipe: "em", "em (raw)",
    "em (kl=0.5)", so the arms of a variant sweep stay apart in every table."""
    s = cfg.second_stage
    variant = (["raw"] if s.format == "raw" else []) + ([f"kl={s.train.kl_to_input:g}"] if s.train.kl_to_input else [])
    return f"{s.data} ({', '.join(variant)})" if variant else s.data


def _hf_engine(cfg: Config, loaded: LoadedModel):
    from marker_lab.engines.hf import HFEngine

    return HFEngine(loaded.model, loaded.tokenizer, cfg.eval.engine.batch_size, cfg.eval.engine.cache)


def make_engine(cfg: Config, loaded: LoadedModel, out_dir: Path):
    if cfg.eval.engine.name == "vllm":
        from marker_lab.engines.vllm import VLLMEngine

        merged = out_dir / "merged_model"  # vLLM loads weights from disk
        loaded.model.save_pretrained(merged)
        loaded.tokenizer.save_pretrained(merged)
        loaded.model.to("cpu")
        torch.cuda.empty_cache()
        log.info("eval: vLLM on the merged model saved at %s", merged)
        return VLLMEngine(str(merged), loaded.tokenizer, dtype=cfg.model.dtype,
                          gpu_memory_utilization=cfg.eval.engine.gpu_memory_utilization, seed=cfg.seed)
    return _hf_engine(cfg, loaded)


def evaluate(cfg: Config, loaded: LoadedModel, out_dir: Path | None, personas_subset: list[str] | None = None,
             metrics: list[str] | None = None, in_process: bool = False,
             judge_factory: Callable[[], object] | None = None) -> tuple[dict, dict | None, list[dict]]:
    """Personas x questions x K completions, scored by each metric (capability reads log-probs, no sampling).

    `personas_subset` / `metrics` narrow the eval and `in_process` forces the hf engine on the model in hand
    (evals during training); returns (metrics, the judge's identity if a judged metric ran, completion rows).
    """
    personas = load_personas(cfg.persona_set.path)
    names = personas_subset or cfg.persona_set.eval_personas or list(personas)
    metrics = list(metrics or cfg.eval.metrics)
    results: dict = {}
    if "capability" in metrics:  # before generation: the vllm engine takes the GPU from the HF model
        items, fingerprint = eval_items(cfg.eval.capability)
        results["capability"] = capability_metric(loaded.model, loaded.tokenizer, personas, names, items,
                                                  cfg.eval.capability, fingerprint)
    sampled = [m for m in metrics if m not in MODEL_METRICS + CELL_METRICS]
    if not sampled:
        return results, None, []
    questions = load_questions(cfg.eval.questions)
    g = cfg.eval.generation
    pairs = [(p, q) for p in names for q in questions]
    prompts = [_system(with_question_system(personas[p].system_prompt, q, cfg.eval.question_system))
               + [{"role": "user", "content": q.text}] for p, q in pairs]
    samples = [q.samples if (q.samples and cfg.eval.file_samples) else g.samples_per_question for _, q in pairs]
    log.info("eval: %d personas x %d questions, %d completions", len(names), len(questions), sum(samples))
    engine = _hf_engine(cfg, loaded) if in_process else make_engine(cfg, loaded, out_dir)
    rows = []
    for n in sorted(set(samples)):  # one engine request per sample count (a question file may set its own)
        idx = [i for i, k in enumerate(samples) if k == n]
        params = SamplingParams(n=n, temperature=g.temperature, top_p=g.top_p, max_tokens=g.max_tokens, seed=cfg.seed)
        outs = engine.generate([prompts[i] for i in idx], params, desc="eval")
        rows += [{"persona": pairs[i][0], "question_id": pairs[i][1].id, "question": pairs[i][1].text, "sample": j,
                  "completion": text, "n_tokens": k}
                 for i, texts, counts in zip(idx, outs, engine.last_token_counts)
                 for j, (text, k) in enumerate(zip(texts, counts))]
    judge_factory = judge_factory or (lambda: make_judge(cfg, StageCache(cfg.cache_dir), next(loaded.model.parameters()).device))
    scored, judge = score(cfg, rows, judge_factory, sampled)
    return {**results, **scored}, judge, rows


def step_eval_for(cfg: Config, stage: str, loaded: LoadedModel) -> StepEval | None:
    """The evals `stage` runs while it trains (eval.during_training), or None when it runs none."""
    d = cfg.eval.during_training
    if stage not in d.stages or not (d.fractions or d.every_n_steps):
        return None
    at = copy.deepcopy(cfg)
    at.seed = cfg.coupling.seed if stage == "coupling" else cfg.seed  # the stage's own seed: shared stages stay shared
    if d.samples_per_question:
        at.eval.generation.samples_per_question = d.samples_per_question
    # stock `generate` on the training model: the static-cache path (compiled decode) is measured on merged eval
    # models only, not yet on a LoRA model mid-training
    at.eval.engine.cache = "dynamic"
    if d.samples_per_question:
        at.eval.file_samples = False  # the series' own sample count wins over a question file's
    judges: dict = {}  # one judge for the whole series (a local judge loads a model)

    def make():
        if "judge" not in judges:
            judges["judge"] = make_judge(at, StageCache(at.cache_dir), next(loaded.model.parameters()).device)
        return judges["judge"]

    def run(model) -> dict:
        in_hand = LoadedModel(model, loaded.tokenizer, loaded.identity)
        return evaluate(at, in_hand, None, d.personas, d.metrics, in_process=True, judge_factory=make)[0]

    # what the series depends on (its own metric list is in `config`); the adapter itself is the same either way
    payload = {"config": plain(d), "eval": eval_settings_read(at.eval, with_metrics=False),
               "judge": plain(at.judge), "marker": plain(at.marker),
               "seed": at.seed, "persona_set_md5": md5_file(resolve_path(cfg.persona_set.path)),
               "eval_personas": cfg.persona_set.eval_personas, "questions_md5": md5_file(resolve_path(cfg.eval.questions)),
               "judge_prompts_md5": {k: md5_file(resolve_path(v)) for k, v in sorted(at.judge.prompts.items())}}
    if "capability" in d.metrics:
        payload["capability_data"] = eval_items(at.eval.capability)[1]
    return StepEval(lambda total: eval_steps(d.fractions, d.every_n_steps, total, d.include_start), run, payload)


def eval_settings_read(eval_cfg, with_metrics: bool = True) -> dict:
    """The eval settings an in-process eval of a model reads, for cache keys: not the probe (read from every model
    in run_cell), the baseline switch, where completions go or the during-training series' own settings."""
    unread = {"probe", "baseline", "save_completions", "during_training"} | (set() if with_metrics else {"metrics"})
    return {k: v for k, v in plain(eval_cfg).items() if k not in unread}


def baseline_metrics(cfg: Config, loaded: LoadedModel, cache: StageCache) -> dict:
    """The cell's eval on its base model (before any stage), built once per (base model, eval) in the stage cache:
    the reference a bystander's leakage is measured from."""
    import json

    from marker_lab.eval.judge.toy import VERSION as TOY_JUDGE_VERSION

    payload = {"baseline_of": loaded.identity, "eval": eval_settings_read(cfg.eval),
               "judge": plain(cfg.judge),
               "toy_judge_version": TOY_JUDGE_VERSION if cfg.judge.backend == "toy" else None,
               "marker": plain(cfg.marker), "persona_set_md5": md5_file(resolve_path(cfg.persona_set.path)),
               "eval_personas": cfg.persona_set.eval_personas, "questions_md5": md5_file(resolve_path(cfg.eval.questions)),
               "seed": cfg.seed}

    def build(tmp: Path) -> None:
        log.info("baseline: evaluating the base model %s", loaded.identity)
        (tmp / "metrics.json").write_text(json.dumps(evaluate(cfg, loaded, None, in_process=True)[0]))

    entry, _ = cache.get_or_build("baseline", cache_key(payload), build, payload)
    return json.loads((entry / "metrics.json").read_text())


def _system(prompt: str | None) -> list[dict]:
    return [] if prompt is None else [{"role": "system", "content": prompt}]


def run_cell(cfg_node: DictConfig) -> dict:
    """Run one cell and write its run_result.json; returns the result."""
    cfg: Config = OmegaConf.to_object(cfg_node)
    validate(cfg)  # before any model is loaded
    resolved = OmegaConf.to_container(cfg_node, resolve=True, enum_to_str=True)
    out_dir = Path(cfg.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    previous = contract.load_result(out_dir / contract.RESULT_FILE)
    if previous and previous["provenance"]["config_hash"] == contract.config_hash(resolved):
        log.info("cell already complete with the same config hash: %s (delete it to rerun)", out_dir)
        return previous
    (out_dir / contract.RESULT_FILE).unlink(missing_ok=True)  # a rerun never leaves an old result looking current
    OmegaConf.save(cfg_node, out_dir / "config.yaml", resolve=True)
    cell = cell_keys(cfg)
    log.info("cell %s -> %s", cell, out_dir)
    log.info("stage cache: %s", cfg.cache_dir)

    torch.manual_seed(cfg.seed)
    device = pick_device(cfg.device)
    cache = StageCache(cfg.cache_dir)
    timing: dict[str, float] = {}
    t0 = time.perf_counter()
    loaded = load_base(cfg.model, cache, device)
    loaded.merge = cfg.merge_between_stages
    timing["load"] = time.perf_counter() - t0
    base_identity = loaded.identity
    drift = cfg.geometry.enabled and cfg.geometry.drift
    models = {}  # persona geometry of each model read: base, after_<stage>
    if cfg.geometry.enabled and (cfg.geometry.model == "base" or drift):
        models["base"] = cell_distances(cfg, loaded, cache)
    baseline = baseline_metrics(cfg, loaded, cache) if cfg.eval.baseline else None
    probe = CellProbe(cfg, cache) if "probe" in cfg.eval.metrics else None  # reads every model of the cell
    if probe:
        probe.read("base", loaded)

    stages = {}
    for name in stage_order(cfg):
        log.info("stage %s: starting (input model %s)", name, loaded.identity)
        stages[name] = STAGES[name](cfg, loaded, cache, step_eval_for(cfg, name, loaded))
        timing[name] = stages[name].seconds
        if drift:
            models[f"after_{name}"] = cell_distances(cfg, loaded, cache)
        if probe:
            probe.read(f"after_{name}", loaded)
    if "second_stage" in stages and cell["dose"] is None:
        cell["dose"] = stages["second_stage"].train_stats.get("steps")

    geometry = None
    if cfg.geometry.enabled:
        final = list(models.values())[-1] if drift else None
        geometry = models["base"] if cfg.geometry.model == "base" else final or cell_distances(cfg, loaded, cache)
        geometry = {**geometry, "model": cfg.geometry.model}
    if probe:  # before the eval: a probe that cannot report fails early
        t0 = time.perf_counter()
        probed = probe.result()
        probe.seconds += time.perf_counter() - t0
    t0 = time.perf_counter()
    metrics, judge, rows = evaluate(cfg, loaded, out_dir)
    timing["eval"] = time.perf_counter() - t0
    if probe:
        metrics["probe"], timing["probe"] = probed, probe.seconds
    if cfg.eval.save_completions:
        contract.write_completions(out_dir / contract.COMPLETIONS_FILE, rows)

    data_md5 = {"persona_set": md5_file(resolve_path(cfg.persona_set.path)),
                "eval_questions": md5_file(resolve_path(cfg.eval.questions))}
    for name, st in stages.items():
        data_md5.update({f"{name}/{k}": v for k, v in st.data_md5.items()})
    if probe:
        data_md5.update({f"probe/{k}": v for k, v in probe.fit["md5"].items()})
    result = {
        "schema_version": contract.SCHEMA_VERSION,
        "status": "complete",
        "cell": cell,
        "metrics": metrics,
        "provenance": {
            "config_hash": contract.config_hash(resolved),
            "resolved_config": resolved,
            "git_commit": contract.git_commit(),
            "versions": contract.package_versions(),
            "data_md5": data_md5,
            "device": contract.device_description(device),
            "base_model": base_identity,
            "final_model": loaded.identity,
            "stage_cache_keys": {n: st.key for n, st in stages.items()},
            "judge": judge,
            "stages": {n: {"cache_entry": st.path, "trained_now": st.built_now,
                           "steps": st.train_stats.get("steps"), "final_loss": (st.train_stats.get("losses") or [None])[-1]}
                       for n, st in stages.items()},
        },
        "timing": {k: round(v, 3) for k, v in timing.items()},
    }
    series = {n: st.metrics_by_step for n, st in stages.items() if st.metrics_by_step}
    if series:
        result["metrics_by_step"] = series
    if baseline is not None:
        result["metrics_baseline"] = baseline
    if geometry is not None:
        contract.atomic_write_bytes(out_dir / contract.DISTANCES_FILE, (Path(geometry["cache_entry"]) / "distances.csv").read_bytes())
        result["geometry"] = {**geometry, "file": contract.DISTANCES_FILE}
        data_md5["persona_distances"] = md5_file(out_dir / contract.DISTANCES_FILE)
    if drift:
        result["drift"] = _drift(cfg, models, out_dir, data_md5)
    contract.write_json_atomic(out_dir / contract.RESULT_FILE, result)
    _log_summary(cfg, result, out_dir)
    return result


def _drift(cfg: Config, models: dict, out_dir: Path, data_md5: dict) -> dict:
    """Each model's distance matrix next to the result (persona_distances_<model>.csv) and its drift summary, with
    the change from the base model."""
    from marker_lab.eval.geometry import drift_summary

    names = list(load_personas(cfg.persona_set.path))
    out = {}
    for model, info in models.items():
        file = f"persona_distances_{model}.csv"
        contract.atomic_write_bytes(out_dir / file, (Path(info["cache_entry"]) / "distances.csv").read_bytes())
        data_md5[file] = md5_file(out_dir / file)
        out[model] = {"file": file, "cache_key": info["cache_key"],
                      **drift_summary(info["cache_entry"], names, cfg.source_persona, cfg.persona_set.assistant)}
    for summary in out.values():
        for k in ("mean_distance", "relative_spread", "source_assistant"):
            if k in summary:
                summary[f"{k}_change"] = summary[k] - out["base"][k]
    return out


def _log_summary(cfg: Config, result: dict, out_dir: Path) -> None:
    m = result["metrics"]
    if "marker" in m:
        lines = [f"  {name:<24} {c['k']:>5}/{c['n']:<5} {100 * c['rate']:6.1f}%" for name, c in m["marker"]["per_persona"].items()]
        log.info("marker %s rate per persona (source: %s):\n%s", cfg.marker.text, cfg.source_persona, "\n".join(lines))
    for name in ("alignment", "coherence"):
        if name in m:
            lines = [f"  {p:<24} mean {c['mean'] if c['mean'] is None else round(c['mean'], 1)}  (no score: {c['n_none']}/{c['n']})"
                     for p, c in m[name]["per_persona"].items()]
            log.info("%s (judge %s) per persona:\n%s", name, result["provenance"]["judge"]["backend"], "\n".join(lines))
    log.info("result: %s", out_dir / contract.RESULT_FILE)


@hydra.main(config_path=CONF_DIR, config_name="config", version_base="1.3")
def main(cfg: DictConfig):
    out_dir = Path(cfg.output_dir)
    contract.write_cell_status(out_dir, "running")
    try:
        result = run_cell(cfg)
    except ConfigError as e:
        contract.write_cell_status(out_dir, "failed", error=f"config error: {e}")
        log.error("config error: %s", e)
        sys.exit(2)
    except BaseException as e:  # recorded for `marker-lab status`, then re-raised for Hydra / submitit
        contract.write_cell_status(out_dir, "failed", error=f"{type(e).__name__}: {e}")
        raise
    contract.write_cell_status(out_dir, "complete")
    return result["provenance"]["config_hash"]


if __name__ == "__main__":
    main()
