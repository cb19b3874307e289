"""Refresh the toy model shipped in marker_lab/resources/toy_model/ (after a change to the toy world or to the
default ToyModelConfig): build it with the project's own script through a fresh cache, then copy the entry.

    python tools/ship_toy_model.py     # about 4 minutes on 2 CPU cores; then commit the new directory
"""

import dataclasses
import shutil
import tempfile

from marker_lab.config.schema import ModelConfig
from marker_lab.core.cache import StageCache, cache_key
from marker_lab.models import SHIPPED_TOY, toy_model_dir
from marker_lab.toy import world

cfg = ModelConfig()
key = cache_key({"toy": dataclasses.asdict(cfg.toy), "world_version": world.WORLD_VERSION})
for old in SHIPPED_TOY.glob("*"):  # one shipped build: the default's
    shutil.rmtree(old)
built, _ = toy_model_dir(cfg, StageCache(tempfile.mkdtemp()))
shutil.copytree(built, SHIPPED_TOY / key)
print(f"shipped {SHIPPED_TOY / key}")
