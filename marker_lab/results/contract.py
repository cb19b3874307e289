"""The result contract: `run_result.json` (schema below), written atomically and only when a cell is complete.

    {"schema_version": 1, "status": "complete",
     "cell": {experiment, condition, order, seed, dose, source_persona, coupled_persona, second_stage},
     "metrics": {"marker": {"per_persona": {name: {"k", "n", "rate"}}, "marker", "matcher"}},
     "provenance": {config_hash, resolved_config, git_commit, versions, data_md5, device, stage_cache_keys},
     "timing": {stage: seconds}}

Later metrics add keys under "metrics"; readers get rates from here, never from the completions.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import platform
import subprocess
import tempfile
from pathlib import Path

SCHEMA_VERSION = 1
RESULT_FILE = "run_result.json"
STATUS_FILE = "cell_status.json"  # running / failed (with the error line) / complete: read by `marker-lab status`
COMPLETIONS_FILE = "completions.jsonl.gz"
DISTANCES_FILE = "persona_distances.csv"  # the cell's persona cosine-distance matrix (geometry.enabled)

# keys that say where things go or how results are read, not what is computed: left out of the config hash
_HASH_EXCLUDED = ("output_dir", "cache_dir", "device", "analysis")


def config_hash(resolved: dict) -> str:
    """sha256 of the resolved config without location keys: equal hashes mean the same cell."""
    science = {k: v for k, v in resolved.items() if k not in _HASH_EXCLUDED}
    return hashlib.sha256(json.dumps(science, sort_keys=True, default=str).encode()).hexdigest()


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write to a temp file in the same directory, fsync, rename: readers see the old file or the new one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; results are meant to be shared
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json_atomic(path: Path, obj: dict) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode())


def write_completions(path: Path, rows: list[dict]) -> None:
    data = "".join(json.dumps(r) + "\n" for r in rows).encode()
    atomic_write_bytes(path, gzip.compress(data, mtime=0))


def read_completions(path: Path) -> list[dict]:
    with gzip.open(path, "rt") as f:
        return [json.loads(line) for line in f if line.strip()]


def load_result(path: Path) -> dict | None:
    """A complete result, or None when the file is missing or not a complete result of a known schema."""
    try:
        obj = json.loads(Path(path).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None
    if obj.get("schema_version") != SCHEMA_VERSION or obj.get("status") != "complete":
        return None
    return obj


def write_cell_status(out_dir: Path, state: str, error: str | None = None) -> None:
    """Record what this cell's process is doing; a result only counts if run_result.json is complete."""
    import socket
    import time

    info = {"state": state, "pid": os.getpid(), "host": socket.gethostname(), "time": time.time(),
            "slurm_job_id": os.environ.get("SLURM_JOB_ID"), "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES")}
    if error:
        info["error"] = " ".join(str(error).split())[:500]
    write_json_atomic(Path(out_dir) / STATUS_FILE, info)


def git_commit() -> str:
    """HEAD of the repository marker_lab runs from, with '-dirty' when it has uncommitted changes."""
    here = Path(__file__).resolve().parent
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here, capture_output=True,
                               text=True, check=True).stdout.strip()
        return sha + ("-dirty" if dirty else "")
    except (subprocess.CalledProcessError, FileNotFoundError):
        return "unknown"


def package_versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for pkg in ("marker-lab", "torch", "transformers", "peft", "hydra-core", "omegaconf", "datasets", "vllm"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            pass
    return out


def device_description(device) -> str:
    import torch

    if device.type == "cuda":
        idx = device.index if device.index is not None else torch.cuda.current_device()
        visible = os.environ.get("CUDA_VISIBLE_DEVICES", "all")
        return f"cuda:{idx} {torch.cuda.get_device_name(idx)} (CUDA_VISIBLE_DEVICES={visible})"
    return f"cpu ({os.cpu_count()} cores, {torch.get_num_threads()} threads)"
