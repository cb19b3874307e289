"""Evals while a stage trains (`eval.during_training`): chosen metrics on chosen personas at chosen steps.

They run on the model in hand (the training LoRA, no reload), in eval mode, inside a forked RNG: the training run
draws exactly the random numbers it would draw without them, so its adapter is the same (tested). The series is
stored with the stage's cache entry and reported under `metrics_by_step` in run_result.json.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from typing import Callable

import torch

log = logging.getLogger(__name__)


@dataclass
class StepEval:
    """What a stage evaluates while it trains."""

    steps_for: Callable[[int], list[int]]  # a stage's total steps -> the steps to evaluate after (0: before training)
    run: Callable[[torch.nn.Module], dict]  # model -> metrics
    payload: dict  # everything the evals depend on: part of the stage's cache key


def eval_steps(fractions: list[float] | None, every_n_steps: int | None, total: int, include_start: bool) -> list[int]:
    """The steps of a `total`-step stage to evaluate at: each fraction of it (rounded up), every N, and the end."""
    steps = {math.ceil(round(f * total, 9)) for f in fractions or ()}  # round: 0.14 * 50 is 7.000000000000001
    if every_n_steps:
        steps.update(range(every_n_steps, total + 1, every_n_steps))
    if fractions or every_n_steps:
        steps.add(total)  # a series always ends where the stage ends
    if include_start:
        steps.add(0)
    return sorted(s for s in steps if 0 <= s <= total)


def evaluate_in_place(model: torch.nn.Module, step: int, fn: Callable[[torch.nn.Module], dict]) -> dict:
    """`fn(model)` in eval mode without touching the training RNG; the model's mode is restored after."""
    was_training = model.training
    device = next(model.parameters()).device
    t0 = time.perf_counter()
    accel = device.type != "cpu"
    with torch.random.fork_rng(devices=[device] if accel else [], device_type=device.type if accel else "cuda"):
        model.eval()
        try:
            metrics = fn(model)
        finally:
            model.train(was_training)
    log.info("eval during training at step %d: %.1f s", step, time.perf_counter() - t0)
    return {"step": step, "seconds": round(time.perf_counter() - t0, 3), "metrics": metrics}
