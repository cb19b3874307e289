"""Where files named in configs live, and their checksums.

A path starting with ``pkg:`` names a file shipped inside marker_lab (marker_lab/resources/), ``conf:`` a file of
the conf/ tree (judge prompts); any other path is taken as given (relative paths against the directory the
command was started from).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import tempfile
from pathlib import Path

RESOURCES = Path(__file__).resolve().parent.parent / "resources"
# the configs: inside the package when installed from a wheel (setup.py copies conf/ there), else the repository's
# top-level conf/ (a checkout, or an editable install)
_PACKAGED_CONF = Path(__file__).resolve().parent.parent / "conf"
CONF = _PACKAGED_CONF if _PACKAGED_CONF.is_dir() else Path(__file__).resolve().parent.parent.parent / "conf"

FULL_HASH_BYTES = 1 << 30  # files up to 1 GiB are hashed whole; larger ones by size, head and tail (see below)
_EDGE = 1 << 20


def resolve_path(path: str) -> Path:
    """The real filesystem path of a config path (``pkg:`` shipped data, ``conf:`` the conf/ tree,
    ``module:<package>/<file>`` inside an installed Python package's directory, or plain)."""
    if path.startswith("module:"):
        name, _, rest = path[len("module:"):].partition("/")
        spec = importlib.util.find_spec(name)  # finds the package's directory without importing it
        if spec is None or not spec.submodule_search_locations:
            raise FileNotFoundError(f"the Python package {name!r} is not installed")
        return Path(spec.submodule_search_locations[0]) / rest
    if path.startswith("pkg:"):
        return RESOURCES / path[len("pkg:"):]
    if path.startswith("conf:"):
        return CONF / path[len("conf:"):]
    return Path(path).expanduser()


def sha256_file(path: Path | str) -> str:
    """sha256 of a file's bytes (what a package index publishes), memoised per process on (path, size, mtime)."""
    return _memoised(path, "sha256:", lambda: _digest(path, "sha256"))


def md5_file(path: Path | str) -> str:
    """md5 of a file's bytes (the write-ups record data files by md5)."""
    return _digest(path, "md5")


def _digest(path: Path | str, algorithm: str) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, algorithm).hexdigest()


_CHECKSUMS: dict[tuple[str, int, int], str] = {}  # (kind + path, size, mtime_ns) -> checksum: hashed once per process


def _memoised(path: Path | str, kind: str, compute) -> str:
    """compute() once per process for this file as it is now (same path, size and modification time)."""
    st = Path(path).stat()
    memo = (kind + str(Path(path).resolve()), st.st_size, st.st_mtime_ns)
    if memo not in _CHECKSUMS:
        _CHECKSUMS[memo] = compute()
    return _CHECKSUMS[memo]


def file_checksum(path: Path | str) -> str:
    """A file's checksum: its md5 up to 1 GiB; beyond, md5 of its size, first and last MiB (weights of many GB are
    named by their identity elsewhere; this still catches truncation and most damage). Memoised per process on
    (path, size, mtime), so checking the same inputs for every cell of a sweep reads each file once."""
    def compute() -> str:
        size = Path(path).stat().st_size
        if size <= FULL_HASH_BYTES:
            return md5_file(path)
        h = hashlib.md5(str(size).encode())
        with open(path, "rb") as f:
            h.update(f.read(_EDGE))
            f.seek(size - _EDGE)
            h.update(f.read(_EDGE))
        return "edges:" + h.hexdigest()

    return _memoised(path, "", compute)


def dir_checksum(path: Path | str) -> str:
    """One checksum for a directory's files (relative names and contents), e.g. a saved `datasets` dataset."""
    root = Path(path)
    files = sorted(p for p in root.rglob("*") if p.is_file())
    return sha256_json({str(p.relative_to(root)): file_checksum(p) for p in files})[:32]


def sha256_json(payload) -> str:
    """sha256 of a JSON description with sorted keys (key order never changes a hash)."""
    blob = json.dumps(payload, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def safetensors_problem(path: Path | str) -> str | None:
    """None when a .safetensors file is whole (its header parses and its tensors end exactly at the end of the
    file), else what is wrong: a cheap check of a truncated or overwritten file before anything loads it."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            return f"{path}: {size} bytes, too short for a safetensors file"
        n = int.from_bytes(head, "little")
        if n <= 0 or 8 + n > size:
            return f"{path}: its header says {n} bytes but the file has {size} (truncated?)"
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError):
            return f"{path}: its header is not JSON (damaged)"
    ends = [t["data_offsets"][1] for k, t in header.items() if k != "__metadata__" and isinstance(t, dict)]
    if 8 + n + max(ends, default=0) != size:
        return f"{path}: tensors end at byte {8 + n + max(ends, default=0)} but the file has {size} (truncated?)"
    return None


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write to a temp file in the same directory, fsync, rename: readers see the old file or the new one."""
    path = Path(path)
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
    """A JSON file written atomically (see atomic_write_bytes)."""
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode())
