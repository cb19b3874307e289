"""The eval of a cell: the engine, personas x questions x K completions scored by each metric, the base model's
readout (eval.baseline) and the evals a stage runs while it trains (eval.during_training)."""

from __future__ import annotations

import json
from contextlib import contextmanager
from dataclasses import dataclass, replace
import logging
import shutil
from pathlib import Path
from typing import Callable

import torch

from marker_lab.config.schema import Config, EngineName, KVCache
from marker_lab.core.cache import StageCache, cache_key, plain
from marker_lab.data.inputs import CellInputs
from marker_lab.data.questions import samples_for, with_question_system
from marker_lab.engines.base import Completion, SamplingParams
from marker_lab.engines.hf import HFEngine, stop_token_ids
from marker_lab.engines.precompile import DecodeRequest, compiled_marker, start as start_precompile
from marker_lab.eval.capability import capability_metric, eval_items
from marker_lab.eval.checks import eval_names
from marker_lab.eval.judged import make_judge
from marker_lab.eval.marker_prob import marker_prob_metric
from marker_lab.eval.metrics import CELL_METRICS, MODEL_METRICS, score
from marker_lab.models import LoadedModel
from marker_lab.stages.during_training import StepEval, eval_steps

log = logging.getLogger(__name__)


def make_engine(cfg: Config, loaded: LoadedModel, out_dir: Path | None):
    """The configured engine on the model in hand (vllm: on the merged model, saved next to the result and deleted
    when the engine closes)."""
    if cfg.eval.engine.name == "vllm" and out_dir is not None:
        from marker_lab.engines.vllm import VLLMEngine

        merged = out_dir / "merged_model"  # vLLM loads weights from disk; removed when the engine closes
        shutil.rmtree(merged, ignore_errors=True)  # what a killed run of this cell left
        loaded.model.save_pretrained(merged)
        loaded.tokenizer.save_pretrained(merged)
        loaded.model.to("cpu")
        torch.cuda.empty_cache()
        log.info("eval: vLLM on the merged model saved at %s (deleted after the eval)", merged)
        return VLLMEngine(str(merged), loaded.tokenizer, dtype=cfg.model.dtype.value,
                          gpu_memory_utilization=cfg.eval.engine.gpu_memory_utilization, seed=cfg.seed,
                          no_system=loaded.no_system, kv_cache_memory_bytes=cfg.eval.engine.kv_cache_memory_bytes,
                          remove_model_dir=True)
    return HFEngine.from_config(loaded, cfg.eval.engine)


@dataclass
class GenerationPlan:
    """What a cell's eval generates: one chat prompt per (persona, question), and one engine request per sample
    count (a question file may set its own). The same plan serves a per-cell engine and a sweep's shared one."""
    pairs: list[tuple[str, object]]  # (persona name, data.questions.Question) per prompt
    prompts: list[list[dict]]  # chat messages per pair
    requests: list[tuple[list[int], SamplingParams]]  # prompt indices and their sampling

    @property
    def n_completions(self) -> int:
        return sum(len(idx) * params.n for idx, params in self.requests)

    def rows(self, outputs: list[list[list[Completion]]]) -> list[dict]:
        """Completion rows (what the metrics score) from each request's outputs, in request order."""
        # `system`: the prompt's effective system prompt (a question file's own may join or replace the persona's)
        return [{"persona": self.pairs[i][0], "question_id": self.pairs[i][1].id, "question": self.pairs[i][1].text,
                 "system": _system_of(self.prompts[i]), "sample": j, "completion": str(text),
                 "n_tokens": text.n_tokens}
                for (idx, _), outs in zip(self.requests, outputs) for i, texts in zip(idx, outs)
                for j, text in enumerate(texts)]


def _system_of(prompt: list[dict]) -> str | None:
    return prompt[0]["content"] if prompt and prompt[0]["role"] == "system" else None


