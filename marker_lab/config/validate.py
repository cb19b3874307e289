"""Cross-field checks that types alone cannot express. Each failure is one line naming the key."""

from __future__ import annotations

import os
import re
from pathlib import Path

import yaml

from marker_lab.config.schema import Config, Schedule
from marker_lab.data.files import resolve_path
from marker_lab.data.personas import file_roles, load_personas
from marker_lab.data.questions import load_questions
from marker_lab.engines import ENGINES


class ConfigError(ValueError):
    """A config that cannot run; the message names the offending key and value."""


def second_stage_enabled(cfg: Config) -> bool:
    return cfg.second_stage.data not in (None, "none") and cfg.dose != 0


def coupling_enabled(cfg: Config) -> bool:
    return cfg.coupling.persona not in (None, "none")


def validate(cfg: Config) -> None:
    """Raise ConfigError on the first problem; cheap (reads small files only, loads no model)."""
    if cfg.order not in ("forward", "reverse"):
        raise ConfigError(f"order: must be forward or reverse, got {cfg.order!r}")
    if cfg.dose is not None and cfg.dose < 0:
        raise ConfigError(f"dose: must be >= 0 optimizer steps (0 skips the second stage), got {cfg.dose}")
    if not cfg.merge_between_stages and cfg.eval.engine.name == "vllm":
        raise ConfigError("merge_between_stages=false with eval.engine.name=vllm: the vllm engine evaluates merged "
                          "weights; use merge_between_stages=true or the hf engine")
    kl = [k for k, t in (("coupling.train", cfg.coupling.train), ("second_stage.train", cfg.second_stage.train))
          if t.kl_to_input]
    if kl and not cfg.merge_between_stages and coupling_enabled(cfg) and second_stage_enabled(cfg):
        raise ConfigError(f"{kl[0]}.kl_to_input with merge_between_stages=false: the input model is the base with "
                          "adapters disabled, which would drop the earlier stage's stacked adapter too; merge stages")
    if cfg.model.source not in ("toy", "hf"):
        raise ConfigError(f"model.source: must be toy or hf, got {cfg.model.source!r}")
    if cfg.model.source == "hf" and not cfg.model.path:
        raise ConfigError("model.path: required when model.source=hf (a hub id or local directory)")
    tok = cfg.model.tokenizer
    if tok and tok.startswith(("/", ".", "~")) and not Path(tok).expanduser().is_dir():
        raise ConfigError(f"model.tokenizer: directory not found: {tok}")
    if cfg.model.no_system not in ("none", "template"):
        raise ConfigError(f"model.no_system: must be none or template, got {cfg.model.no_system!r}")
    _check_geometry(cfg)
    if cfg.model.dtype not in ("float32", "bfloat16", "float16"):
        raise ConfigError(f"model.dtype: must be float32, bfloat16 or float16, got {cfg.model.dtype!r}")
    if cfg.eval.engine.name not in ENGINES:
        raise ConfigError(f"eval.engine.name: must be one of {list(ENGINES)}, got {cfg.eval.engine.name!r}")
    during = cfg.eval.during_training
    during_on = bool(during.fractions or during.every_n_steps)
    if any(m in ("alignment", "coherence") for m in cfg.eval.metrics + (during.metrics if during_on else [])):
        _check_judge(cfg)
    for i, rule in enumerate(cfg.eval.misaligned):
        for field_name in ("aligned", "coherent"):
            if not re.fullmatch(r"(<=|>=|<|>)\s*\d+(\.\d+)?", getattr(rule, field_name).strip()):
                raise ConfigError(f"eval.misaligned[{i}].{field_name}: must look like '<=30' or '>50', "
                                  f"got {getattr(rule, field_name)!r}")
        if rule.denominator not in ("all", "coherent"):
            raise ConfigError(f"eval.misaligned[{i}].denominator: must be all or coherent, got {rule.denominator!r}")
    if cfg.eval.engine.cache not in ("auto", "dynamic", "static"):
        raise ConfigError(f"eval.engine.cache: must be auto, dynamic or static, got {cfg.eval.engine.cache!r}")
    if cfg.eval.engine.name == "vllm":
        from marker_lab.engines.vllm import available

        if not available():
            raise ConfigError("eval.engine.name=vllm: vllm is not installed (pip install -e .[vllm])")
    from marker_lab.eval.metrics import METRICS

    unknown_metrics = [m for m in cfg.eval.metrics if m not in METRICS]
    if unknown_metrics:
        raise ConfigError(f"eval.metrics: unknown metric(s) {unknown_metrics}; available: {list(METRICS)}")

    personas = _personas(cfg.persona_set.path)
    names = list(personas)

    def need(key: str, name: str | None) -> None:
        if name is not None and name not in personas:
            raise ConfigError(f"{key}: persona {name!r} is not in persona_set {cfg.persona_set.name!r} "
                              f"({cfg.persona_set.path}); known: {', '.join(names)}")

    need("source_persona", cfg.source_persona)
    need("persona_set.assistant", cfg.persona_set.assistant)
    for p in cfg.persona_set.eval_personas or []:
        need("persona_set.eval_personas", p)
    try:
        file_sources, file_bystanders = file_roles(cfg.persona_set.path)
    except ValueError as e:
        raise ConfigError(f"persona_set.path: {e}") from None
    for key, listed in (("sources", cfg.persona_set.sources or file_sources), ("bystanders", cfg.persona_set.bystanders or file_bystanders)):
        for p in listed or []:
            need(f"persona_set.{key}", p)
    for path_key, path in (("eval.questions", cfg.eval.questions), ("coupling.questions", cfg.coupling.questions)):
        if not resolve_path(path).is_file():
            raise ConfigError(f"{path_key}: file not found: {path}")

    _check_analysis(cfg)
    _check_questions(cfg)
    if "capability" in cfg.eval.metrics or "capability" in cfg.eval.during_training.metrics:
        _check_capability(cfg)
    _check_during_training(cfg, need)
    if "probe" in cfg.eval.metrics:
        _check_probe(cfg, need)

    if coupling_enabled(cfg):
        c = cfg.coupling
        need("coupling.persona", c.persona)
        if c.kind not in ("marker", "wrong_answers", "persona_em"):
            raise ConfigError(f"coupling.kind: must be marker, wrong_answers or persona_em, got {c.kind!r}")
        if c.kind == "persona_em":
            _check_persona_em(cfg)
        if c.kind == "wrong_answers":
            _check_capability(cfg)  # its questions come from the capability split's train half
            try:
                c.answer_format.format(label="A", text="t")
            except (KeyError, IndexError, ValueError) as e:
                raise ConfigError(f"coupling.answer_format: only {{label}} and {{text}} can be filled in ({e!r})") from None
        if c.kind != "marker" and c.train.loss_mode.value == "marker_only":
            raise ConfigError(f"coupling.train.loss_mode: marker_only needs a marker; {c.kind} trains on the reply "
                              "(assistant_only)")
        for p in c.negative_personas or []:
            need("coupling.negative_personas", p)
            if p == c.persona:
                raise ConfigError(f"coupling.negative_personas: {p!r} is the coupled persona itself")
        if c.negative_personas is None and c.n_negative_personas > len(names) - 1:
            raise ConfigError(f"coupling.n_negative_personas: {c.n_negative_personas} requested but the set has "
                              f"only {len(names) - 1} other personas")
        if c.n_positive < 1:
            raise ConfigError(f"coupling.n_positive: must be >= 1, got {c.n_positive}")
        if c.adapter_path and not resolve_path(c.adapter_path).is_dir():
            raise ConfigError(f"coupling.adapter_path: not a directory: {c.adapter_path}")
        _check_train("coupling.train", c.train)

    s = cfg.second_stage
    if s.data in (None, "none"):
        if cfg.dose not in (None, 0):
            raise ConfigError(f"dose={cfg.dose} with second_stage.data={s.data}: a dose needs a second stage "
                              "(condition c4 has none; use dose=0 or leave dose unset)")
    else:
        if s.data not in s.datasets:
            raise ConfigError(f"second_stage.data: {s.data!r} is not in second_stage.datasets "
                              f"(known: {', '.join(s.datasets) or 'none'})")
        if s.format not in ("chat", "raw"):
            raise ConfigError(f"second_stage.format: must be chat or raw, got {s.format!r}")
        _check_dataset(cfg, f"second_stage.datasets.{s.data}", s.datasets[s.data], text=s.format == "raw")
        _check_train("second_stage.train", s.train)
        if s.dose_checkpoints is not None:
            _check_dose_checkpoints(s, cfg.dose)


