"""The cells of a sweep: composed and validated before anything is submitted, listed in a manifest, and
checked against results already in the sweep directory so a rerun only runs what is missing.

A sweep directory looks like:

    <sweep_dir>/manifest.json          every expected cell (written before any starts)
    <sweep_dir>/<override dirname>/    one cell: run_result.json, cell_status.json, completions, log
    <sweep_dir>/.submitit/             submitit's job files and logs
    <sweep_dir>/aggregate/             what `marker-lab aggregate` makes
"""

from __future__ import annotations

import copy
import json
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

from omegaconf import DictConfig, OmegaConf, open_dict

from marker_lab.results import contract

MANIFEST = "manifest.json"


@dataclass
class CellPlan:
    index: int  # position in the sweep
    overrides: list[str]  # the cell's Hydra overrides
    subdir: str  # its directory under the sweep dir (named from its overrides)
    config_hash: str  # what a complete result must carry to count as this cell
    complete: bool = False  # a matching result is already there


class SweepConfigError(ValueError):
    """One or more cells of a sweep cannot run; the message has a line per bad cell."""


def plan_cells(config_loader, config: DictConfig, job_overrides: Sequence[Sequence[str]],
               initial_index: int = 0) -> list[CellPlan]:
    """Compose and validate every cell (no model is loaded) and find the ones already complete."""
    from hydra.core.hydra_config import HydraConfig

    from marker_lab.config.validate import validate

    plans, errors = [], []
    sweep_dir = Path(str(config.hydra.sweep.dir))
    saved_hydra = HydraConfig.instance().cfg
    try:
        for i, overrides in enumerate(job_overrides):
            cell_cfg = config_loader.load_sweep_config(config, list(overrides))
            HydraConfig.instance().set_config(cell_cfg)  # lets ${hydra:...} resolve as in the job
            subdir = str(OmegaConf.select(cell_cfg, "hydra.sweep.subdir"))
            task_cfg = copy.deepcopy(cell_cfg)
            with open_dict(task_cfg):
                del task_cfg["hydra"]
                task_cfg.output_dir = str(sweep_dir / subdir)
            try:
                validate(OmegaConf.to_object(task_cfg))
                resolved = OmegaConf.to_container(task_cfg, resolve=True, enum_to_str=True)
            except Exception as e:  # ConfigError, or a composition error from omegaconf
                errors.append(f"cell {' '.join(overrides)}: {' '.join(str(e).split())}")
                continue
            plan = CellPlan(initial_index + i, list(overrides), subdir, contract.config_hash(resolved))
            existing = contract.load_result(sweep_dir / subdir / contract.RESULT_FILE)
            plan.complete = bool(existing and existing["provenance"]["config_hash"] == plan.config_hash)
            plans.append(plan)
    finally:
        HydraConfig.instance().cfg = saved_hydra
    if errors:
        raise SweepConfigError(f"{len(errors)} of {len(job_overrides)} cells cannot run; nothing was submitted:\n"
                               + "\n".join(errors))
    return plans


def write_manifest(sweep_dir: Path, plans: list[CellPlan], launcher: str) -> None:
    """Every expected cell, written before any starts. Cells of earlier commands into the same sweep directory
    stay listed (a sweep accumulates); a cell planned again is updated."""
    path = Path(sweep_dir) / MANIFEST
    cells = {c["subdir"]: c for c in (read_manifest(sweep_dir)["cells"] if path.is_file() else [])}
    cells.update({p.subdir: asdict(p) for p in plans})
    commands = (read_manifest(sweep_dir).get("commands", []) if path.is_file() else []) + [" ".join(sys.argv)]
    contract.write_json_atomic(path, {"schema_version": 1, "updated": time.time(), "launcher": launcher,
                                      "commands": commands, "cells": list(cells.values())})


def read_manifest(sweep_dir: Path) -> dict:
    """The sweep's manifest; a directory without one (e.g. outputs/runs/) lists the results found under it."""
    sweep_dir = Path(sweep_dir)
    path = sweep_dir / MANIFEST
    if path.is_file():
        return json.loads(path.read_text())
    if not sweep_dir.is_dir():
        raise FileNotFoundError(f"not a directory: {sweep_dir}")
    cells = []
    for result_path in sorted(sweep_dir.rglob(contract.RESULT_FILE)):
        result = contract.load_result(result_path)
        if result is not None:
            cells.append({"index": len(cells), "overrides": [], "subdir": str(result_path.parent.relative_to(sweep_dir)),
                          "config_hash": result["provenance"]["config_hash"], "complete": True})
    if not cells:
        raise FileNotFoundError(f"no {MANIFEST} and no complete {contract.RESULT_FILE} under {sweep_dir}")
    return {"schema_version": 1, "cells": cells, "found_without_manifest": True}