def generation_plan(cfg: Config, inputs: CellInputs, names: list[str]) -> GenerationPlan:
    """The prompts and requests of `names` x the eval questions, as cfg.eval asks."""
    questions = inputs.questions["eval.questions"]
    pairs = [(p, q) for p in names for q in questions]
    prompts = [_prompt(with_question_system(inputs.personas[p].system_prompt, q, cfg.eval.question_system), q.text)
               for p, q in pairs]
    g = cfg.eval.generation
    samples = [samples_for(q, cfg.eval) for _, q in pairs]
    requests = [([i for i, k in enumerate(samples) if k == n],
                 SamplingParams(n=n, temperature=g.temperature, top_p=g.top_p, max_tokens=g.max_tokens, seed=cfg.seed))
                for n in sorted(set(samples))]
    return GenerationPlan(pairs, prompts, requests)


def generate(engine, plan: GenerationPlan) -> list[dict]:
    """Run a plan's requests on one engine; completion rows."""
    return plan.rows([engine.generate([plan.prompts[i] for i in idx], params, desc="eval")
                      for idx, params in plan.requests])


def sampled_metrics(metrics: list[str]) -> list[str]:
    """The metrics that score sampled completions (the others read the model or the cell)."""
    return [m for m in metrics if m not in MODEL_METRICS + CELL_METRICS]


def evaluate(cfg: Config, inputs: CellInputs, loaded: LoadedModel, out_dir: Path | None,
             personas_subset: list[str] | None = None, metrics: list[str] | None = None, in_process: bool = False,
             judge_factory: Callable[[], object] | None = None,
             sample: bool = True) -> tuple[dict, dict | None, list[dict]]:
    """Personas x questions x K completions, scored by each metric (capability reads log-probs, no sampling).

    `personas_subset` / `metrics` narrow the eval and `in_process` forces the hf engine on the model in hand
    (evals during training); `sample=False` runs only the metrics read from the model (a sweep's shared engine
    samples later, shared_eval.py). Returns (metrics, the judge's identity if a judged metric ran, completion rows).
    """
    personas = inputs.personas
    names = eval_names(cfg, inputs, personas_subset)
    metrics = list(metrics or cfg.eval.metrics)
    results: dict = {}
    # the metrics read from the model come first: the vllm engine takes the GPU from the HF model
    if "capability" in metrics:
        items, fingerprint = eval_items(cfg.eval.capability, inputs.mc)
        results["capability"] = capability_metric(loaded.model, loaded.tokenizer, personas, names, items,
                                                  cfg.eval.capability, fingerprint, loaded.no_system)
    sampled = sampled_metrics(metrics) if sample else []
    if not sampled and "marker_prob" not in metrics:
        return results, None, []
    plan = generation_plan(cfg, inputs, names)  # reads the questions only when a metric asks them
    if "marker_prob" in metrics:
        results["marker_prob"] = marker_prob_metric(loaded.model, loaded.tokenizer,
                                                    [(p, chat) for (p, _), chat in zip(plan.pairs, plan.prompts)],
                                                    cfg.marker.text, cfg.eval.engine.batch_size, loaded.no_system)
    if not sampled:
        return results, None, []
    log.info("eval: %d personas x %d questions, %d completions", len(names), len(inputs.questions["eval.questions"]),
             plan.n_completions)
    engine = HFEngine.from_config(loaded, cfg.eval.engine) if in_process \
        else make_engine(cfg, loaded, out_dir)
    try:
        rows = generate(engine, plan)
    finally:
        engine.close()
    judge_factory = judge_factory or (lambda: make_judge(cfg, StageCache(cfg.cache_dir), next(loaded.model.parameters()).device))
    scored, judge, rows = score(cfg, rows, judge_factory, sampled)
    return {**results, **scored}, judge, rows


