"""The result contract: `run_result.json`, a typed, versioned `RunResult`, written atomically and only when a cell
is complete.

    {"schema_version": 2, "status": "complete",
     "cell": {experiment, condition, order, seed, dose, source_persona, coupled_persona, second_stage},
     "metrics": {"marker": {"per_persona": {name: {"k", "n", "rate"}}, "marker", "matcher"}, ...},
     "provenance": {config_hash, resolved_config, git_commit, versions, inputs, data_md5, adapters, device,
                    base_model, final_model, stage_cache_keys, judge, stages},
     "timing": {phase: seconds, "phase.part": seconds}, and optionally metrics_by_step, metrics_baseline,
     geometry, drift}

`timing`'s plain keys are the cell's phases (setup, load, baseline, each stage, readouts, eval, write), which add
up to the cell's time (`cell_seconds`); a dotted key is a part of its phase (`second_stage.train`, `eval.shared`,
`readouts.probe`) and is not added again.

`provenance.inputs` holds the path and checksum of every file the cell read. `is_current(result, config_hash)`
is the one answer to "does this result still stand for this cell": the same config hash, and every input file
unchanged. Run, resume, `marker-lab status` and aggregation all ask it. Readers get rates from here, never from
the completions.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from marker_lab.core import environment
from marker_lab.core.files import atomic_write_bytes, dir_checksum, file_checksum, write_json_atomic  # noqa: F401

SCHEMA_VERSION = 2  # 2: provenance.inputs (input checksums) and provenance.adapters
RESULT_FILE = "run_result.json"
STATUS_FILE = "cell_status.json"  # running / failed (with the error line) / complete: read by `marker-lab status`
COMPLETIONS_FILE = "completions.jsonl.gz"
PENDING_FILE = "pending_eval.json"  # engine_per=base: a trained cell waiting for its sweep's shared engine

# keys that say where things go or how results are read, not what is computed: left out of the config hash
_HASH_EXCLUDED = ("output_dir", "cache_dir", "device", "analysis", "engine_per")


@dataclass(frozen=True)
class CellKey:
    """What identifies a cell in tables: the write-ups' condition, seed, dose, ... Settled before any model loads
    (cell/plan.py), the same in the result, the sweep reader and every table."""
    experiment: str | None
    condition: str | None
    order: str  # forward | reverse
    seed: int
    dose: int  # the second stage's optimizer steps (0: no second stage)
    source_persona: str | None
    coupled_persona: str | None  # None: no coupling stage
    second_stage: str  # its data name with its variant ("em", "em (raw)"); "none"

    def as_dict(self) -> dict:
        return asdict(self)


CELL_KEYS = [f.name for f in fields(CellKey)]


@dataclass(frozen=True)
class Timing:
    """Seconds a cell took: its phases (setup, load, baseline, each stage, readouts, precompile_wait, eval, write),
    which add up to the cell's time (`total`), and parts of a phase ("second_stage.train", "eval.shared",
    "readouts.probe"), inside it and not added again. Written flat: {"phase": s, "phase.part": s}."""
    phases: dict[str, float]
    parts: dict[str, float] = field(default_factory=dict)

    def __post_init__(self):
        orphans = [k for k in self.parts if k.split(".")[0] not in self.phases]
        if any("." in k for k in self.phases) or orphans:
            raise ValueError(f"timing: parts {orphans} of no phase, or a dotted phase name in {list(self.phases)}")

    @property
    def total(self) -> float:
        return sum(self.phases.values())

    def to_json(self) -> dict:
        return {**self.phases, **self.parts}

    @classmethod
    def from_json(cls, flat: dict) -> "Timing":
        return cls({k: v for k, v in flat.items() if "." not in k}, {k: v for k, v in flat.items() if "." in k})


@dataclass
class TrainedRecord:
    """A cell whose stages, readouts and model metrics are done: everything its result holds but the sampled
    metrics, the judge's identity and the sampling time (cell/finish.py completes it into a RunResult)."""
    cell: CellKey
    metrics: dict  # metric name -> its readout (here: those read from the model)
    provenance: dict  # what produced it
    timing: Timing  # seconds per phase of the cell, and parts of a phase
    metrics_by_step: dict | None = None  # evals during training, per stage
    metrics_baseline: dict | None = None  # the base model's readout (eval.baseline)
    geometry: dict | None = None  # persona geometry (geometry.enabled)
    drift: dict | None = None  # persona geometry of every model (geometry.drift)

    @property
    def config_hash(self) -> str:
        return self.provenance["config_hash"]

    @property
    def resolved_config(self) -> dict:
        return self.provenance["resolved_config"]

    def to_json(self) -> dict:
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        out.update(cell=self.cell.as_dict(), timing=self.timing.to_json())
        return {k: v for k, v in out.items() if v is not None}

    @classmethod
    def from_json(cls, obj: dict):
        names = {f for f in cls.__dataclass_fields__}
        missing = [k for k in ("cell", "metrics", "provenance", "timing") if k not in obj]
        if missing:
            raise ValueError(f"a run result without {missing}")
        typed = {"cell": CellKey(**obj["cell"]), "timing": Timing.from_json(obj["timing"])}
        return cls(**{k: v for k, v in obj.items() if k in names and k not in typed}, **typed)


