"""The training recipe's start-up checks. Kept apart from the loop (sft.py) and free of torch, so a config error
answers in about a second instead of after the heavy imports."""

from __future__ import annotations

from marker_lab.config.schema import ATTENTION, Schedule, TrainConfig
from marker_lab.core.errors import ConfigError



def check_train(key: str, t: TrainConfig, device: str = "auto", weights: str = "float32") -> None:
    """A stage's training recipe (the TrainConfig at config key `key`) that this loop can run as written, on
    `device` (cfg.device; "auto" is checked by check_train_device once resolved) with `weights` (model.dtype)."""
    if t.lora is None:
        raise ConfigError(f"{key}.lora: stages train LoRA adapters; set r/alpha/dropout/target_modules")
    for name in ("per_device_batch_size", "grad_accum", "max_seq_len"):
        if getattr(t, name) < 1:
            raise ConfigError(f"{key}.{name}: must be >= 1, got {getattr(t, name)}")
    if t.micro_batch_tokens is not None and t.micro_batch_tokens < 1:
        raise ConfigError(f"{key}.micro_batch_tokens: must be >= 1 (or null), got {t.micro_batch_tokens}")
    if t.pack and t.micro_batch_tokens is None:
        raise ConfigError(f"{key}.pack: packs micro-batches of {key}.micro_batch_tokens tokens; set that too")
    if t.attention is not None and t.attention not in ATTENTION:
        raise ConfigError(f"{key}.attention: one of {', '.join(ATTENTION)} (or null), got {t.attention!r}")
    if t.attention == "varlen" and not t.pack:
        raise ConfigError(f"{key}.attention=varlen: attends within each example of a packed row; set {key}.pack=true "
                          f"(and {key}.micro_batch_tokens)")
    if device != "auto":  # an explicit device answers now; "auto" once resolved (run_cell)
        check_train_device(key, t, device.split(":")[0], weights)
    if t.max_steps is not None and t.max_steps < 1:
        raise ConfigError(f"{key}.max_steps: must be >= 1 (or null to use epochs), got {t.max_steps}")
    if t.optimizer.lr <= 0:
        raise ConfigError(f"{key}.optimizer.lr: must be > 0, got {t.optimizer.lr}")
    if t.kl_to_input < 0:
        raise ConfigError(f"{key}.kl_to_input: must be >= 0 (0 = off), got {t.kl_to_input}")
    if len(t.optimizer.betas) != 2:
        raise ConfigError(f"{key}.optimizer.betas: needs two values, got {list(t.optimizer.betas)}")
    if not 0 <= t.schedule.warmup_ratio < 1:
        raise ConfigError(f"{key}.schedule.warmup_ratio: must be in [0, 1), got {t.schedule.warmup_ratio}")
    if t.schedule.name == Schedule.constant and (t.schedule.warmup_steps or t.schedule.warmup_ratio):
        raise ConfigError(f"{key}.schedule: 'constant' has no warmup; use constant_with_warmup")


def check_train_device(key: str, t: TrainConfig, device_type: str, weights: str) -> None:
    """The checks that need the device the cell runs on (cfg.device=auto is known only once torch looks), run before
    the model loads. `weights` is model.dtype."""
    if t.attention == "flex_attention" and device_type == "cpu":
        raise ConfigError(f"{key}.attention=flex_attention with device=cpu: flex attention has no backward on CPU; "
                          "use sdpa (null) there")
    if t.fp8_base and device_type == "cuda":
        import torch  # here only: the device is resolved, so torch is loaded already

        if torch.cuda.is_available() and torch.cuda.get_device_capability() < (8, 9):
            raise ConfigError(f"{key}.fp8_base: FP8 matrix multiplies need compute capability 8.9 or newer (Ada, "
                              f"Hopper); this GPU has {torch.cuda.get_device_capability()}")
        if not t.bf16 and weights not in ("bfloat16", "float16"):  # row-wise _scaled_mm writes bf16/fp16 only
            raise ConfigError(f"{key}.fp8_base on CUDA writes bf16 or fp16 products: set {key}.bf16=true or "
                              f"model.dtype=bfloat16 (model.dtype is {weights})")
    if t.attention == "varlen" and device_type == "cuda" and not t.bf16 and weights not in ("bfloat16", "float16"):
        raise ConfigError(f"{key}.attention=varlen on CUDA runs flash's varlen kernel, which takes bf16 or fp16: set "
                          f"{key}.bf16=true or model.dtype=bfloat16 (model.dtype is {weights}), or attention=null")
