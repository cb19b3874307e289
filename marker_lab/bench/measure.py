"""The bench's measurements, each timed on the model in hand: a training run of `train.sft.train`, a generation of
`engines.hf.HFEngine`, the probe's feature read; and the model they run on (conf/model/<name>.yaml, random weights)."""

from __future__ import annotations

import logging
import platform
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf

from marker_lab.bench.workload import Workload
from marker_lab.config.schema import ModelConfig, TrainConfig
from marker_lab.core.files import CONF
from marker_lab.data.chat import IGNORE, Encoded
from marker_lab.engines.base import SamplingParams
from marker_lab.engines.hf import HFEngine

log = logging.getLogger("marker_lab.bench")
CONF_DIR = str(CONF)


def model_config(name: str) -> ModelConfig:
    """conf/model/<name>.yaml as a ModelConfig, with random weights."""
    node = OmegaConf.merge(OmegaConf.structured(ModelConfig), OmegaConf.load(f"{CONF_DIR}/model/{name}.yaml"))
    cfg: ModelConfig = OmegaConf.to_object(node)
    cfg.random_init = True
    return cfg


def build_model(cfg: ModelConfig, device: torch.device):
    from marker_lab.models import random_init_model
    from marker_lab.train.toy_pretrain import toy_arch

    if cfg.source == "toy":
        from transformers import Qwen2ForCausalLM

        torch.manual_seed(0)
        return Qwen2ForCausalLM(toy_arch(cfg.toy, cfg.toy.vocab_size, eos_id=0, pad_id=0)).to(device).eval()
    return random_init_model(cfg, device)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_gb(device: torch.device) -> float | None:
    return round(torch.cuda.max_memory_allocated(device) / 2**30, 1) if device.type == "cuda" else None


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def time_training(model, examples: list[Encoded], cfg: TrainConfig, w: Workload, device: torch.device) -> dict:
    """Seconds per optimizer step of `train.sft.train` on a fresh LoRA adapter (timed after warmup steps)."""
    from marker_lab.train.lora import apply_lora
    from marker_lab.train.sft import train

    reset_peak(device)
    stamps: dict[int, float] = {}
    peft_model = apply_lora(model, cfg.lora, seed=0)
    total = w.warmup_steps + w.timed_steps
    first_timed = w.warmup_steps or 1  # the stamp the timed steps count from

    def stamp(step: int) -> None:
        # only where the timing reads a stamp: a sync after every step would drain the GPU's queue, which the
        # training loop itself no longer does (it reads each loss a step late)
        if step in (1, first_timed, total):
            sync(device)
            stamps[step] = time.perf_counter()

    t0 = time.perf_counter()
    try:
        stats = train(peft_model, examples, cfg, steps=total, seed=0, pad_id=0, desc="bench train", on_step=stamp)
        step_s = (stamps[total] - stamps[first_timed]) / max(1, total - first_timed)
        per_step_tokens = sum(len(e.input_ids) for e in examples) / len(examples) * w.examples_per_step
        return {"step_s": round(step_s, 4), "tokens_per_s": round(per_step_tokens / step_s),
                "first_step_s": round(stamps[1] - t0, 2), "peak_gb": peak_gb(device),
                "losses": [round(x, 5) for x in stats.losses]}
    except torch.cuda.OutOfMemoryError:
        return {"error": "out of memory", "peak_gb": peak_gb(device)}
    except Exception as e:  # e.g. a compile failure: recorded in the report, the other measurements stand
        log.exception("bench train failed")
        return {"error": f"{type(e).__name__}: {str(e)[:300]}"}
    finally:
        peft_model.unload()
        reset_peak(device)


def time_generation(model, prompts: list[list[int]], params: SamplingParams, batch: int, cache: str,
                    stop_ids: list[int], device: torch.device, static_generate: bool = False,
                    compile_scope: str = "model") -> dict:
    """Wall time and new tokens/s of `HFEngine.generate_ids` (first-batch compile included in the wall time);
    `static_generate`: the static cache through transformers' generate instead of the engine's own loop;
    `compile_scope`: the loop's decode step compiled as one graph or per layer. The dynamic cache is stock
    generate; the static engine prefills each prompt once for its samples, as in a cell."""
    reset_peak(device)
    engine = HFEngine(model, None, batch_size=batch, cache=cache, shared_prefill=cache == "static",
                      static_generate=static_generate, compile_scope=compile_scope)
    sync(device)
    t0 = time.perf_counter()
    try:
        out = engine.generate_ids(prompts, params, stop_ids, pad_id=0, desc=f"bench generate ({cache})")
    except torch.cuda.OutOfMemoryError:
        return {"error": "out of memory", "peak_gb": peak_gb(device)}
    except Exception as e:  # e.g. a compile failure: recorded in the report, the other measurements stand
        log.exception("bench generate (%s) failed", cache)
        return {"error": f"{type(e).__name__}: {str(e)[:300]}"}
    sync(device)
    seconds = time.perf_counter() - t0
    tokens = sum(len(c) for cs in out for c in cs)
    res = {"seconds": round(seconds, 2), "new_tokens": tokens, "tokens_per_s": round(tokens / seconds),
           "batches": len(engine.batch_seconds), "batch_seconds": [round(s, 2) for s in engine.batch_seconds],
           "peak_gb": peak_gb(device)}
    if len(engine.batch_seconds) > 1:  # steady state: every batch after the first (which compiles)
        steady = sum(engine.batch_seconds[1:])
        res["steady_tokens_per_s"] = round(tokens * (len(engine.batch_seconds) - 1) / len(engine.batch_seconds) / steady)
    return res


def time_probe_states(model, prompts: list[list[int]], w: Workload, device: torch.device, batch: int = 64) -> dict:
    """Seconds to read the probe's features (`eval.hidden.masked_means` on each prompt's last token) for every eval
    prompt: what the latent probe costs per model of a cell with position=prompt_last."""
    from types import SimpleNamespace

    from marker_lab.eval.hidden import default_layer, masked_means

    encoded = [Encoded(p, [IGNORE] * (len(p) - 1) + [p[-1]]) for p in prompts]
    layer = default_layer(model)
    with torch.no_grad():
        masked_means(model, SimpleNamespace(pad_token_id=0), encoded[:batch], layer, batch)  # warm-up
        sync(device)
        t0 = time.perf_counter()
        states = masked_means(model, SimpleNamespace(pad_token_id=0), encoded, layer, batch)
        sync(device)
    return {"prompts": len(prompts), "layer": layer, "seconds": round(time.perf_counter() - t0, 3),
            "hidden": states.shape[1]}


def environment(device: torch.device) -> dict:
    import peft
    import transformers

    env = {"device": str(device), "python": platform.python_version(), "torch": torch.__version__,
           "transformers": transformers.__version__, "peft": peft.__version__}
    if device.type == "cuda":
        env.update(gpu=torch.cuda.get_device_name(device), cuda=torch.version.cuda,
                   gpu_memory_gb=round(torch.cuda.get_device_properties(device).total_memory / 2**30, 1))
    return env


def save_report(report: dict, out: Path | None) -> None:
    if out is not None:
        from marker_lab.results.contract import write_json_atomic

        write_json_atomic(out, report)
