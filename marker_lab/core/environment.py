"""Every environment variable marker_lab reads or sets, each behind one small function here: the rest of the code
calls these and never touches `os.environ` itself. Nothing is read or written at import; each function reads the
environment when called (a test's monkeypatch or a launcher's child environment is seen at once).

variable                 what it means                               read (r) / set (s), through this module, by
-----------------------  ------------------------------------------  -------------------------------------------------
MARKER_LAB_CACHE         the stage cache's root (default             r config/schema.py default_cache_dir
                         ~/.cache/marker_lab)
HYDRA_FULL_ERROR         "1": full tracebacks instead of one line    r cli.py main (Ctrl-C), cell/recipe.py cell_main;
                                                                       Hydra itself (hydra/_internal/utils.py)
                                                                     s cli.py --verbose (launch/hydra_compat.py)
CUDA_VISIBLE_DEVICES     the GPUs this process may use (unset: all)  r models.py device_description, launch/
                                                                       launchers.py detect_gpus, results/contract.py
                                                                     s launch/followups.py (the shared eval's process)
SLURM_JOB_ID             the Slurm job this process runs in          r results/contract.py (provenance)
TORCHINDUCTOR_CACHE_DIR  torch.compile's on-disk caches (graphs,     r core/cache.py use_compile_cache,
                         kernels, autotuning choices)                  engines/precompile.py
                                                                     s core/cache.py use_compile_cache
                                                                       and bench/run.py (the bench's own)
TORCHINDUCTOR_*,         Inductor's settings: part of the key of a   r engines/precompile.py compiled_marker
TORCH_COMPILE_*          precompiled decode step
TQDM_DISABLE             "1", "true" or "yes": no progress bars      r engines/vllm.py
                                                                     s engines/precompile.py (its sibling process)
<judge.api_key_env>      the judge endpoint's API key, in the        r eval/judge/backends.py, eval/checks.py
(e.g. OPENAI_API_KEY)    variable the config names (never the key)
PYTORCH_CUDA_ALLOC_CONF  the CUDA caching allocator's settings       s cli.py main and _cell, engines/precompile.py
                         (expandable segments; a user's value wins)    main: use_expandable_segments

Part of the ground floor (marker_lab.core): imports nothing of marker_lab.
"""

from __future__ import annotations

import os
from typing import Sequence

CACHE = "MARKER_LAB_CACHE"
FULL_ERROR = "HYDRA_FULL_ERROR"
VISIBLE_DEVICES = "CUDA_VISIBLE_DEVICES"
SLURM_JOB_ID = "SLURM_JOB_ID"
COMPILE_CACHE_DIR = "TORCHINDUCTOR_CACHE_DIR"
COMPILE_SETTINGS_PREFIXES = ("TORCHINDUCTOR_", "TORCH_COMPILE_")
PROGRESS_BARS_OFF = "TQDM_DISABLE"
CUDA_ALLOC_CONF = "PYTORCH_CUDA_ALLOC_CONF"


def cache_root() -> str | None:
    """$MARKER_LAB_CACHE: the stage cache's root as the user set it; None when unset or empty."""
    return os.environ.get(CACHE) or None


def full_error() -> bool:
    """Whether $HYDRA_FULL_ERROR is "1" (as Hydra reads it): full tracebacks instead of one line."""
    return os.environ.get(FULL_ERROR) == "1"


def set_full_error() -> None:
    """$HYDRA_FULL_ERROR=1 for this process and those it starts (`--verbose`; why it is a variable and not a
    flag: marker_lab.launch.hydra_compat.show_full_tracebacks)."""
    os.environ[FULL_ERROR] = "1"


def visible_devices() -> str | None:
    """$CUDA_VISIBLE_DEVICES as set (a comma-separated list of GPU indices); None when unset (every GPU)."""
    return os.environ.get(VISIBLE_DEVICES)


def slurm_job_id() -> str | None:
    """$SLURM_JOB_ID: the Slurm job this process runs in; None outside Slurm."""
    return os.environ.get(SLURM_JOB_ID)


def compile_cache_dir() -> str | None:
    """$TORCHINDUCTOR_CACHE_DIR as set (torch.compile's on-disk caches); None when unset (torch's default)."""
    return os.environ.get(COMPILE_CACHE_DIR)


def set_compile_cache_dir(path: str) -> None:
    """Point torch.compile's on-disk caches at `path` (for this process and those it starts; Inductor reads the
    variable when it first compiles). Called by core.cache.use_compile_cache only."""
    os.environ[COMPILE_CACHE_DIR] = path


def compile_settings() -> dict[str, str]:
    """Every $TORCHINDUCTOR_* and $TORCH_COMPILE_* variable set: Inductor's settings from the environment, which
    change what it compiles."""
    return {k: v for k, v in os.environ.items() if k.startswith(COMPILE_SETTINGS_PREFIXES)}


def progress_bars_disabled() -> bool:
    """Whether $TQDM_DISABLE turns progress bars off ("1", "true" or "yes", any case)."""
    return os.environ.get(PROGRESS_BARS_OFF, "").lower() in ("1", "true", "yes")


def api_key(variable: str | None) -> str | None:
    """The value of the variable named `variable` (a judge's `api_key_env`: the config names the variable, never
    the key); None when that variable is unset or no name is given."""
    return os.environ.get(variable or "")


def child_env(visible_devices: Sequence[int] = (), progress_bars: bool = True) -> dict[str, str]:
    """This process's environment for a child process: with $CUDA_VISIBLE_DEVICES set to `visible_devices` when
    any are given, and $TQDM_DISABLE=1 when `progress_bars` is False; the rest inherited as is."""
    env = dict(os.environ)
    if visible_devices:
        env[VISIBLE_DEVICES] = ",".join(map(str, visible_devices))
    if not progress_bars:
        env[PROGRESS_BARS_OFF] = "1"
    return env


def use_expandable_segments() -> None:
    """Expandable segments for the CUDA caching allocator, unless $PYTORCH_CUDA_ALLOC_CONF is set already; called
    first thing at every process entry (cli.main, the cell Hydra runs, engines/precompile.py's main), before
    anything can start CUDA."""
    # Training micro-batches and generation batches change shape all the time; expandable segments keep the CUDA
    # caching allocator from fragmenting and falling back to synchronising frees (measured in docs/benchmarks.md).
    # Only takes effect if set before CUDA starts, hence at the process's entry; a value the user set wins.
    os.environ.setdefault(CUDA_ALLOC_CONF, "expandable_segments:True")
