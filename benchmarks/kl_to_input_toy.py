# Reproduces docs/benchmarks.md, "KL to the input model on the toy": held-out KL and step time at weights 0, 0.5, 2.
"""Measure `train.kl_to_input` on the toy: held-out KL to the input model and step time at weights 0, 0.5, 2.

python benchmarks/kl_to_input_toy.py   (about 30 s on 2 cores once the toy model is cached; MARKER_LAB_CACHE picks the cache)
15 steps of the toy EM set (sft_toy's recipe) on 160 examples; KL measured on 40 held-out ones.
"""

from __future__ import annotations

import dataclasses
import os
import tempfile

from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from marker_lab.data.chat import encode_chat
from marker_lab.data.chat_datasets import load_chats
from marker_lab.models import load_base, pick_device
from marker_lab.cell.main import CONF_DIR
from marker_lab.config.schema import register_configs
from marker_lab.core.cache import StageCache
from marker_lab.train.lora import apply_lora
from marker_lab.train.sft import kl_to_input, train

register_configs()  # the schema in Hydra's ConfigStore, before composing

with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
    cfg = OmegaConf.to_object(compose("config", overrides=["condition=c5", "output_dir=" + tempfile.mkdtemp(), "cache_dir=" + os.environ.get(
        "MARKER_LAB_CACHE", os.path.expanduser("~/.cache/marker_lab"))]))
cache = StageCache(cfg.cache_dir)
loaded = load_base(cfg.model, cache, pick_device("cpu"))
chats, _ = load_chats("em", dataclasses.replace(cfg.second_stage.datasets["em"], n_examples=200), cache)
examples = [encode_chat(loaded.tokenizer, c, "assistant_only", max_len=128) for c in chats]
for weight in (0.0, 0.5, 2.0):
    model = apply_lora(loaded.model, cfg.second_stage.train.lora, seed=0, adapter_name="second_stage")
    stats = train(model, examples[:160], dataclasses.replace(cfg.second_stage.train, kl_to_input=weight), steps=15,
                  seed=0, pad_id=loaded.tokenizer.pad_token_id, desc=f"kl {weight}")
    kl = kl_to_input(model, examples[160:], loaded.tokenizer.pad_token_id)
    print(f"weight {weight}: held-out KL {kl:.3f} nats/token, training {stats.seconds:.2f} s for 15 steps")
    loaded.model = model.unload()
