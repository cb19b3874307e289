"""Compile the static engine's decode step before the eval needs it, in a process of its own.

A cell's first eval on a fresh machine spends ~35 s compiling its decode step (7B, one H200; docs/benchmarks.md).
What it compiles depends on the architecture, the precision and the request's shapes, not on the weights. So a
sibling process builds the same architecture with random weights on the same GPU, runs the eval's first batch
for two decode steps, and leaves the graphs and kernels in the compile cache the cell uses
(core.cache.use_compile_cache), while the cell's stages train. The eval then loads them, as a sweep's later cell
does. It costs a second copy of the weights and the eval's KV cache on the GPU while the stages train
(`eval.engine.precompile`, off by default).

    python -m marker_lab.engines.precompile request.json [parent pid]    # what `start` runs
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from marker_lab.core import environment
from marker_lab.core.files import atomic_write_bytes, sha256_file, sha256_json, write_json_atomic

log = logging.getLogger(__name__)
WARM_UP_STEPS = 2  # new tokens: the step compiles on its first call (what reaches the disk cache)
DECODE_SOURCES = ("static_decode.py", "attention.py", "hf.py")  # our code in the compiled step: part of the marker


@dataclass
class DecodeRequest:
    """Everything the sibling needs to compile the eval's decode step as the cell will (a json file)."""
    model_config: dict  # the eval model's transformers config (config.to_dict())
    dtype: str  # torch dtype name of the weights: bfloat16 | float16 | float32
    attn_implementation: str  # the model's (config._attn_implementation): sdpa, eager, ...
    requires_grad: bool  # the weights' flag at eval time (False once a stage's adapter is merged in)
    device: str  # where the cell's model is: cuda, cuda:1, ...
    prompts: list[list[int]]  # the request's prompt token ids (their count and lengths set the batch shapes)
    n: int  # samples per prompt
    temperature: float
    top_p: float
    max_tokens: int  # the completion length: with the prompt width, the KV cache's length
    stop_ids: list[int]
    pad_id: int
    batch_size: int  # eval.engine.batch_size
    compile_scope: str  # eval.engine.compile_scope


class Precompile:
    """A running sibling: `wait` for it before the eval (else both compile the same step at once)."""

    def __init__(self, process: subprocess.Popen, log_path: Path):
        self.process, self.log_path, self.started = process, log_path, time.perf_counter()
        self.cache_counts_at_wait: tuple[int, int] | None = None  # Inductor's FX graph cache (hits, misses)

    def wait(self, timeout: float = 600.0) -> bool:
        """Wait for the sibling to exit (stopping it after `timeout` s); True when it compiled the step. A failed
        sibling costs nothing but its time: the eval then compiles the step itself."""
        t0 = time.perf_counter()
        self.cache_counts_at_wait = _fx_cache_counts()
        try:
            rc = self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            rc = self.process.wait()
        waited = time.perf_counter() - t0
        if rc == 0:
            log.info("precompile: the eval's decode step was compiled in a sibling process (waited %.1f s for it; "
                     "its log: %s)", waited, self.log_path)
        else:
            log.warning("precompile: the sibling process exited with %s after %.0f s (its log: %s); the eval "
                        "compiles its decode step itself", rc, time.perf_counter() - self.started, self.log_path)
        return rc == 0

    def log_cache_use(self) -> None:
        """After the eval: how many compiled graphs it took from the cache and how many it compiled anew (a miss:
        a graph the sibling did not make, such as a later request's)."""
        if self.cache_counts_at_wait is None:
            return
        hits, misses = (now - then for now, then in zip(_fx_cache_counts(), self.cache_counts_at_wait))
        log.info("precompile: the eval found %d compiled graphs in the cache and compiled %d anew", hits, misses)

    def stop(self) -> None:
        """Stop the sibling if it still runs (the cell failed before its eval)."""
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()


def _fx_cache_counts() -> tuple[int, int]:
    """This process's Inductor FX graph cache hits and misses so far."""
    from torch._dynamo.utils import counters

    return counters["inductor"]["fxgraph_cache_hit"], counters["inductor"]["fxgraph_cache_miss"]