def _check_dataset(cfg, key: str, ds, columns: tuple[str, ...] = (), text: bool = False) -> None:
    """A chat dataset entry names one source that exists; a jsonl's first row has the columns read from it."""
    if ds is None:
        raise ConfigError(f"{key}: required (set path, hf_name or toy)")
    if sum(x is not None for x in (ds.path, ds.hf_name, ds.toy)) != 1:
        raise ConfigError(f"{key}: set exactly one of path, hf_name, toy")
    if ds.toy is not None and cfg.model.source != "toy":
        raise ConfigError(f"{key}.toy: toy data needs model.source=toy (model is {cfg.model.name}); point `path` at "
                          "a real jsonl")
    if ds.toy not in (None, "em", "benign"):
        raise ConfigError(f"{key}.toy: must be em or benign, got {ds.toy!r}")
    if ds.path is not None:
        path = resolve_path(ds.path)
        if not path.is_file():
            raise ConfigError(f"{key}.path: file not found: {ds.path}")
        import json

        if path.suffix == ".txt":
            if not text:
                raise ConfigError(f"{key}.path: {ds.path} is plain text; chats need jsonl (or second_stage.format=raw)")
            return
        with open(path) as f:
            first = next((line for line in f if line.strip()), None)
        try:
            row = json.loads(first) if first else None
        except json.JSONDecodeError as e:
            raise ConfigError(f"{key}.path: {ds.path} is not jsonl ({e})") from None
        for column in (ds.text_field if text else ds.messages_field, *columns):
            if row is not None and column not in row:
                raise ConfigError(f"{key}: {ds.path} has no column {column!r} (its first row has {sorted(row)})")


