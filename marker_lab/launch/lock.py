"""One sweep command per sweep directory at a time, and one shared eval.

A second `marker-lab run -m` on a directory in use stops at once with one line naming who holds it; so does a
second `marker-lab eval` (its own lock: a sweep's launcher runs the eval while it holds the sweep's, and waits for
an eval someone started by hand). The lock is an OS file lock (flock), so the kernel releases it when its holder
dies, however it dies: a lock left by a killed process is simply taken over (and said so). Who holds it is written
next to it for the message.
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


EVAL_LOCK_FILE = ".shared_eval.lock"


class SweepLock:
    """`with SweepLock(sweep_dir):` holds the directory for this process (SweepBusy if another holds it).

    `lock_file` names another lock of the directory (EVAL_LOCK_FILE: `marker-lab eval`'s); `wait` waits for the
    holder to end instead of stopping at once."""

    def __init__(self, sweep_dir: Path, lock_file: str = LOCK_FILE, wait: bool = False):
        self.sweep_dir = Path(sweep_dir)
        self.lock_file, self.holder_file = lock_file, lock_file + ".json"
        self.wait = wait
        self._lock = FileLock(str(self.sweep_dir / lock_file), timeout=-1 if wait else 0)

    def __enter__(self) -> "SweepLock":
        self.sweep_dir.mkdir(parents=True, exist_ok=True)
        holder = self._holder()
        what = "a shared eval" if self.lock_file == EVAL_LOCK_FILE else "a sweep"
        try:
            if self.wait and holder:
                log.info("%s of %s is running (pid %s on %s): waiting for it to end", what, self.sweep_dir,
                         holder.get("pid"), holder.get("host"))
            self._lock.acquire()
        except Timeout:
            who = (f"pid {holder.get('pid')} on {holder.get('host')} since "
                   f"{time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(holder.get('since', 0)))}"
                   if holder else "another process")
            where = f"sweep directory {self.sweep_dir}" if what == "a sweep" else f"the shared eval of {self.sweep_dir}"
            raise SweepBusy(f"{where} is in use by {who} ({holder.get('command', '?') if holder else '?'}); wait "
                            f"for it to end or stop it") from None
        holder = self._holder()  # after waiting: whoever held it last
        if holder:
            log.info("sweep lock: taking over from pid %s on %s, which is no longer running", holder.get("pid"),
                     holder.get("host"))
        (self.sweep_dir / self.holder_file).write_text(json.dumps(
            {"pid": os.getpid(), "host": socket.gethostname(), "since": time.time(), "command": " ".join(sys.argv)}))
        return self

    def __exit__(self, *exc) -> None:
        (self.sweep_dir / self.holder_file).unlink(missing_ok=True)
        self._lock.release()

    def _holder(self) -> dict:
        try:
            return json.loads((self.sweep_dir / self.holder_file).read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return {}

    def remove_files(self) -> None:
        """Remove the lock's files, and the sweep directory if that leaves it empty (a command that planned nothing)."""
        for name in (self.lock_file, self.holder_file):
            (self.sweep_dir / name).unlink(missing_ok=True)
        try:
            self.sweep_dir.rmdir()
        except OSError:  # not empty: other things live there
            pass