def compiled_marker(request: DecodeRequest) -> Path | None:
    """Where a sibling that compiled `request` says so: a file in the compile cache ($TORCHINDUCTOR_CACHE_DIR; None
    when unset), named by the request, torch's and Triton's versions, the GPU's name, our decode code and
    Inductor's settings from the environment. A later cell whose eval asks the same finds it and starts no
    sibling; deleting the compile cache deletes it too."""
    import torch

    root = environment.compile_cache_dir()
    if not root:
        return None
    device = torch.device(request.device)
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:  # CPU builds of torch come without it
        triton_version = None
    here = Path(__file__).parent
    code = {name: sha256_file(here / name) for name in DECODE_SOURCES}
    settings = environment.compile_settings()
    key = sha256_json([asdict(request), torch.__version__, triton_version, gpu, code, settings])
    return Path(root) / "marker_lab_precompiled" / f"{key[:32]}.done"


def start(request: DecodeRequest, work_dir: Path) -> Precompile:
    """Start the sibling on `request` (written to `work_dir`, with its log); it inherits the environment, so it
    writes to this process's compile cache ($TORCHINDUCTOR_CACHE_DIR) and sees the same GPUs."""
    work_dir.mkdir(parents=True, exist_ok=True)
    spec, log_path = work_dir / "precompile_request.json", work_dir / "precompile.log"
    write_json_atomic(spec, asdict(request))
    with open(log_path, "w") as out:
        process = subprocess.Popen([sys.executable, "-m", "marker_lab.engines.precompile", str(spec), str(os.getpid())],
                                   stdout=out, stderr=subprocess.STDOUT, env=environment.child_env(progress_bars=False))
    log.info("precompile: compiling the eval's decode step in a sibling process (pid %d, log %s)",
             process.pid, log_path)
    return Precompile(process, log_path)


def compile_decode_step(request: DecodeRequest) -> None:
    """Build the request's architecture with random weights and run its first batch for WARM_UP_STEPS decode steps
    on the static engine: what the eval's first batch compiles, into the compile cache."""
    import torch
    from transformers import CONFIG_MAPPING, AutoModelForCausalLM

    from marker_lab.engines.base import SamplingParams
    from marker_lab.engines.hf import HFEngine

    arch = CONFIG_MAPPING[request.model_config["model_type"]].from_dict(request.model_config)
    device = torch.device(request.device)
    with device:  # random weights in place: their values do not change the compiled code
        model = AutoModelForCausalLM.from_config(arch, dtype=getattr(torch, request.dtype),
                                                 attn_implementation=request.attn_implementation)
    model.eval().requires_grad_(request.requires_grad)
    engine = HFEngine(model, None, request.batch_size, cache="static", compile_scope=request.compile_scope,
                      compile_devices=(device.type,))  # compiling is the point, on any device
    params = SamplingParams(n=request.n, temperature=request.temperature, top_p=request.top_p,
                            max_tokens=request.max_tokens)
    engine.generate_ids(request.prompts, params, request.stop_ids, request.pad_id, desc="precompile",
                        warm_up_steps=WARM_UP_STEPS)


def main(argv: list[str] | None = None) -> None:
    """`python -m marker_lab.engines.precompile request.json [parent pid]`: compile, then exit (at once when the
    parent, the cell, is gone)."""
    environment.use_expandable_segments()  # a process entry of its own: before anything starts CUDA
    args = argv or sys.argv[1:]
    path, parent = Path(args[0]), int(args[1]) if len(args) > 1 else os.getppid()
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s][%(name)s] %(message)s")
    t0 = time.perf_counter()
    _exit_with_parent(parent)
    request = DecodeRequest(**json.loads(path.read_text()))
    compile_decode_step(request)
    marker = compiled_marker(request)
    if marker is not None:
        atomic_write_bytes(marker, b"")
    log.info("decode step compiled in %.1f s (compile cache %s)%s", time.perf_counter() - t0,
             environment.compile_cache_dir() or "torch's default", _peak_memory(request.device))


def _exit_with_parent(parent: int) -> None:
    """End this process as soon as the cell that started it (pid `parent`) is gone, killed with SIGKILL say, also
    before this process got this far: a sibling left running would hold its share of the GPU from the next cell."""
    import threading

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(1)

    threading.Thread(target=watch, daemon=True).start()


def _peak_memory(device: str) -> str:
    """What the sibling took on the GPU at most (its cost to the cell beside it); empty on CPU."""
    import torch

    if torch.device(device).type != "cuda":
        return ""
    return f"; GPU memory allocated at peak {torch.cuda.max_memory_allocated(device) / 2**30:.1f} GiB"


if __name__ == "__main__":
    main()
