"""The stage cache: stable keys, reuse, one build when processes race, nothing complete after kill -9."""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import time
from pathlib import Path

from marker_lab.core.cache import StageCache, cache_key


def test_cache_key_is_stable_and_order_free():
    a = {"stage": "coupling", "train": {"lr": 5e-3, "steps": 100}, "input_model": "toy:abc", "seed": 42}
    b = {"seed": 42, "input_model": "toy:abc", "train": {"steps": 100, "lr": 5e-3}, "stage": "coupling"}
    assert cache_key(a) == cache_key(b)
    # pinned: a change here silently invalidates every user's cache, so it must be deliberate
    assert cache_key(a) == "fd97abaa88cf97e32f216c07"
    assert cache_key({**a, "seed": 43}) != cache_key(a)
    assert cache_key({**a, "input_model": "toy:abd"}) != cache_key(a)


def test_reuse_builds_once(tmp_path):
    cache, builds = StageCache(tmp_path), []

    def build(d: Path):
        builds.append(1)
        (d / "out.txt").write_text("x")

    p1, new1 = cache.get_or_build("stages", "k1", build, {"k": 1})
    p2, new2 = cache.get_or_build("stages", "k1", build, {"k": 1})
    assert (new1, new2) == (True, False) and p1 == p2 and len(builds) == 1
    assert (p1 / "out.txt").read_text() == "x" and (p1 / "cache_key.json").is_file()


def _slow_build(root: str, key: str, log: str, seconds: float) -> None:
    def build(d: Path):
        with open(log, "a") as f:
            f.write(f"{os.getpid()}\n")
        time.sleep(seconds)
        (d / "adapter.bin").write_bytes(b"weights")

    StageCache(root).get_or_build("stages", key, build)


def test_two_processes_racing_for_one_entry_build_it_once(tmp_path):
    log = tmp_path / "builds.log"
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_slow_build, args=(str(tmp_path), "race", str(log), 1.5)) for _ in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    assert len(log.read_text().split()) == 1
    assert (tmp_path / "stages" / "race" / "adapter.bin").read_bytes() == b"weights"


def test_kill_9_mid_build_leaves_nothing_complete(tmp_path):
    log = tmp_path / "builds.log"
    proc = mp.get_context("spawn").Process(target=_slow_build, args=(str(tmp_path), "killed", str(log), 60))
    proc.start()
    deadline = time.time() + 30
    while not log.exists() and time.time() < deadline:
        time.sleep(0.1)
    os.kill(proc.pid, signal.SIGKILL)
    proc.join()
    final = tmp_path / "stages" / "killed"
    assert not final.exists()
    assert list((tmp_path / "stages").glob("killed.tmp-*"))  # the partial build, not under the final name
    # the next builder is not blocked by the dead one's lock, and clears its leftovers
    _slow_build(str(tmp_path), "killed", str(log), 0)
    assert (final / "adapter.bin").is_file() and not list((tmp_path / "stages").glob("killed.tmp-*"))