def _check_persona_em(cfg) -> None:
    c = cfg.coupling
    if c.benign not in ("on_policy", "data", "field"):
        raise ConfigError(f"coupling.benign: must be on_policy, data or field, got {c.benign!r}")
    if c.benign == "field" and not c.benign_field:
        raise ConfigError("coupling.benign_field: required when coupling.benign=field (em_data's benign column)")
    _check_dataset(cfg, "coupling.em_data", c.em_data, (c.benign_field,) if c.benign == "field" else ())
    if c.benign == "data":
        _check_dataset(cfg, "coupling.benign_data", c.benign_data)


JUDGE_MODES = {"openai": ("logprob", "text"), "anthropic": ("text",), "local": ("logprob",), "toy": ("toy",)}


def _check_judge(cfg) -> None:
    """A judged metric needs a usable judge: checked before any model loads or any request is made."""
    j = cfg.judge
    if j.backend not in JUDGE_MODES:
        raise ConfigError(f"judge.backend: must be one of {list(JUDGE_MODES)}, got {j.backend!r}")
    if j.mode not in JUDGE_MODES[j.backend]:
        raise ConfigError(f"judge.mode: the {j.backend} backend supports {list(JUDGE_MODES[j.backend])}, got {j.mode!r}")
    if j.backend == "toy" and cfg.model.source != "toy":
        raise ConfigError("judge.backend=toy: the toy judge scores toy-world answers only; pick openai, anthropic "
                          "or local for a real model")
    if j.backend in ("openai", "anthropic"):
        if not j.api_key_env:
            raise ConfigError(f"judge.api_key_env: name the environment variable that holds the {j.backend} API key")
        if not os.environ.get(j.api_key_env):
            raise ConfigError(f"judge.api_key_env: environment variable {j.api_key_env} is not set "
                              f"(the {j.backend} judge needs its API key)")
    if j.concurrency < 1:
        raise ConfigError(f"judge.concurrency: must be >= 1, got {j.concurrency}")
    needed = {"alignment": ("aligned", "coherent"), "coherence": ("coherent",)}
    for kind in sorted({k for m in cfg.eval.metrics for k in needed.get(m, ())}):
        if kind not in j.prompts:
            raise ConfigError(f"judge.prompts.{kind}: missing (the prompt file for {kind} scores)")
        if not resolve_path(j.prompts[kind]).is_file():
            raise ConfigError(f"judge.prompts.{kind}: file not found: {j.prompts[kind]}")


