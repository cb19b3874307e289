"""Which code made a result: the repository's commit and the versions of the packages that compute it (recorded in
every result's provenance)."""

from __future__ import annotations

import platform
import subprocess
from pathlib import Path


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
