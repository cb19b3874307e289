"""One sweep command per sweep directory at a time.

A second `marker-lab run -m` on a directory in use stops at once with one line naming who holds it. The lock is
an OS file lock (flock), so the kernel releases it when its holder dies, however it dies: a lock left by a killed
process is simply taken over (and said so). Who holds it is written next to it for the message.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import sys
import time
from pathlib import Path

from filelock import FileLock, Timeout

from marker_lab.core.errors import MarkerLabError

log = logging.getLogger(__name__)
LOCK_FILE = ".sweep.lock"
HOLDER_FILE = ".sweep.lock.json"


class SweepBusy(MarkerLabError):
    """Another command is running a sweep in this directory."""


class SweepLock:
    """`with SweepLock(sweep_dir):` holds the directory for this process (SweepBusy if another holds it)."""

    def __init__(self, sweep_dir: Path):
        self.sweep_dir = Path(sweep_dir)
        self._lock = FileLock(str(self.sweep_dir / LOCK_FILE), timeout=0)

    def __enter__(self) -> "SweepLock":
        self.sweep_dir.mkdir(parents=True, exist_ok=True)
        holder = self._holder()
        try:
            self._lock.acquire()
        except Timeout:
            who = (f"pid {holder.get('pid')} on {holder.get('host')} since "
                   f"{time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(holder.get('since', 0)))}"
                   if holder else "another process")
            raise SweepBusy(f"sweep directory {self.sweep_dir} is in use by {who} "
                            f"({holder.get('command', '?') if holder else '?'}); wait for it to end or stop it") from None
        if holder:
            log.info("sweep lock: taking over from pid %s on %s, which is no longer running", holder.get("pid"),
                     holder.get("host"))
        (self.sweep_dir / HOLDER_FILE).write_text(json.dumps(
            {"pid": os.getpid(), "host": socket.gethostname(), "since": time.time(), "command": " ".join(sys.argv)}))
        return self

    def __exit__(self, *exc) -> None:
        (self.sweep_dir / HOLDER_FILE).unlink(missing_ok=True)
        self._lock.release()

    def _holder(self) -> dict:
        try:
            return json.loads((self.sweep_dir / HOLDER_FILE).read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return {}

    def remove_files(self) -> None:
        """Remove the lock's files, and the sweep directory if that leaves it empty (a command that planned nothing)."""
        for name in (LOCK_FILE, HOLDER_FILE):
            (self.sweep_dir / name).unlink(missing_ok=True)
        try:
            self.sweep_dir.rmdir()
        except OSError:  # not empty: other things live there
            pass