@dataclass
class RunResult(TrainedRecord):
    """One complete cell (see the module docstring for the fields' contents); made and written by cell/finish.py."""
    schema_version: int = SCHEMA_VERSION
    status: str = "complete"

    def to_json(self) -> dict:
        return {"schema_version": self.schema_version, "status": self.status, **super().to_json()}


def cell_seconds(result: TrainedRecord) -> float:
    """The cell's own time: its phases added up, each part of a phase ("eval.shared") counted once, inside it."""
    return result.timing.total


@dataclass
class ResultFile:
    """What a cell directory's run_result.json holds: a result, or why it holds none."""
    state: str  # missing | corrupt | old_schema | complete
    result: RunResult | None = None
    problem: str = ""  # for corrupt / old_schema: what is wrong


def read_result(path: Path) -> ResultFile:
    """Read a run_result.json without trusting it: a truncated or damaged file is `corrupt`, never a result."""
    try:
        obj = json.loads(Path(path).read_text())
    except FileNotFoundError:
        return ResultFile("missing")
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        return ResultFile("corrupt", problem=f"{path} is not valid JSON ({type(e).__name__}: truncated or damaged)")
    if not isinstance(obj, dict) or obj.get("status") != "complete":
        return ResultFile("corrupt", problem=f"{path} is not a complete result")
    if obj.get("schema_version") != SCHEMA_VERSION:
        return ResultFile("old_schema", problem=f"{path} has schema version {obj.get('schema_version')}, this "
                                                f"marker_lab writes {SCHEMA_VERSION}: rerun the cell")
    try:
        return ResultFile("complete", RunResult.from_json(obj))
    except (TypeError, ValueError) as e:
        return ResultFile("corrupt", problem=f"{path}: {e}")


def load_result(path: Path) -> RunResult | None:
    """A complete result, or None when the file is missing, damaged or of another schema."""
    return read_result(path).result


@dataclass
class AttachedAdapter:
    """A stage's adapter as the cell attached it (merged): enough to attach the same weights again elsewhere."""
    stage: str  # coupling | second_stage
    path: str  # the peft adapter directory in the stage cache
    key: str  # its cache key (with @steps for a dose checkpoint): part of the model's identity
    entry: str  # the cache entry holding it (verified against its build checksums before use)


