"""Question sets: the project's YAML files, and the question-file format peer emergent-misalignment evals use.

Project format: a `questions` list (or a bare list) of strings or of {id, text}.
Peer format: a YAML list of {id, paraphrases: [...], samples_per_paraphrase?, system?, type?, judge?, judge_prompts?}.
Each paraphrase becomes one question (id `<id>` or `<id>/<j>` when there are several). `samples_per_paraphrase` sets
its number of samples; `system` is kept on the question, and the eval honours or rejects it (`eval.question_system`),
never drops it. The file's own judge and judge_prompts are not used: the `judge` config group decides (logged).
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass

import yaml

from marker_lab.core.files import resolve_path

log = logging.getLogger(__name__)
PEER_IGNORED = ("judge", "judge_prompts")
FORMATS = ("question files are YAML: the project's (a `questions` list of strings or {id, text}) or the peer format "
           "(a list of {id, paraphrases: [...]})")  # fields of peer files whose job the `judge` config group does


@dataclass(frozen=True)
class Question:
    id: str
    text: str
    system: str | None = None  # a system prompt the question file asks for (peer format)
    samples: int | None = None  # samples the question file asks for (peer format); None = the eval's default


def load_questions(path: str) -> list[Question]:
    """Every question of a file in either format; a malformed entry is a one-line error naming file and entry."""
    real = resolve_path(path)
    if not real.is_file():
        raise FileNotFoundError(f"question file not found: {path} ({real})")
    if real.suffix not in (".yaml", ".yml"):
        raise ValueError(f"{path}: unknown question file format {real.suffix or '(no suffix)'!r}; {FORMATS}")
    try:
        data = yaml.safe_load(real.read_text())
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        raise ValueError(f"{path}{f' line {mark.line + 1}' if mark else ''}: not YAML ({getattr(e, 'problem', e)})") from None
    rows = data["questions"] if isinstance(data, dict) and "questions" in data else data
    if not isinstance(rows, list):
        raise ValueError(f"{path}: not a question file; {FORMATS}")
    out, ignored = [], set()
    for i, row in enumerate(rows):
        if isinstance(row, str):
            out.append(Question(f"q{i}", row))
        elif isinstance(row, dict) and "paraphrases" in row:
            out += _peer_questions(path, i, row)
            ignored.update(k for k in PEER_IGNORED if k in row)
        elif isinstance(row, dict) and "text" in row:
            out.append(Question(str(row.get("id", f"q{i}")), row["text"]))
        else:
            raise ValueError(f"{path}: question #{i} must be a string, have a 'text' field, or have 'paraphrases'")
    if not out:
        raise ValueError(f"{path}: no questions")
    if ignored:
        log.info("%s: the file's %s fields are not used; the `judge` config group scores answers", path, sorted(ignored))
    ids = [q.id for q in out]
    if len(set(ids)) != len(ids):
        dup = sorted({x for x in ids if ids.count(x) > 1})
        raise ValueError(f"{path}: question ids must be unique, repeated: {dup}")
    return out


def _peer_questions(path: str, i: int, row: dict) -> list[Question]:
    qid = str(row.get("id", f"q{i}"))
    kind = row.get("type", "free_form")
    if not str(kind).startswith("free_form"):
        raise ValueError(f"{path}: question {qid!r} has type {kind!r}; only free_form questions can be evaluated")
    paraphrases = row["paraphrases"]
    if not isinstance(paraphrases, list) or not paraphrases or not all(isinstance(p, str) for p in paraphrases):
        raise ValueError(f"{path}: question {qid!r}: paraphrases must be a non-empty list of strings")
    samples = row.get("samples_per_paraphrase")
    if samples is not None and (not isinstance(samples, int) or samples < 1):
        raise ValueError(f"{path}: question {qid!r}: samples_per_paraphrase must be a positive integer, got {samples!r}")
    system = row.get("system")
    if system is not None and not isinstance(system, str):
        raise ValueError(f"{path}: question {qid!r}: system must be a string, got {type(system).__name__}")
    return [Question(qid if len(paraphrases) == 1 else f"{qid}/{j}", text, system, samples)
            for j, text in enumerate(paraphrases)]


def samples_for(question: Question, eval_cfg) -> int:
    """Completions the eval samples for `question`: the file's samples_per_paraphrase when eval.file_samples is on,
    else eval.generation.samples_per_question."""
    if question.samples and eval_cfg.file_samples:
        return question.samples
    return eval_cfg.generation.samples_per_question


def with_question_system(persona_system: str | None, question: Question, mode: str) -> str | None:
    """The system prompt of a (persona, question) prompt, given the question's own `system` and `mode`.

    error: a question with a system prompt is a config error (the eval gives each persona its own system prompt);
    append: the persona's prompt, a blank line, the question's; replace: the question's alone (every persona then
    asks the same thing: only meaningful with a single no-system persona).
    """
    if question.system is None:
        return persona_system
    if mode == "append":
        return question.system if persona_system is None else f"{persona_system}\n\n{question.system}"
    if mode == "replace":
        return question.system
    raise ValueError(f"question {question.id!r} has its own system prompt; set eval.question_system to append or "
                     f"replace to use it (the eval otherwise gives each persona its own)")


def split_questions(questions: list[Question], heldout_fraction: float, seed: int) -> tuple[list[Question], list[Question]]:
    """(train, held-out): a seeded shuffle of question groups, the first `heldout_fraction` of them held out (at
    least one group each side). Paraphrases of one question (peer files' ids `<id>/<j>`) are one group, so no
    near-duplicate of a held-out question is trained on."""
    groups: dict[str, list[Question]] = {}
    for q in questions:
        groups.setdefault(q.id.split("/")[0], []).append(q)
    order = list(groups)
    random.Random(seed).shuffle(order)
    n_out = min(len(order) - 1, max(1, round(heldout_fraction * len(order))))
    return [q for g in order[n_out:] for q in groups[g]], [q for g in order[:n_out] for q in groups[g]]
