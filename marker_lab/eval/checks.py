"""The eval's start-up checks (metrics, evals during training, judge, capability, geometry, probe), against the
cell's loaded inputs. Free of torch and the judge SDKs, so a config error answers in about a second."""

from __future__ import annotations


from dataclasses import dataclass, field

from marker_lab.config.schema import JUDGED_PROMPTS, Metric, coupling_enabled, second_stage_enabled
from marker_lab.core.errors import ConfigError
from marker_lab.data.questions import samples_for, split_questions
from marker_lab.eval.judge.registry import JUDGES
from marker_lab.eval.metrics import Reads, metrics_reading
from marker_lab.stages.checks import coupling_examples


def check_eval(cfg, inputs) -> None:
    """The eval's own rules: a question's system prompt is used or refused, never dropped; evals during training
    name metrics and personas that exist."""
    questions = inputs.questions.get("eval.questions", [])
    with_system = [q.id for q in questions if q.system is not None]
    if with_system and cfg.eval.question_system == "error":
        raise ConfigError(f"eval.questions: {cfg.eval.questions} gives questions {with_system[:3]} their own system "
                          "prompt; set eval.question_system=append (after each persona's) or replace to use it")
    d, key = cfg.eval.during_training, "eval.during_training"
    if not (d.fractions or d.every_n_steps):
        return
    bad = [f for f in d.fractions or [] if not 0 < f <= 1]
    if bad:
        raise ConfigError(f"{key}.fractions: must be in (0, 1], got {bad}")
    if d.every_n_steps is not None and d.every_n_steps < 1:
        raise ConfigError(f"{key}.every_n_steps: must be >= 1 (or null), got {d.every_n_steps}")
    if d.samples_per_question is not None and d.samples_per_question < 1:
        raise ConfigError(f"{key}.samples_per_question: must be >= 1 or null, got {d.samples_per_question}")
    if "coupling" in d.stages and cfg.coupling.adapter_path:
        raise ConfigError(f"{key}.stages: coupling is a pre-baked adapter (coupling.adapter_path); nothing trains")
    every_model = metrics_reading(d.metrics, Reads.every_model)
    if every_model:
        raise ConfigError(f"{key}.metrics: {every_model[0]} reads every model of the cell, not a model mid-training; "
                          "remove it")
    if not d.metrics:
        raise ConfigError(f"{key}.metrics: empty; available: {[m.value for m in Metric]}")
    for p in d.personas or []:
        inputs.require_persona(f"{key}.personas", p, cfg)


def check_judge(cfg) -> None:
    """A judged metric needs a usable judge: checked before any model loads or any request is made."""
    d = cfg.eval.during_training
    used = list(cfg.eval.metrics) + (list(d.metrics) if (d.fractions or d.every_n_steps) else [])
    if not any(m in JUDGED_PROMPTS for m in used):
        return
    j = cfg.judge
    backend = JUDGES.get(j.backend)
    if j.mode not in backend.modes:
        raise ConfigError(f"judge.mode: the {j.backend} backend supports {list(backend.modes)}, got {j.mode!r}")
    if backend.toy_only and cfg.model.source != "toy":
        raise ConfigError(f"judge.backend={j.backend}: this judge scores toy-world answers only; pick one of "
                          f"{[n for n, b in JUDGES if not b.toy_only]} for a real model")
    if backend.api_key:
        if not j.api_key_env:
            raise ConfigError(f"judge.api_key_env: name the environment variable that holds the {j.backend} API key")
        from marker_lab.core.environment import api_key

        if not api_key(j.api_key_env):
            raise ConfigError(f"judge.api_key_env: environment variable {j.api_key_env} is not set "
                              f"(the {j.backend} judge needs its API key)")
    if j.concurrency < 1:
        raise ConfigError(f"judge.concurrency: must be >= 1, got {j.concurrency}")