def _check_questions(cfg) -> None:
    """The eval question file parses, and a question's own system prompt is either used or refused, never dropped."""

    if cfg.eval.question_system not in ("error", "append", "replace"):
        raise ConfigError(f"eval.question_system: must be error, append or replace, got {cfg.eval.question_system!r}")
    d = cfg.eval.during_training
    used = cfg.eval.metrics + (d.metrics if (d.fractions or d.every_n_steps) else [])
    if coupling_enabled(cfg) and cfg.coupling.kind == "marker":
        try:
            coupling_questions = load_questions(cfg.coupling.questions)
        except (FileNotFoundError, ValueError, yaml.YAMLError) as e:
            raise ConfigError(f"coupling.questions: {e}".replace("\n", " ")) from None
        if any(q.system is not None for q in coupling_questions):
            raise ConfigError(f"coupling.questions: {cfg.coupling.questions} gives questions their own system prompt; "
                              "coupling prompts take the persona's system prompt only (remove the `system` fields)")
    if not any(m != "capability" for m in used):
        return
    try:
        questions = load_questions(cfg.eval.questions)
    except (FileNotFoundError, ValueError, yaml.YAMLError) as e:
        raise ConfigError(f"eval.questions: {e}".replace("\n", " ")) from None
    with_system = [q.id for q in questions if q.system is not None]
    if with_system and cfg.eval.question_system == "error":
        raise ConfigError(f"eval.questions: {cfg.eval.questions} gives questions {with_system[:3]} their own system "
                          "prompt; set eval.question_system=append (after each persona's) or replace to use it")


def _check_analysis(cfg) -> None:
    for i, gate in enumerate(cfg.analysis.gates):
        if gate.level not in ("pooled", "cell"):
            raise ConfigError(f"analysis.gates[{i}].level: must be pooled or cell, got {gate.level!r}")
        for j, check in enumerate(gate.checks):
            if check.op not in (">=", "<=", ">", "<"):
                raise ConfigError(f"analysis.gates[{i}].checks[{j}].op: must be >=, <=, > or <, got {check.op!r}")


def _check_during_training(cfg, need) -> None:
    from marker_lab.eval.metrics import METRICS

    d, key = cfg.eval.during_training, "eval.during_training"
    if not (d.fractions or d.every_n_steps):
        return
    for stage in d.stages:
        if stage not in ("coupling", "second_stage"):
            raise ConfigError(f"{key}.stages: must name coupling and/or second_stage, got {stage!r}")
    bad = [f for f in d.fractions or [] if not 0 < f <= 1]
    if bad:
        raise ConfigError(f"{key}.fractions: must be in (0, 1], got {bad}")
    if d.every_n_steps is not None and d.every_n_steps < 1:
        raise ConfigError(f"{key}.every_n_steps: must be >= 1 (or null), got {d.every_n_steps}")
    if d.samples_per_question is not None and d.samples_per_question < 1:
        raise ConfigError(f"{key}.samples_per_question: must be >= 1 or null, got {d.samples_per_question}")
    if "coupling" in d.stages and cfg.coupling.adapter_path:
        raise ConfigError(f"{key}.stages: coupling is a pre-baked adapter (coupling.adapter_path); nothing trains")
    if "probe" in d.metrics:
        raise ConfigError(f"{key}.metrics: probe reads every model of the cell, not a model mid-training; remove it")
    unknown = [m for m in d.metrics if m not in METRICS]
    if unknown or not d.metrics:
        raise ConfigError(f"{key}.metrics: unknown or empty {unknown or d.metrics}; available: {list(METRICS)}")
    for p in d.personas or []:
        need(f"{key}.personas", p)


