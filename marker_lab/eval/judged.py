"""Judged metrics: alignment and coherence of each completion, scored 0-100 by the configured judge.

Every (judge, prompt, question, answer) is judged once, ever: scores live in the judge cache
(`<cache_dir>/judge_cache.sqlite`), shared by cells and sweeps, written as they arrive. The scores come back per
row as `aligned` / `coherent` (None: the judge gave no score, e.g. CODE or REFUSAL); eval.metrics.score puts them
on the completion rows it returns, saved with the completions.
"""

from __future__ import annotations

import hashlib
import logging
import statistics
from pathlib import Path

from tqdm.auto import tqdm

from marker_lab.config.schema import COMPARE, JUDGED_PROMPTS
from marker_lab.core.files import resolve_path
from marker_lab.eval.judge.backends import JudgeItem
from marker_lab.eval.judge.cache import JudgeCache, judgement_key
from marker_lab.eval.judge.registry import JUDGES

log = logging.getLogger(__name__)

# metric -> the judge prompts it needs (the misaligned share needs coherence too)
CHUNK = 64  # judgements per backend call; each chunk is cached before the next starts


def make_judge(cfg, stage_cache, device):
    """The configured judge backend (API clients check their key here, before any judging)."""
    return JUDGES.get(cfg.judge.backend).make(cfg.judge, stage_cache, device)


def prompt_template(cfg, kind: str) -> tuple[str, str]:
    """(template text, its md5) for judge prompt `kind`; the hash versions every cached judgement."""
    text = resolve_path(cfg.judge.prompts[kind]).read_text()
    return text, hashlib.md5(text.encode()).hexdigest()


def judge_rows(cfg, rows: list[dict], judge, metrics: list[str] | None = None) -> tuple[dict, dict[str, list]]:
    """Score every row for every prompt the requested metrics need. Returns the judge's identity (for provenance)
    and, per prompt kind (aligned, coherent), one score per row (None: judged, no score); rows are not changed."""
    kinds = sorted({k for m in (metrics or cfg.eval.metrics) for k in JUDGED_PROMPTS.get(m, ())})
    cache = JudgeCache(Path(cfg.cache_dir).expanduser() / "judge_cache.sqlite")
    identity = {**judge.identity, "prompt_md5": {}}
    by_kind: dict[str, list] = {}
    try:
        for kind in kinds:
            template, phash = prompt_template(cfg, kind)
            identity["prompt_md5"][kind] = phash
            keys = [judgement_key(judge.identity, phash, r["question"], r["completion"]) for r in rows]
            unique = list(dict.fromkeys(keys))
            scores = cache.get_many(unique)
            todo = [k for k in unique if k not in scores]
            first = {k: r for k, r in zip(keys, rows)}
            log.info("judge %s: %s for %d answers (%d cached, %d to judge)", judge.identity["backend"], kind,
                     len(unique), len(unique) - len(todo), len(todo))
            with tqdm(total=len(todo), desc=f"judge {kind}", unit="answer", dynamic_ncols=True) as bar:
                for i in range(0, len(todo), CHUNK):
                    chunk = todo[i:i + CHUNK]
                    items = [JudgeItem(kind, first[k]["question"], first[k]["completion"],
                                       fill(template, first[k]["question"], first[k]["completion"])) for k in chunk]
                    for k, (score, reply) in zip(chunk, judge.score_many(items)):
                        cache.put(k, score, reply, judge.identity)
                        scores[k] = score
                    bar.update(len(chunk))
            by_kind[kind] = [scores[k] for k in keys]
    finally:
        cache.close()
    return identity, by_kind


def fill(template: str, question: str, answer: str) -> str:
    # not str.format: answers contain braces
    return template.replace("{question}", question).replace("{answer}", answer)


def _summary(values: list[float | None]) -> dict:
    scored = [v for v in values if v is not None]
    return {"n": len(values), "n_scored": len(scored), "n_none": len(values) - len(scored),
            "mean": statistics.fmean(scored) if scored else None,
            "sd": statistics.stdev(scored) if len(scored) > 1 else None}


def _condition(text: str):
    for op in (">=", "<=", ">", "<"):  # two-character operators first
        if text.startswith(op):
            return lambda v, f=COMPARE[op], x=float(text[len(op):]): f(v, x)
    raise ValueError(f"eval.misaligned: condition {text!r} must start with <, <=, > or >=")


def misaligned_share(rows: list[dict], rule) -> dict:
    """k/n misaligned under `rule` (rows with both scores only)."""
    aligned_bad, coherent_ok = _condition(rule.aligned), _condition(rule.coherent)
    both = [r for r in rows if r.get("aligned") is not None and r.get("coherent") is not None]
    pool = both if rule.denominator == "all" else [r for r in both if coherent_ok(r["coherent"])]
    k = sum(1 for r in pool if aligned_bad(r["aligned"]) and coherent_ok(r["coherent"]))
    return {"k": k, "n": len(pool), "rate": k / len(pool) if pool else None}


def _by_persona(rows: list[dict]) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for r in rows:
        out.setdefault(r["persona"], []).append(r)
    return out


def alignment_metric(rows: list[dict], rules) -> dict:
    per = {p: {**_summary([r["aligned"] for r in rs]),
               "misaligned": {rule.name: misaligned_share(rs, rule) for rule in rules}}
           for p, rs in _by_persona(rows).items()}
    return {"scale": "0-100, higher = more aligned",
            "rules": [{"name": r.name, "aligned": r.aligned, "coherent": r.coherent, "denominator": r.denominator}
                      for r in rules],
            "per_persona": per}


def coherence_metric(rows: list[dict]) -> dict:
    return {"scale": "0-100, higher = more coherent",
            "per_persona": {p: _summary([r["coherent"] for r in rs]) for p, rs in _by_persona(rows).items()}}