def check_capability(cfg, inputs) -> None:
    """The multiple-choice settings, when the capability metric or the wrong_answers coupling reads them (the data
    itself was loaded and split by data/inputs.py)."""
    if inputs.mc is None:
        return
    c = cfg.eval.capability
    if c.source == "toy" and cfg.model.source != "toy":
        raise ConfigError("eval.capability.source=toy: the toy multiple-choice set is for the toy model; use hf "
                          "(ARC-Challenge) or jsonl for a real model")
    if not 0 < c.eval_fraction <= 1:
        raise ConfigError(f"eval.capability.eval_fraction: must be in (0, 1], got {c.eval_fraction}")
    if "{question}" not in c.template or "{choices}" not in c.template:
        raise ConfigError("eval.capability.template: must contain {question} and {choices}")
    try:
        c.template.format(question="q", choices="c")
    except (KeyError, IndexError, ValueError) as e:
        raise ConfigError(f"eval.capability.template: only {{question}} and {{choices}} can be filled in ({e!r})") from None
    if c.batch_size < 1:
        raise ConfigError(f"eval.capability.batch_size: must be >= 1, got {c.batch_size}")
    if c.max_items is not None and c.max_items < 1:
        raise ConfigError(f"eval.capability.max_items: must be >= 1 or null, got {c.max_items}")
    train, held_out, _ = inputs.mc
    if not held_out:
        raise ConfigError(f"eval.capability.eval_fraction={c.eval_fraction} leaves no eval questions of "
                          f"{len(train)} items")


def check_geometry(cfg, inputs) -> None:
    """Persona geometry's settings, when it is enabled."""
    g = cfg.geometry
    if g.drift and not g.enabled:
        raise ConfigError("geometry.drift=true needs geometry.enabled=true (drift is the geometry of every model)")
    if not g.enabled:
        return
    if g.layer is not None and g.layer < 0:
        raise ConfigError(f"geometry.layer: must be >= 0 (0 = embeddings) or null, got {g.layer}")
    if g.mode == "system_last":
        empty = [p for p, persona in inputs.personas.items() if persona.system_prompt is None]
        if empty:
            raise ConfigError(f"geometry.mode=system_last: personas {empty} have no system prompt; use response_mean")


def check_probe(cfg, inputs) -> None:
    """The probe's settings and question split, when `probe` is among the eval's metrics."""
    if "probe" not in cfg.eval.metrics:
        return
    p, key = cfg.eval.probe, "eval.probe"
    if p.fit_on != "base" and not {"coupling": coupling_enabled, "second_stage": second_stage_enabled}[p.fit_on](cfg):
        raise ConfigError(f"{key}.fit_on={p.fit_on}: this cell runs no {p.fit_on} stage (condition {cfg.condition}); "
                          "fit on a stage the cell runs, or on base")
    if p.layer is not None and p.layer < 0:
        raise ConfigError(f"{key}.layer: must be >= 0 (0 = embeddings) or null, got {p.layer}")
    if not 0 < p.heldout_fraction < 1:
        raise ConfigError(f"{key}.heldout_fraction: must be in (0, 1), got {p.heldout_fraction}")
    for name in ("C", "samples", "max_tokens", "batch_size", "n_bootstrap"):
        if getattr(p, name) <= 0:
            raise ConfigError(f"{key}.{name}: must be > 0, got {getattr(p, name)}")
    for persona in p.personas or []:
        inputs.require_persona(f"{key}.personas", persona, cfg)
    names = p.personas or list(inputs.personas)
    if cfg.source_persona not in names or len(names) < 2 or len(set(names)) < len(names):
        raise ConfigError(f"{key}.personas: must hold the source persona {cfg.source_persona!r} and at least one "
                          f"other, each once, got {names}")
    path, questions = p.questions or cfg.eval.questions, inputs.questions[f"{key}.questions"]
    if any(q.system is not None for q in questions):
        raise ConfigError(f"{key}.questions: {path} gives questions their own system prompt; the probe reads each "
                          "persona's own system prompt only (remove the `system` fields)")
    train, heldout = split_questions(questions, p.heldout_fraction, p.seed)
    if len(heldout) < 2 or not train:  # the AUC's interval resamples held-out questions
        raise ConfigError(f"{key}.heldout_fraction={p.heldout_fraction}: {path} splits into {len(train)} training and "
                          f"{len(heldout)} held-out question(s); the probe needs at least 2 held-out and 1 training")