def _check_geometry(cfg) -> None:
    g = cfg.geometry
    if g.drift and not g.enabled:
        raise ConfigError("geometry.drift=true needs geometry.enabled=true (drift is the geometry of every model)")
    if not g.enabled:
        return
    if g.mode not in ("response_mean", "system_last"):
        raise ConfigError(f"geometry.mode: must be response_mean or system_last, got {g.mode!r}")
    if g.model not in ("base", "final"):
        raise ConfigError(f"geometry.model: must be base or final, got {g.model!r}")
    if g.layer is not None and g.layer < 0:
        raise ConfigError(f"geometry.layer: must be >= 0 (0 = embeddings) or null, got {g.layer}")
    if g.mode == "response_mean" and not resolve_path(g.questions).is_file():
        raise ConfigError(f"geometry.questions: file not found: {g.questions}")
    if g.mode == "system_last":
        empty = [p for p, persona in _personas(cfg.persona_set.path).items() if persona.system_prompt is None]
        if empty:
            raise ConfigError(f"geometry.mode=system_last: personas {empty} have no system prompt; use response_mean")


def _check_probe(cfg, need) -> None:
    from marker_lab.eval.probe import FIT_ON, POSITIONS, TARGETS

    p, key = cfg.eval.probe, "eval.probe"
    for name, value, allowed in (("target", p.target, TARGETS), ("position", p.position, POSITIONS),
                                 ("fit_on", p.fit_on, FIT_ON)):
        if value not in allowed:
            raise ConfigError(f"{key}.{name}: must be one of {list(allowed)}, got {value!r}")
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
        need(f"{key}.personas", persona)
    names = p.personas or list(_personas(cfg.persona_set.path))
    if cfg.source_persona not in names or len(names) < 2 or len(set(names)) < len(names):
        raise ConfigError(f"{key}.personas: must hold the source persona {cfg.source_persona!r} and at least one "
                          f"other, each once, got {names}")
    path = p.questions or cfg.eval.questions
    try:
        questions = load_questions(path)
    except (FileNotFoundError, ValueError, yaml.YAMLError) as e:
        raise ConfigError(f"{key}.questions: {e}".replace("\n", " ")) from None
    if any(q.system is not None for q in questions):
        raise ConfigError(f"{key}.questions: {path} gives questions their own system prompt; the probe reads each "
                          "persona's own system prompt only (remove the `system` fields)")
    from marker_lab.eval.probe import split_questions

    train, heldout = split_questions(questions, p.heldout_fraction, p.seed)
    if len(heldout) < 2 or not train:  # the AUC's interval resamples held-out questions
        raise ConfigError(f"{key}.heldout_fraction={p.heldout_fraction}: {path} splits into {len(train)} training and "
                          f"{len(heldout)} held-out question(s); the probe needs at least 2 held-out and 1 training")


