"""Disk space before expensive work, on real small file systems (tmpfs): a cell stops before its model loads when the
directory it writes to has less room than its estimate, and a cache write that fails anyway with ENOSPC is one line
naming the entry, its temporary directory removed."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from conftest import compose_cfg, to_dataclass
from marker_lab.core.cache import StageCache
from marker_lab.core.errors import DiskFullError
from marker_lab.cell.preflight import preflight
from marker_lab.stages.disk import Shape, estimate_writes


def test_the_estimate_counts_adapters_from_the_model_shape(cache_dir):
    cfg = to_dataclass(compose_cfg(["second_stage.dose_checkpoints=[5,10,20]", "dose=20",
                                    "second_stage.train.schedule.name=constant"], cache=cache_dir))
    preflight(cfg)
    writes = estimate_writes(cfg)
    toy = cfg.model.toy
    shape = Shape(toy.num_layers, toy.hidden_size, toy.intermediate_size, toy.num_heads, toy.num_kv_heads,
                  toy.hidden_size // toy.num_heads, toy.vocab_size)
    per = {name: shape.layers * sum(getattr(cfg, name).train.lora.r * sum(shape.linear(t))
                                    for t in getattr(cfg, name).train.lora.target_modules) * 4
           for name in ("coupling", "second_stage")}
    # by hand for one module: q_proj of the toy is 128 -> 128, so r x 256 parameters a layer
    assert shape.linear("q_proj") == (128, 128) and shape.linear("k_proj") == (128, 64)
    assert writes.by_dir[cfg.cache_dir] == per["coupling"] + 4 * per["second_stage"] + 600 * 2048  # 3 checkpoints
    assert any(p.startswith("second_stage adapters") for p in writes.parts)


def test_a_cell_on_a_nearly_full_disk_stops_before_its_model_loads(small_fs, tmp_path):
    disk, _ = small_fs
    run = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "marker_lab.cli", "run", "condition=c4", f"hydra.run.dir={run}"],
                          capture_output=True, text=True, timeout=300,
                          env={**os.environ, "MARKER_LAB_CACHE": str(disk / "cache"), "TQDM_DISABLE": "1"})
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert "loaded base model" not in proc.stderr + proc.stdout  # stopped before the model loads
    status = json.loads((run / "cell_status.json").read_text())
    assert status["state"] == "failed" and status["error"].startswith(f"error: cache_dir={disk / 'cache'}: about ")
    assert "MB free on the file system of" in status["error"] and "coupling adapter" in status["error"]


def test_a_cache_write_that_fills_the_disk_is_one_line_and_leaves_no_temporary_directory(small_fs):
    disk, size = small_fs
    cache = StageCache(disk / "cache")

    def build(tmp):  # an adapter bigger than the file system
        with open(tmp / "adapter_model.safetensors", "wb") as f:
            for _ in range(size // (1 << 20) + 4):
                f.write(b"\0" * (1 << 20))

    with pytest.raises(DiskFullError, match=r"^no space left on the device writing the stages entry "
                                            rf"{disk / 'cache' / 'stages' / 'k1'} \(its temporary directory was "
                                            r"removed; [\d,]+ MB free there now\)$"):
        cache.get_or_build("stages", "k1", build, {"x": 1})
    assert [p.name for p in (disk / "cache" / "stages").iterdir()] == ["k1.lock"]  # no tmp dir, no entry
    cache.get_or_build("stages", "k1", lambda tmp: (tmp / "ok").write_text("fits"), {"x": 1})  # room again


def test_an_adapter_save_that_fills_the_disk_is_the_same_one_line(small_fs):
    """The adapter itself is written by safetensors, whose writer wraps ENOSPC in an error of its own."""
    import torch
    from safetensors.torch import save_file

    disk, size = small_fs
    cache = StageCache(disk / "cache")
    big = {"lora_A": torch.zeros(size // 4 + (1 << 20), dtype=torch.float32)}  # more bytes than the file system
    with pytest.raises(DiskFullError, match=r"^no space left on the device writing the stages entry"):
        cache.get_or_build("stages", "k2", lambda tmp: save_file(big, str(tmp / "adapter_model.safetensors")), {})
    assert [p.name for p in (disk / "cache" / "stages").iterdir()] == ["k2.lock"]


def test_the_estimate_decides_not_only_the_minimum(tmp_path):
    """On a 128 MiB file system the toy cell's estimate (KBs of adapters, plus the 64 MiB minimum) fits and the 7B
    shape's (two LoRA adapters of about 77 MB each, from the shipped config.json) does not."""
    import subprocess as sp

    from conftest import _mount_tmpfs
    from marker_lab.stages.disk import check_disk

    disk = tmp_path / "mid"
    if not _mount_tmpfs(disk, "size=128m"):
        pytest.skip("mounting a tmpfs needs root and mount(8) (CI runs as root)")
    try:
        check_disk(to_dataclass(compose_cfg([], cache=disk / "cache")))
        big = to_dataclass(compose_cfg(["model=qwen2.5-7b-instruct", "model.random_init=true"], cache=disk / "cache"))
        with pytest.raises(DiskFullError, match=r"^cache_dir=.*: about 2\d\d MB needed \(coupling adapter 7\d MB, "
                                                r"second_stage adapter 7\d MB, coupling data 1 MB, with a margin\), "
                                                r"12\d MB free"):
            check_disk(big)
    finally:
        sp.run(["umount", str(disk)], check=False)
