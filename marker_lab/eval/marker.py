"""The marker readout: does a completion carry the marker? Per persona: k hits of n completions."""

from __future__ import annotations

import re

from marker_lab.config.schema import MarkerConfig, Matcher


def make_matcher(cfg: MarkerConfig):
    """A predicate completion -> bool. substring_ci is the write-ups' `"[zlt]" in completion.lower()`:
    the marker counts anywhere in the completion, not only where coupling put it."""
    if cfg.matcher == Matcher.substring_ci:
        needle = cfg.text.lower()
        return lambda s: needle in s.lower()
    if cfg.matcher == Matcher.substring:
        return lambda s: cfg.text in s
    pattern = re.compile(cfg.pattern)  # checked at start-up (preflight.check_marker): set, compiles, matches text
    return lambda s: pattern.search(s) is not None


def marker_hits(rows: list[dict], cfg: MarkerConfig) -> list[bool]:
    """Whether each completion row carries the marker."""
    hit = make_matcher(cfg)
    return [bool(hit(row["completion"])) for row in rows]


def marker_metric(rows: list[dict], cfg: MarkerConfig) -> dict:
    """`rows` are completion records with 'persona' and 'completion' (not changed): per persona, k of n carry it."""
    per: dict[str, dict] = {}
    for row, hit in zip(rows, marker_hits(rows, cfg)):
        cell = per.setdefault(row["persona"], {"k": 0, "n": 0})
        cell["k"] += hit
        cell["n"] += 1
    for cell in per.values():
        cell["rate"] = cell["k"] / cell["n"]
    out = {"marker": cfg.text, "matcher": cfg.matcher.value, "per_persona": per}
    if cfg.matcher == Matcher.regex:
        out["pattern"] = cfg.pattern
    return out
