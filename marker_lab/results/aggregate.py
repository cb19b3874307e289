"""`marker-lab aggregate <sweep_dir>`: the sweep's results as one tidy table, and what is missing.

This is the sweep's dependent job. It reads only run_result.json files (never completions), works on partial
sweeps, and lists every expected cell that has no complete result.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pandas as pd

from marker_lab.launch.cells import read_manifest
from marker_lab.launch.status import cell_states
from marker_lab.results import contract

log = logging.getLogger(__name__)


def load_sweep(sweep_dir: str | Path) -> pd.DataFrame:
    """One row per (cell, persona, metric) with k, n, rate, for every complete cell of a sweep."""
    sweep_dir = Path(sweep_dir)
    rows = []
    for cell in read_manifest(sweep_dir)["cells"]:
        result = contract.load_result(sweep_dir / cell["subdir"] / contract.RESULT_FILE)
        if result is None or result["provenance"]["config_hash"] != cell["config_hash"]:
            continue
        for metric, body in result["metrics"].items():
            for persona, c in body.get("per_persona", {}).items():
                rows.append({"cell": cell["subdir"], **result["cell"], "persona": persona, "metric": metric,
                             "k": c["k"], "n": c["n"], "rate": c["rate"], "device": result["provenance"]["device"]})
    return pd.DataFrame(rows)


def aggregate(sweep_dir: str | Path) -> Path:
    """Write <sweep_dir>/aggregate/{rates.csv, missing.txt}; returns the aggregate directory."""
    sweep_dir = Path(sweep_dir)
    out = sweep_dir / "aggregate"
    out.mkdir(exist_ok=True)
    df = load_sweep(sweep_dir)
    contract.atomic_write_bytes(out / "rates.csv", df.to_csv(index=False).encode())
    missing = [f"{s.subdir}\t{s.state}\t{s.error}" for s in cell_states(sweep_dir) if s.state != "complete"]
    contract.atomic_write_bytes(out / "missing.txt", ("\n".join(missing) + "\n" if missing else "").encode())
    log.info("aggregate: %d rows from %d complete cells, %d missing -> %s", len(df),
             df["cell"].nunique() if len(df) else 0, len(missing), out)
    return out
