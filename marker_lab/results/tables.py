"""Helpers every table of a sweep shares: the k/n readouts of a result, and row selection by cell keys."""

from __future__ import annotations

import numpy as np
import pandas as pd


def rate_entries(metrics: dict):
    """(metric, persona, {k, n, rate}) for every k-of-n readout of a result: the marker, and the misaligned share
    under each rule of the alignment metric (as metric "misaligned: <rule>")."""
    for metric, body in metrics.items():
        for persona, c in body.get("per_persona", {}).items():
            if "k" in c:
                yield metric, persona, c
            for rule, share in c.get("misaligned", {}).items():
                if share["n"]:
                    yield f"misaligned: {rule}", persona, share


def select_rows(df: pd.DataFrame, where: dict) -> pd.DataFrame:
    """The rows whose cell keys equal `where`'s values (compared as text: 1 and "1" match)."""
    mask = np.ones(len(df), dtype=bool)
    for key, value in where.items():
        col = df[key]
        mask &= (col.astype(str) == str(value)).to_numpy()
    return df[mask]


def persona_rows(df: pd.DataFrame, persona: str) -> pd.DataFrame:
    """A persona's rows: by role for `source` / `assistant`, else by name."""
    if persona in ("source", "assistant"):
        return df[df["role"] == persona]
    return df[df["persona"] == persona]