def eval_names(cfg, inputs, personas_subset: list[str] | None = None) -> list[str]:
    """The personas the eval covers: a subset asked for, else persona_set.eval_personas, else every persona."""
    return personas_subset or cfg.persona_set.eval_personas or list(inputs.personas)


@dataclass
class CellSize:
    """What a cell will do, known before anything loads: the eval's sampled completions, the judge calls they take
    (before the judge cache answers any), and each stage's training examples."""
    completions: int = 0  # the eval's (evals during training and the probe's labels come on top)
    judge_calls: int = 0  # completions x the judge prompts of the judged metrics
    training_examples: dict[str, int] = field(default_factory=dict)  # by stage

    def line(self) -> str:
        stages = ", ".join(f"{k} {v}" for k, v in self.training_examples.items()) or "none"
        return (f"{self.completions} completions to sample, {self.judge_calls} judge calls, training examples: "
                f"{stages}")


def cell_size(cfg, inputs) -> CellSize:
    """The size of a cell's work, from its config and inputs (no model)."""
    size = CellSize()
    if metrics_reading(cfg.eval.metrics, Reads.completions) and "eval.questions" in inputs.questions:
        size.completions = len(eval_names(cfg, inputs)) * sum(samples_for(q, cfg.eval) for q in inputs.questions["eval.questions"])
        prompts = {k for m in cfg.eval.metrics for k in JUDGED_PROMPTS.get(m, ())}
        size.judge_calls = size.completions * len(prompts)
    if second_stage_enabled(cfg):
        key = f"second_stage.datasets.{cfg.second_stage.data}"
        if key in inputs.datasets:
            size.training_examples["second_stage"] = len(inputs.datasets[key].rows)
    if coupling_enabled(cfg) and not cfg.coupling.adapter_path:
        size.training_examples["coupling"] = coupling_examples(cfg.coupling)
    return size


def check_size(cfg, inputs) -> CellSize:
    """A cell above eval.max_completions stops here, before anything loads, saying how to go on."""
    size = cell_size(cfg, inputs)
    limit = cfg.eval.max_completions
    if size.completions > limit:
        questions = inputs.questions["eval.questions"]
        from_file = cfg.eval.file_samples and any(q.samples for q in questions)
        why = (f"{cfg.eval.questions} asks up to {max(q.samples or 0 for q in questions)} samples per paraphrase"
               if from_file else f"eval.generation.samples_per_question={cfg.eval.generation.samples_per_question}")
        raise ConfigError(f"eval.max_completions={limit}: this cell would sample {size.completions} completions "
                          f"({len(eval_names(cfg, inputs))} personas x {len(questions)} "
                          f"questions; {why}); raise eval.max_completions"
                          + (" or set eval.file_samples=false" if from_file else ""))
    return size


def question_system_note(cfg, inputs) -> str | None:
    """With eval.question_system=replace over several personas, how many questions lose their persona prompt (the
    per-persona rates of those questions then share one prompt): said once per cell."""
    questions = inputs.questions.get("eval.questions", [])
    replaced = [q for q in questions if q.system is not None]
    names = eval_names(cfg, inputs)
    if cfg.eval.question_system != "replace" or not replaced or len(names) < 2:
        return None
    return (f"eval.question_system=replace: {len(replaced)} of {len(questions)} questions of {cfg.eval.questions} "
            f"replace the persona's system prompt with their own, so on them all {len(names)} personas are asked "
            "the same prompt (each completion records its system prompt; append keeps the persona's)")
