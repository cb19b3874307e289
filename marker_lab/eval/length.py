"""Completion length per persona: the audit 000 lists as missing (shorter answers give a marker fewer chances)."""

from __future__ import annotations

import statistics


def length_metric(rows: list[dict], max_tokens: int) -> dict:
    """`rows` carry 'persona', 'completion' and 'n_tokens' (new tokens, from the engine)."""
    by_persona: dict[str, list[dict]] = {}
    for row in rows:
        by_persona.setdefault(row["persona"], []).append(row)
    per = {}
    for persona, rs in by_persona.items():
        tokens = [r["n_tokens"] for r in rs]
        chars = [len(r["completion"]) for r in rs]
        per[persona] = {
            "n": len(rs),
            "tokens_mean": statistics.fmean(tokens), "tokens_median": statistics.median(tokens),
            "chars_mean": statistics.fmean(chars), "chars_median": statistics.median(chars),
            "k_at_max_tokens": sum(t >= max_tokens for t in tokens),  # cut off by max_tokens, not ended by the model
            "share_at_max_tokens": sum(t >= max_tokens for t in tokens) / len(rs),
        }
    return {"max_tokens": max_tokens, "per_persona": per}