@dataclass
class PendingEval:
    """A cell (engine_per=base) whose stages, readouts and model metrics are done and whose sampled eval waits for
    its sweep's shared engine (cell/shared.py). `partial` is the result without the sampled metrics; the shared
    engine attaches `last` to the model built from `base` + `before`, samples, scores, and writes the result."""
    partial: TrainedRecord  # everything but the sampled metrics, the judge's identity and the eval time
    base: str  # identity of the cell's base model (stage 0)
    before: list[AttachedAdapter]  # adapters merged into the base before the last stage
    last: AttachedAdapter | None  # the adapter the shared engine serves per cell (None: the cell has no stage)
    shared_base: str  # identity of base + before: cells with the same one (and engine settings) share an engine

    def to_json(self) -> dict:
        return {"schema_version": SCHEMA_VERSION, "partial": self.partial.to_json(), "base": self.base,
                "before": [asdict(a) for a in self.before], "last": asdict(self.last) if self.last else None,
                "shared_base": self.shared_base}

    @classmethod
    def from_json(cls, obj: dict) -> "PendingEval":
        if obj.get("schema_version") != SCHEMA_VERSION:
            raise ValueError(f"schema version {obj.get('schema_version')}, this marker_lab writes {SCHEMA_VERSION}")
        return cls(TrainedRecord.from_json(obj["partial"]), obj["base"], [AttachedAdapter(**a) for a in obj["before"]],
                   AttachedAdapter(**obj["last"]) if obj["last"] else None, obj["shared_base"])


def write_pending(out_dir: Path, pending: PendingEval) -> Path:
    path = Path(out_dir) / PENDING_FILE
    write_json_atomic(path, pending.to_json())
    return path


def load_pending(path: Path) -> PendingEval | None:
    """A trained cell's pending eval, or None when the file is missing or damaged (the cell then trains again:
    its stages are cached, so that is cheap)."""
    try:
        return PendingEval.from_json(json.loads(Path(path).read_text()))
    except (FileNotFoundError, json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, ValueError):
        return None


@dataclass(frozen=True)
class Currency:
    """Whether a result still stands for a cell, and if not, why."""
    current: bool
    reason: str = ""  # which input changed, or that the config differs
    unverified: tuple[str, ...] = ()  # inputs not found here (results read on another machine): not re-checked


def is_current(result: TrainedRecord, config_hash: str) -> Currency:
    """A result is current for a cell when it was made from the cell's config (same hash) and every input file
    it read still has the checksum it had then. Files are re-hashed by path (cheap: md5 of small files, memoised).
    An input that is not there at all (results copied to another machine) cannot be re-checked and does not make the
    result stale; running the cell again would stop at start-up on the missing file, so nothing is silently reused."""
    if result.config_hash != config_hash:
        return Currency(False, "config changed (the result is from another config)")
    missing = []
    for key, recorded in sorted((result.provenance.get("inputs") or {}).items()):
        path = Path(recorded["path"])
        if not path.exists():
            missing.append(key)
            continue
        now = dir_checksum(path) if path.is_dir() else file_checksum(path)
        if now != recorded["checksum"]:
            return Currency(False, f"input {key} changed since the result was made ({path})")
    return Currency(True, unverified=tuple(missing))


def config_hash(resolved: dict) -> str:
    """sha256 of the resolved config without location keys: equal hashes mean the same cell."""
    science = {k: v for k, v in resolved.items() if k not in _HASH_EXCLUDED}
    return hashlib.sha256(json.dumps(science, sort_keys=True, default=str).encode()).hexdigest()


def write_result(out_dir: Path, result: RunResult) -> Path:
    """The cell's run_result.json, atomically: readers see no result or the whole of this one (called by
    cell/finish.py only)."""
    path = Path(out_dir) / RESULT_FILE
    write_json_atomic(path, result.to_json())
    return path


def write_completions(path: Path, rows: list[dict]) -> None:
    data = "".join(json.dumps(r) + "\n" for r in rows).encode()
    atomic_write_bytes(path, gzip.compress(data, mtime=0))


def read_completions(path: Path) -> list[dict]:
    with gzip.open(path, "rt") as f:
        return [json.loads(line) for line in f if line.strip()]


def write_cell_status(out_dir: Path, state: str, error: str | None = None, phase: str | None = None) -> None:
    """Record what this cell's process is doing (and in which phase: load, coupling, eval, ...); a result only counts
    if run_result.json is complete."""
    import socket
    import time

    info = {"state": state, "pid": os.getpid(), "host": socket.gethostname(), "time": time.time(),
            "slurm_job_id": environment.slurm_job_id(), "cuda_visible_devices": environment.visible_devices()}
    if phase:
        info["phase"] = phase
    if error:
        info["error"] = " ".join(str(error).split())[:500]
    write_json_atomic(Path(out_dir) / STATUS_FILE, info)
