"""Where data files live, and their fingerprints.

A path starting with ``pkg:`` names a file shipped inside marker_lab (marker_lab/resources/); any other path
is taken as given (relative paths against the directory the command was started from).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

RESOURCES = Path(__file__).resolve().parent.parent / "resources"


def resolve_path(path: str) -> Path:
    """The real filesystem path of a config path (``pkg:`` or plain)."""
    if path.startswith("pkg:"):
        return RESOURCES / path[len("pkg:"):]
    return Path(path).expanduser()


def md5_file(path: Path) -> str:
    """md5 of a file's bytes (the write-ups record data files by md5)."""
    h = hashlib.md5()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
