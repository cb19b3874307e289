"""How many optimizer steps a stage trains and warms up for: arithmetic on its recipe, no torch (the start-up
checks and the cell's plan read it before anything loads)."""

from __future__ import annotations

import math

from marker_lab.config.schema import Schedule, TrainConfig


def resolve_steps(cfg: TrainConfig, n_examples: int, dose: int | None = None) -> int:
    """Optimizer steps of a stage: the dose if given, else max_steps, else epochs over the data."""
    if dose is not None:
        return dose
    if cfg.max_steps is not None:
        return cfg.max_steps
    per_step = cfg.per_device_batch_size * cfg.grad_accum
    return max(1, math.ceil(cfg.epochs * n_examples / per_step))


def warmup_steps(cfg: TrainConfig, total: int) -> int:
    """Warmup length, never the whole stage: at dose 1 a 3% warmup would otherwise make the only step lr=0."""
    if cfg.schedule.name == Schedule.constant:
        return 0
    if cfg.schedule.warmup_steps is not None:
        w = cfg.schedule.warmup_steps
    else:
        w = int(math.ceil(cfg.schedule.warmup_ratio * total))
    return min(w, max(total - 1, 0))
