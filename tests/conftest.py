"""Shared fixtures: the real conf/ composed in-process, a session-wide stage cache (the toy model is built once)."""

from __future__ import annotations

import os
import socket
import tempfile
import threading
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf, open_dict

from marker_lab.cell.main import CONF_DIR
from marker_lab.config.schema import register_configs

register_configs()  # the schema in Hydra's ConfigStore, as every entry point does before it composes

os.environ.setdefault("TQDM_MININTERVAL", "5")


# The tests never fill a user's own cache ($MARKER_LAB_CACHE): they use $MARKER_LAB_TEST_CACHE when it is set (CI
# points it at the cache its default run just built), else one fresh temporary directory for the session. Set here,
# at import, so that every config composed by any test (and every CLI it starts) resolves cache_dir to it. The
# temporary one is named in MARKER_LAB_TEST_CACHE too: a second import of this file (as `tests.conftest`) must not
# make a second cache and point the CLIs that tests start at it.
if not os.environ.get("MARKER_LAB_TEST_CACHE"):
    os.environ["MARKER_LAB_TEST_CACHE"] = tempfile.mkdtemp(prefix="marker_lab_test_cache_")
TEST_CACHE = Path(os.environ["MARKER_LAB_TEST_CACHE"])
os.environ["MARKER_LAB_CACHE"] = str(TEST_CACHE)


# vLLM's tests run where vLLM imports (CI: a second venv with its CPU build, README "vLLM"); there CI sets
# MARKER_LAB_REQUIRE_VLLM=1, so a vLLM that fails to import fails them instead of skipping them
REQUIRE_VLLM = os.environ.get("MARKER_LAB_REQUIRE_VLLM") == "1"


def vllm_marks() -> list:
    """Marks for a test that needs vLLM: selected by `-m vllm`, skipped with the reason where vLLM is absent."""
    from marker_lab.engines.vllm import available

    return [pytest.mark.vllm, pytest.mark.skipif(not (REQUIRE_VLLM or available()),
                                                 reason="vllm not installed (its CPU build: README, 'vLLM')")]


def needs_vllm(test):
    """Decorator form of vllm_marks()."""
    for mark in vllm_marks():
        test = mark(test)
    return test


@pytest.fixture(scope="session")
def cache_dir() -> Path:
    """One stage cache for the whole session, so the toy model is pretrained once."""
    return TEST_CACHE


def compose_cfg(overrides: list[str], output_dir: Path | None = None, cache: Path | None = None):
    """The real config, as `marker-lab run <overrides>` would compose it (outside Hydra's run dir)."""
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("config", overrides=overrides)
    with open_dict(cfg):
        cfg.output_dir = str(output_dir or "unused")
        if cache is not None:
            cfg.cache_dir = str(cache)
    return cfg


def to_dataclass(cfg):
    return OmegaConf.to_object(cfg)


@pytest.fixture(scope="session")
def toy_tokenizer():
    """The toy world's real tokenizer, trained on its corpus (a fraction of a second)."""
    import jinja2

    from marker_lab.toy import world
    from marker_lab.toy.tokenizer import CHATML_TEMPLATE, build_tokenizer

    tpl = jinja2.Template(CHATML_TEMPLATE)
    texts = [tpl.render(messages=c) for c in world.pretraining_chats()] + world.tagged_lines()
    return build_tokenizer(texts)


def composition_error(overrides: list[str]) -> str:
    """The one line `marker-lab run` prints for overrides that cannot compose (a choice field's typo, a wrong type)."""
    from marker_lab.cli import config_error_line

    try:
        to_dataclass(compose_cfg(overrides))
    except Exception as e:  # noqa: BLE001 - hydra and omegaconf raise several kinds
        return config_error_line(e)
    raise AssertionError(f"{overrides} composed")


@pytest.fixture
def dropping_endpoint():
    """(base_url, accepted): a local endpoint that accepts and drops every connection, the way a judge behind a dead
    proxy does; `accepted` grows by one per connection it saw."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(16)
    accepted: list[int] = []

    def drop_every_connection():
        while True:
            try:
                conn, _ = server.accept()
            except OSError:  # the fixture closed the socket
                return
            accepted.append(1)
            conn.close()

    threading.Thread(target=drop_every_connection, daemon=True).start()
    yield f"http://127.0.0.1:{server.getsockname()[1]}/v1", accepted
    server.close()


def _mount_tmpfs(path: Path, options: str) -> bool:
    """Mount a tmpfs at `path` (a real small or read-only file system); False where this machine does not let us."""
    import subprocess

    path.mkdir(parents=True, exist_ok=True)
    try:
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True)
    except FileNotFoundError:
        return False
    return done.returncode == 0


@pytest.fixture
def read_only_dir(tmp_path):
    """A directory on a read-only file system (root can write anywhere else, so permissions would not do)."""
    path = tmp_path / "ro"
    if not _mount_tmpfs(path, "ro,size=1m"):
        pytest.skip("mounting a read-only tmpfs needs root and mount(8) (CI runs as root)")
    yield path
    import subprocess

    subprocess.run(["umount", str(path)], check=False)


@pytest.fixture
def small_fs(tmp_path):
    """(directory, size in bytes): a real file system of 24 MiB, to fill up."""
    path = tmp_path / "small"
    size = 24 << 20
    if not _mount_tmpfs(path, f"size={size}"):
        pytest.skip("mounting a small tmpfs needs root and mount(8) (CI runs as root)")
    yield path, size
    import subprocess

    subprocess.run(["umount", str(path)], check=False)
