"""The judgement cache: one SQLite file shared by every cell and sweep (default `<cache_dir>/judge_cache.sqlite`).

A judgement is keyed by everything that determines it: the judge (backend, model, mode), the prompt's hash, the
question and the answer. Each judgement is committed on its own as it arrives, so a run killed mid-way keeps what
it paid for; SQLite's transactions make a write all-or-nothing (kill -9 included) and its locking lets several
processes read and write the same file at once.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
import threading
import time
from pathlib import Path

SCHEMA = """CREATE TABLE IF NOT EXISTS judgements (
    key TEXT PRIMARY KEY, score REAL, reply TEXT, judge TEXT, created REAL)"""


def judgement_key(judge: dict, prompt_hash: str, question: str, answer: str) -> str:
    blob = json.dumps([judge, prompt_hash, question, answer], sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(blob.encode()).hexdigest()


class JudgeCache:
    def __init__(self, path: str | Path):
        self.path = Path(path).expanduser()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._con = sqlite3.connect(self.path, timeout=120, check_same_thread=False, isolation_level=None)
        self._con.execute("PRAGMA journal_mode=WAL")  # readers never block the writer
        self._con.execute("PRAGMA synchronous=NORMAL")
        self._con.execute(SCHEMA)

    def get_many(self, keys: list[str]) -> dict[str, float | None]:
        """The cached scores among `keys` (a cached None means: judged, no score)."""
        out: dict[str, float | None] = {}
        with self._lock:
            for i in range(0, len(keys), 500):
                chunk = keys[i:i + 500]
                rows = self._con.execute(f"SELECT key, score FROM judgements WHERE key IN ({','.join('?' * len(chunk))})",
                                         chunk).fetchall()
                out.update(rows)
        return out

    def put(self, key: str, score: float | None, reply: str, judge: dict) -> None:
        with self._lock:
            self._con.execute("INSERT OR REPLACE INTO judgements VALUES (?, ?, ?, ?, ?)",
                              (key, score, reply, json.dumps(judge, sort_keys=True), time.time()))

    def __len__(self) -> int:
        with self._lock:
            return self._con.execute("SELECT COUNT(*) FROM judgements").fetchone()[0]

    def close(self) -> None:
        self._con.close()
