"""Loading base models and tokenizers (toy, hub or local, GGUF, random init), and their identities for caching."""

from __future__ import annotations

import dataclasses
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from marker_lab.config.schema import ModelConfig
from marker_lab.core import environment
from marker_lab.core.cache import StageCache, cache_key, verify_entry
from marker_lab.core.files import RESOURCES, resolve_path, sha256_file
from marker_lab.toy import world

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class LoadedModel:
    model: torch.nn.Module
    tokenizer: object
    identity: str  # names the weights exactly; stage cache keys build on it
    merge: bool = True  # merge each stage's adapter into the weights (False: stack adapters; merge_between_stages)
    no_system: str = "none"  # how a prompt without a system prompt renders (model.no_system; see data.chat.render)


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def device_description(device: torch.device) -> str:
    """The device in words, for provenance: the GPU's name (and which GPUs the process saw), or the CPU's cores."""
    if device.type == "cuda":
        idx = device.index if device.index is not None else torch.cuda.current_device()
        visible = environment.visible_devices()
        visible = "all" if visible is None else visible
        return f"cuda:{idx} {torch.cuda.get_device_name(idx)} (CUDA_VISIBLE_DEVICES={visible})"
    return f"cpu ({os.cpu_count()} cores, {torch.get_num_threads()} threads)"


SHIPPED_TOY = RESOURCES / "toy_model"  # the default toy build (2.6 MB), shipped: a first run needs no pretraining


def toy_model_dir(cfg: ModelConfig, cache: StageCache) -> tuple[Path, str]:
    """The toy model's directory and key: the shipped build when `cfg.toy` is the default (and its files are
    whole), else built into the cache on first use (under a lock). tests/test_engines.py rebuilds the default from
    the project's script and checks it equals the shipped weights bit for bit; tools/ship_toy_model.py
    refreshes them when the toy world or its defaults change."""
    from marker_lab.train.toy_pretrain import build_toy_model

    payload = {"toy": dataclasses.asdict(cfg.toy), "world_version": world.WORLD_VERSION}
    key = cache_key(payload)
    shipped = SHIPPED_TOY / key
    if shipped.is_dir() and verify_entry(shipped) is None:
        return shipped, key

    def build(tmp: Path) -> None:
        log.info("building the toy model (first use of these toy settings, about 2 minutes on 2 CPU cores) into %s",
                 cache.path("toy", key))
        build_toy_model(cfg.toy, tmp)

    path, _ = cache.get_or_build("toy", key, build, payload)
    return path, key


def gguf_model_dir(cfg: ModelConfig, cache: StageCache) -> tuple[Path, str]:
    """A GGUF file dequantized to `cfg.dtype` and saved as a transformers folder in the stage cache (converted once,
    under the cache's lock: loading the folder takes seconds, converting the file about 30 s), and the identity
    naming it: the file's name and sha256, and that its weights are dequantized (not the original checkpoint's)."""
    import transformers

    file = resolve_path(cfg.path) / cfg.gguf_file
    sha = sha256_file(file)
    payload = {"gguf_sha256": sha, "dtype": str(cfg.dtype), "transformers": transformers.__version__}

    def build(tmp: Path) -> None:
        log.info("converting %s (dequantizing to %s, about 30 s) into %s", file, cfg.dtype,
                 cache.path("model", cache_key(payload)))
        tokenizer = AutoTokenizer.from_pretrained(file.parent, gguf_file=file.name)
        model = AutoModelForCausalLM.from_pretrained(file.parent, gguf_file=file.name, dtype=DTYPES[str(cfg.dtype)])
        # the weights are plain tensors now; save_pretrained refuses a model that still names a quantizer
        model.hf_quantizer = None
        del model.config.quantization_config
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)

    path, _ = cache.get_or_build("model", cache_key(payload), build, payload)
    return path, f"gguf:{cfg.gguf_file}@sha256:{sha};dequantized"


def load_tokenizer(cfg: ModelConfig, cache: StageCache):
    """The model's tokenizer without its weights (the cell counts its training data's lengths before the model
    loads), padded on the left with a pad token."""
    if cfg.source in ("toy", "gguf"):
        path, _ = toy_model_dir(cfg, cache) if cfg.source == "toy" else gguf_model_dir(cfg, cache)
        tokenizer = AutoTokenizer.from_pretrained(path)
    else:
        kwargs = {"revision": cfg.revision} if cfg.revision and not cfg.tokenizer else {}
        tokenizer = AutoTokenizer.from_pretrained(cfg.tokenizer or cfg.path, **kwargs)
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_base(cfg: ModelConfig, cache: StageCache, device: torch.device, merge: bool = True,
              tokenizer=None) -> LoadedModel:
    """The stage-0 model of a cell; `merge`: how later stages attach their adapters (merge_between_stages);
    `tokenizer`: the one load_tokenizer gave the cell before the model loaded (else loaded here)."""
    dtype = DTYPES[str(cfg.dtype)]
    tokenizer = tokenizer if tokenizer is not None else load_tokenizer(cfg, cache)
    if cfg.source in ("toy", "gguf"):
        path, key = toy_model_dir(cfg, cache) if cfg.source == "toy" else gguf_model_dir(cfg, cache)
        attn = {} if cfg.source == "toy" else {"attn_implementation": cfg.attn_implementation}
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **attn)
        identity = f"toy:{key}" if cfg.source == "toy" else key
    else:
        kwargs = {"revision": cfg.revision} if cfg.revision else {}
        if cfg.random_init:
            model = random_init_model(cfg, device)
            identity = f"random:{cfg.path}:{cache_key(model.config.to_dict())}"
        else:
            model = AutoModelForCausalLM.from_pretrained(cfg.path, dtype=dtype,
                                                         attn_implementation=cfg.attn_implementation, **kwargs)
            identity = f"hf:{cfg.path}@{cfg.revision or _resolved_revision(model)}"
        if cfg.tokenizer:  # another tokenizer encodes the same data differently: stages built on it are other stages
            identity += f";tokenizer={cfg.tokenizer}"
    # what else changes what the same weights compute or read: their precision, and how a prompt without a system
    # prompt is rendered (stage, probe and geometry keys build on the identity)
    identity += f";{cfg.dtype}" + (f";no_system={cfg.no_system}" if cfg.no_system != "none" else "")
    model.to(device).eval()
    log.info("loaded base model %s (%s) on %s", cfg.name, identity, device)
    return LoadedModel(model, tokenizer, identity, merge, str(cfg.no_system))


def random_init_model(cfg: ModelConfig, device: torch.device):
    """The architecture of `cfg.arch` (or `cfg.path`'s config) with seeded random weights, built on `device`.

    Costs what the real weights cost in every later step, so benchmarks run without downloading them.
    """
    from marker_lab.core.files import resolve_path

    arch = AutoConfig.from_pretrained(str(resolve_path(cfg.arch)) if cfg.arch else cfg.path,
                                      **({"revision": cfg.revision} if cfg.revision and not cfg.arch else {}))
    torch.manual_seed(0)
    with torch.device(device):  # initialise in place: no 30 GB detour through host memory
        model = AutoModelForCausalLM.from_config(arch, dtype=DTYPES[str(cfg.dtype)],
                                                 attn_implementation=cfg.attn_implementation)
    return model.eval()


def _resolved_revision(model) -> str:
    # from_pretrained records the commit it loaded from the hub cache; local directories have none
    return getattr(model.config, "_commit_hash", None) or "local"