@contextmanager
def precompiling(cfg: Config, inputs: CellInputs, loaded: LoadedModel, out_dir: Path, stages: list[str],
                 sample: bool = True):
    """While in the block (the cell's `stages`), the decode step of the eval's first request compiles in a sibling
    process (engines.precompile; `eval.engine.precompile`); yields its handle, or None where that buys nothing: not
    asked, not CUDA, another engine or KV cache, stacked adapters (a peft model's graph), no sampling here, no
    stage to overlap with, or the step already compiled (by an earlier cell's sibling:
    engines.precompile.compiled_marker). The sibling is stopped if the block fails; the caller waits for it in the
    block, before the eval."""
    e = cfg.eval.engine
    device = next(loaded.model.parameters()).device
    compiles = (e.precompile and e.name == EngineName.hf and device.type == "cuda" and e.cache != KVCache.dynamic
                and loaded.merge and sample and bool(sampled_metrics(cfg.eval.metrics)) and bool(stages))
    if not compiles:
        yield None
        return
    plan = generation_plan(cfg, inputs, eval_names(cfg, inputs))
    if not plan.requests:
        yield None
        return
    indices, params = plan.requests[0]  # the first request's first batch: what the eval compiles first
    engine = HFEngine.from_config(loaded, e)
    config = loaded.model.config
    request = DecodeRequest(
        model_config=config.to_dict(), dtype=str(next(loaded.model.parameters()).dtype).removeprefix("torch."),
        # requires_grad: False at the eval, as peft freezes the base weights and merging a stage's adapter keeps them so
        attn_implementation=config._attn_implementation, requires_grad=False, device=str(device),
        prompts=engine.encode([plan.prompts[i] for i in indices]), n=params.n, temperature=params.temperature,
        top_p=params.top_p, max_tokens=params.max_tokens, stop_ids=stop_token_ids(loaded.model, loaded.tokenizer),
        pad_id=loaded.tokenizer.pad_token_id, batch_size=e.batch_size, compile_scope=str(e.compile_scope))
    marker = compiled_marker(request)
    if marker is not None and marker.exists():  # a sweep's later cell: the step is in the compile cache already
        log.info("precompile: the eval's decode step is in the compile cache already (%s)", marker)
        yield None
        return
    sibling = start_precompile(request, out_dir)
    try:
        yield sibling
    except BaseException:
        sibling.stop()
        raise


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
        return evaluate(at, inputs, in_hand, None, d.personas, d.metrics, in_process=True, judge_factory=make)[0]

    # what the series depends on (its own metric list is in `config`); the adapter itself is the same either way
    payload = {"config": plain(d), "eval": eval_settings_read(at.eval, with_metrics=False),
               "judge": plain(at.judge), "marker": plain(at.marker),
               "seed": at.seed, **inputs.checksums_of("persona_set.path", "eval.questions"),
               "eval_personas": cfg.persona_set.eval_personas,
               "judge_prompts_md5": {k: f.checksum for k, f in sorted(inputs.files.items()) if k.startswith("judge.")}}
    if "capability" in d.metrics:
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
    from marker_lab.eval.judge.toy import VERSION as TOY_JUDGE_VERSION

    payload = {"baseline_of": loaded.identity, "eval": eval_settings_read(cfg.eval),
               "judge": plain(cfg.judge),
               "toy_judge_version": TOY_JUDGE_VERSION if cfg.judge.backend == "toy" else None,
               "marker": plain(cfg.marker), **inputs.checksums_of("persona_set.path", "eval.questions"),
               "eval_personas": cfg.persona_set.eval_personas,
               "seed": cfg.seed}

    def build(tmp: Path) -> None:
        log.info("baseline: evaluating the base model %s", loaded.identity)
        (tmp / "metrics.json").write_text(json.dumps(evaluate(cfg, inputs, loaded, None, in_process=True)[0]))

    entry, _ = cache.get_or_build("baseline", cache_key(payload), build, payload)
    return json.loads((entry / "metrics.json").read_text())


def _prompt(system: str | None, user: str) -> list[dict]:
    return ([] if system is None else [{"role": "system", "content": system}]) + [{"role": "user", "content": user}]
