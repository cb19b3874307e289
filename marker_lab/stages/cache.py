"""A content-addressed store of stage outputs (adapters, built datasets, the toy model), shared by cells.

An entry's key is a hash of everything that determines it. An entry directory exists only once complete:
it is built in a private temporary directory and renamed into place, under a file lock, so two processes that
need the same entry build it once and a killed builder leaves nothing that looks complete.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import uuid
from pathlib import Path
from typing import Callable

from filelock import FileLock

log = logging.getLogger(__name__)


def plain(dataclass_obj) -> dict:
    """A dataclass as JSON-ready data (enums by value), for cache keys and records."""
    from dataclasses import asdict

    return json.loads(json.dumps(asdict(dataclass_obj), default=lambda v: getattr(v, "value", str(v))))


def cache_key(payload: dict) -> str:
    """A stable hash of a JSON-serialisable description (key order does not matter)."""
    blob = json.dumps(payload, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


class StageCache:
    def __init__(self, root: str | Path):
        self.root = Path(root).expanduser()

    def path(self, kind: str, key: str) -> Path:
        return self.root / kind / key

    def get_or_build(self, kind: str, key: str, build: Callable[[Path], None], payload: dict | None = None) -> tuple[Path, bool]:
        """Return (entry path, built_now). `build(tmp_dir)` writes the entry's files into tmp_dir."""
        final = self.path(kind, key)
        if final.is_dir():
            return final, False
        final.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(str(final) + ".lock"):
            if final.is_dir():  # another process built it while we waited
                log.info("cache: %s/%s was built by another process; reusing it", kind, key)
                return final, False
            for stale in final.parent.glob(f"{key}.tmp-*"):  # left by a killed builder
                shutil.rmtree(stale, ignore_errors=True)
            tmp = final.parent / f"{key}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
            tmp.mkdir()
            try:
                build(tmp)
                if payload is not None:
                    (tmp / "cache_key.json").write_text(json.dumps(payload, indent=2, sort_keys=True, default=str))
                os.replace(tmp, final)
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
        return final, True
