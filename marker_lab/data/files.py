"""Where data files live, and their fingerprints.

A path starting with ``pkg:`` names a file shipped inside marker_lab (marker_lab/resources/), ``conf:`` a file of
the conf/ tree (judge prompts); any other path
is taken as given (relative paths against the directory the command was started from).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

RESOURCES = Path(__file__).resolve().parent.parent / "resources"


CONF = Path(__file__).resolve().parent.parent.parent / "conf"


def resolve_path(path: str) -> Path:
    """The real filesystem path of a config path (``pkg:`` shipped data, ``conf:`` the conf/ tree, or plain)."""
    if path.startswith("pkg:"):
        return RESOURCES / path[len("pkg:"):]
    if path.startswith("conf:"):
        return CONF / path[len("conf:"):]
    return Path(path).expanduser()


def md5_file(path: Path) -> str:
    """md5 of a file's bytes (the write-ups record data files by md5)."""
    h = hashlib.md5()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
