"""A content-addressed store of built things (adapters, built datasets, the toy model, probes), shared by cells.

An entry's key is a hash of everything that determines it. An entry directory exists only once complete:
it is built in a private temporary directory and renamed into place, under a file lock, so two processes that
need the same entry build it once and a killed builder leaves nothing that looks complete.

Every entry records the checksums of its files when it is built (`checksums.json`); each time it is handed out
they are checked, so a damaged disk block, a truncated copy or an edited file is never read as the entry. A
damaged entry is moved aside and rebuilt under the same lock (the log says which file did not match).
"""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import time
import uuid
from dataclasses import asdict
from pathlib import Path
from typing import Callable

from filelock import FileLock

from marker_lab.core import environment
from marker_lab.core.errors import DiskFullError
from marker_lab.core.files import file_checksum, sha256_json

log = logging.getLogger(__name__)

CHECKSUMS = "checksums.json"  # {relative path: {"size": bytes, "md5": ...}} of every file of an entry
KEY_FILE = "cache_key.json"  # the payload the key was made from, for people reading the cache


COMPILE_CACHE = "compile"  # torch.compile's on-disk caches, inside the stage cache (not content-addressed entries)


def use_compile_cache(cache_dir: str | Path) -> str:
    """Point torch.compile's on-disk caches (compiled graphs, Triton kernels, the kernel configurations Inductor
    chose by timing) at <cache_dir>/compile, unless $TORCHINDUCTOR_CACHE_DIR names another place: later cells
    of a sweep and its shared eval then start warm and make the same kernel choices. Takes effect if called
    before the process first compiles."""
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    # importing transformers already sets the variable to Inductor's default (/tmp/torchinductor_<user>): a value
    # equal to that default was not chosen by anyone
    if environment.compile_cache_dir() in (None, default_cache_dir()):
        environment.set_compile_cache_dir(str(Path(cache_dir).expanduser().resolve() / COMPILE_CACHE))
    return environment.compile_cache_dir()


def plain(dataclass_obj) -> dict:
    """A dataclass as JSON-ready data (enums by value), for cache keys and records."""
    return json.loads(json.dumps(asdict(dataclass_obj), default=lambda v: getattr(v, "value", str(v))))


def cache_key(payload: dict) -> str:
    """A stable hash of a JSON-serialisable description (key order does not matter)."""
    return sha256_json(payload)[:24]


def entry_checksums(entry: Path) -> dict[str, dict]:
    """Size and checksum of every file under `entry` (but the checksum file itself)."""
    files = sorted(p for p in entry.rglob("*") if p.is_file() and p.name != CHECKSUMS)
    return {str(p.relative_to(entry)): {"size": p.stat().st_size, "md5": file_checksum(p)} for p in files}


def verify_entry(entry: Path) -> str | None:
    """None when every file of `entry` matches the checksums recorded at build, else what does not match."""
    recorded_file = entry / CHECKSUMS
    try:
        recorded = json.loads(recorded_file.read_text())
    except FileNotFoundError:
        return f"no {CHECKSUMS} (built by an older marker_lab, or damaged)"
    except (json.JSONDecodeError, UnicodeDecodeError):
        return f"{CHECKSUMS} is unreadable"
    for rel, want in recorded.items():
        path = entry / rel
        if not path.is_file():
            return f"{rel} is missing"
        size = path.stat().st_size
        if size != want["size"]:
            return f"{rel} has {size} bytes, {want['size']} when built (truncated?)"
        if file_checksum(path) != want["md5"]:
            return f"{rel} does not match its checksum from the build (damaged or edited)"
    return None


def _disk_full(e: BaseException) -> bool:
    """Whether a build failed because its file system is full: an OSError with ENOSPC, or a writer that wraps it in
    an error of its own (safetensors' Rust writer raises SafetensorError "No space left on device (os error 28)")."""
    if isinstance(e, OSError) and e.errno == errno.ENOSPC:
        return True
    return "No space left on device" in str(e) or "os error 28" in str(e)


class StageCache:
    """The cache under `root` (`$MARKER_LAB_CACHE`, default ~/.cache/marker_lab): entries at root/<kind>/<key>."""

    def __init__(self, root: str | Path):
        self.root = Path(root).expanduser()

    def path(self, kind: str, key: str) -> Path:
        return self.root / kind / key

    def get_or_build(self, kind: str, key: str, build: Callable[[Path], None],
                     payload: dict | None = None) -> tuple[Path, bool]:
        """Return (entry path, built_now). `build(tmp_dir)` writes the entry's files into tmp_dir.

        A cached entry is handed out only when its files match their build checksums; otherwise it is rebuilt."""
        final = self.path(kind, key)
        if final.is_dir() and verify_entry(final) is None:
            return final, False
        final.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(str(final) + ".lock"):
            if final.is_dir():
                problem = verify_entry(final)
                if problem is None:  # another process built it while we waited
                    log.info("cache: %s/%s was built by another process; reusing it", kind, key)
                    return final, False
                self._discard(final, problem)
            for stale in final.parent.glob(f"{key}.tmp-*"):  # left by a killed builder
                shutil.rmtree(stale, ignore_errors=True)
            tmp = final.parent / f"{key}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
            tmp.mkdir()
            try:
                build(tmp)
                if payload is not None:
                    (tmp / KEY_FILE).write_text(json.dumps(payload, indent=2, sort_keys=True, default=str))
                (tmp / CHECKSUMS).write_text(json.dumps(entry_checksums(tmp), indent=1, sort_keys=True))
                os.replace(tmp, final)
            except BaseException as e:
                shutil.rmtree(tmp, ignore_errors=True)
                if _disk_full(e) and not isinstance(e, DiskFullError):
                    free = shutil.disk_usage(final.parent).free
                    raise DiskFullError(f"no space left on the device writing the {kind} entry {final} (its "
                                        f"temporary directory was removed; {free / 2**20:,.0f} MB free there now)"
                                        ) from None
                raise
        return final, True

    @staticmethod
    def _discard(entry: Path, problem: str) -> None:
        """Move a damaged entry out of the way (kept briefly for a post-mortem, then removed) before the rebuild."""
        log.warning("cache: entry %s is damaged: %s; rebuilding it", entry, problem)
        aside = entry.with_name(f"{entry.name}.damaged-{int(time.time())}-{uuid.uuid4().hex[:6]}")
        os.replace(entry, aside)
        shutil.rmtree(aside, ignore_errors=True)