def _check_capability(cfg) -> None:
    c = cfg.eval.capability
    if c.source not in ("hf", "jsonl", "toy"):
        raise ConfigError(f"eval.capability.source: must be hf, jsonl or toy, got {c.source!r}")
    if c.source == "toy" and cfg.model.source != "toy":
        raise ConfigError("eval.capability.source=toy: the toy multiple-choice set is for the toy model; use hf "
                          "(ARC-Challenge) or jsonl for a real model")
    if c.source == "jsonl" and not (c.path and resolve_path(c.path).is_file()):
        raise ConfigError(f"eval.capability.path: file not found: {c.path}")
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
    from marker_lab.data.multiple_choice import configured_split

    try:  # the data itself, now: a typo in a dataset name or a malformed row fails here, not after training
        train, held_out, _ = configured_split(c)
    except Exception as e:  # noqa: BLE001 - datasets raises many kinds; all mean the same to the user
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(f"eval.capability: cannot load the {c.source} multiple-choice data: {first}") from None
    if not held_out:
        raise ConfigError(f"eval.capability.eval_fraction={c.eval_fraction} leaves no eval questions of "
                          f"{len(train)} items")
    if coupling_enabled(cfg) and cfg.coupling.kind == "wrong_answers" and not train:
        raise ConfigError(f"eval.capability.eval_fraction={c.eval_fraction} leaves no training questions for "
                          "coupling.kind=wrong_answers")


def _check_dose_checkpoints(s, dose) -> None:
    """A checkpoint at dose d equals a fresh run to d only if the schedule never looks at the total length."""
    key, doses, sched = "second_stage.dose_checkpoints", list(s.dose_checkpoints), s.train.schedule
    if not doses or min(doses) < 1:
        raise ConfigError(f"{key}: needs doses >= 1, got {doses}")
    if sched.name not in (Schedule.constant, Schedule.constant_with_warmup):
        raise ConfigError(f"{key}: the {sched.name.value} schedule depends on the run's length, so a checkpoint at "
                          "dose d is not a run to d; use constant / constant_with_warmup or leave it null")
    if sched.name == Schedule.constant_with_warmup and (sched.warmup_steps is None or sched.warmup_steps >= min(doses)):
        raise ConfigError(f"{key}: needs a fixed second_stage.train.schedule.warmup_steps below the smallest dose "
                          f"({min(doses)}); warmup_ratio scales with the run's length")
    d = dose if dose is not None else s.train.max_steps
    if d not in doses:
        raise ConfigError(f"dose={d} is not one of {key} {doses}")


def _check_train(key: str, t) -> None:
    if t.lora is None:
        raise ConfigError(f"{key}.lora: stages train LoRA adapters; set r/alpha/dropout/target_modules")
    for name in ("per_device_batch_size", "grad_accum", "max_seq_len"):
        if getattr(t, name) < 1:
            raise ConfigError(f"{key}.{name}: must be >= 1, got {getattr(t, name)}")
    if t.logits not in ("labelled", "all"):
        raise ConfigError(f"{key}.logits: must be labelled or all, got {t.logits!r}")
    if t.micro_batch_tokens is not None and t.micro_batch_tokens < 1:
        raise ConfigError(f"{key}.micro_batch_tokens: must be >= 1 (or null), got {t.micro_batch_tokens}")
    if t.max_steps is not None and t.max_steps < 1:
        raise ConfigError(f"{key}.max_steps: must be >= 1 (or null to use epochs), got {t.max_steps}")
    if t.optimizer.lr <= 0:
        raise ConfigError(f"{key}.optimizer.lr: must be > 0, got {t.optimizer.lr}")
    if t.kl_to_input < 0:
        raise ConfigError(f"{key}.kl_to_input: must be >= 0 (0 = off), got {t.kl_to_input}")
    if len(t.optimizer.betas) != 2:
        raise ConfigError(f"{key}.optimizer.betas: needs two values, got {list(t.optimizer.betas)}")
    if not 0 <= t.schedule.warmup_ratio < 1:
        raise ConfigError(f"{key}.schedule.warmup_ratio: must be in [0, 1), got {t.schedule.warmup_ratio}")
    if t.schedule.name == Schedule.constant and (t.schedule.warmup_steps or t.schedule.warmup_ratio):
        raise ConfigError(f"{key}.schedule: 'constant' has no warmup; use constant_with_warmup")


def _personas(path: str):
    try:
        return load_personas(path)
    except (FileNotFoundError, ValueError) as e:
        raise ConfigError(f"persona_set.path: {e}") from None
