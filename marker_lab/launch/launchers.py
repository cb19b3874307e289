"""Sweep launchers on top of hydra-submitit-launcher, and a sweeper for unions of grids.

- `local_gpus`: one node. Cells run concurrently, each on its own GPU(s) through submitit's LocalExecutor
  `visible_gpus`; a cell waits while no GPU is free (submitit's LocalExecutor alone starts every job at once on
  the same GPUs). Without GPUs, `max_parallel` cells run at a time.
- `slurm`: submitit's Slurm array, then dependent (afterany) jobs submitted right after it: the shared eval when
  cells run with engine_per=base (shared_eval.py), then aggregation.

Both first compose and validate every cell (a typo in one cell of 60 fails before anything is submitted),
write the manifest, and skip cells whose complete result carries the same config hash. A cell that raises,
runs out of memory or is killed is recorded as failed; the others finish; aggregation runs anyway.
"""

from __future__ import annotations

import logging
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Sequence

from hydra.core.singleton import Singleton
from hydra.core.utils import JobReturn, JobStatus, filter_overrides
from hydra_plugins.hydra_submitit_launcher.submitit_launcher import BaseSubmititLauncher

from marker_lab.config.constraints import check_settings
from marker_lab.config.schema import LocalGpusLauncherConfig, SlurmLauncherConfig
from marker_lab.core import environment
from marker_lab.core.errors import ConfigError
from marker_lab.launch.followups import run_aggregation, run_shared_eval
from marker_lab.launch.hydra_compat import job_error
from marker_lab.launch.interrupt import ignoring_sigint, stop_after_interrupt
from marker_lab.launch.sweep_plan import PlannedCell, SweepConfigError, plan_cells, sweep_size, write_manifest
from marker_lab.launch.progress import SweepProgress
from marker_lab.results.contract import PENDING_FILE, RESULT_FILE, load_result

log = logging.getLogger(__name__)


def detect_gpus() -> list[int]:
    """GPU indices this process may use: CUDA_VISIBLE_DEVICES if set, else what nvidia-smi lists."""
    visible = environment.visible_devices()
    if visible is not None:
        return [int(x) for x in visible.split(",") if x.strip().isdigit()]
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=30).stdout
    except (FileNotFoundError, subprocess.TimeoutExpired):
        return []
    return [i for i, line in enumerate(out.splitlines()) if line.startswith("GPU ")]


def gpu_slots(gpus: list[int], gpus_per_cell: int) -> list[tuple[int, ...]]:
    """Disjoint groups of GPUs, one per concurrently running cell: never two cells on one GPU."""
    return [tuple(gpus[i:i + gpus_per_cell]) for i in range(0, len(gpus) - gpus_per_cell + 1, gpus_per_cell)]


def skipped_return(plan: PlannedCell, sweep_dir: Path) -> JobReturn:
    ret = JobReturn()
    ret.overrides = plan.overrides
    ret.working_dir = str(sweep_dir / plan.subdir)
    ret.status = JobStatus.COMPLETED
    ret.return_value = plan.config_hash
    return ret


def oom_kills() -> int | None:
    """How many processes the kernel's out-of-memory killer has killed in this cgroup (None where unreadable)."""
    for path in ("/sys/fs/cgroup/memory.events", "/sys/fs/cgroup/memory/memory.oom_control"):
        try:
            for line in Path(path).read_text().splitlines():
                if line.startswith("oom_kill "):
                    return int(line.split()[1])
        except (OSError, ValueError):
            continue
    return None


def how_it_ended(cell_dir: Path, error: BaseException, oom_before: int | None) -> str:
    """One line on why a cell has no result: its own last word if it recorded one, else what killed it."""
    from marker_lab.results.sweep import status_record

    status = status_record(cell_dir)
    if status.get("state") == "failed" and status.get("error"):
        return status["error"]
    oom_now = oom_kills()
    if oom_before is not None and oom_now is not None and oom_now > oom_before:
        return "killed by the kernel's out-of-memory killer (this cgroup's oom_kill count went up while it ran)"
    if status.get("state") == "running":
        return (f"its process (pid {status.get('pid')}) died without a word: signal 9 (SIGKILL), sent by kill -9 "
                "or by the kernel's out-of-memory killer")
    return f"{type(error).__name__}: {' '.join(str(error).split())[:300]}"


def failed_return(plan: PlannedCell, sweep_dir: Path, error: BaseException, why: str | None = None) -> JobReturn:
    from marker_lab.results import contract

    why = why or f"{type(error).__name__}: {error}"
    contract.write_cell_status(sweep_dir / plan.subdir, "failed", error=why)
    error = RuntimeError(why)
    ret = JobReturn()
    ret.overrides = plan.overrides
    ret.working_dir = str(sweep_dir / plan.subdir)
    ret.status = JobStatus.FAILED
    ret.return_value = error
    return ret


def _awaiting_eval(sweep_dir: Path, plans: list[PlannedCell]) -> list[PlannedCell]:
    return [pl for pl in plans if (sweep_dir / pl.subdir / PENDING_FILE).is_file()]


class _PlannedLauncher(BaseSubmititLauncher):
    """Shared steps: plan (validate, manifest, skip), then the subclass runs what is left."""

    def _plan(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> tuple[Path, list[PlannedCell]]:
        assert self.config is not None and self.hydra_context is not None
        sweep_dir = Path(str(self.config.hydra.sweep.dir))
        sweep_dir.mkdir(parents=True, exist_ok=True)
        try:
            check_settings(self._CONFIG(**{k: v for k, v in self.params.items() if k != "_target_"}),
                           "hydra.launcher.")
        except ConfigError as e:
            print(f"marker-lab: config error: {e}", file=sys.stderr)
            raise SystemExit(2) from None
        try:
            plans = plan_cells(self.hydra_context.config_loader, self.config, job_overrides, initial_job_idx)
        except SweepConfigError as e:
            print(f"marker-lab: config error: {e}", file=sys.stderr)
            raise SystemExit(2) from None
        write_manifest(sweep_dir, plans, self.LAUNCHER)
        todo = [p for p in plans if not p.complete]
        log.info("sweep %s: %d cells, %d already complete, %d to run", sweep_dir, len(plans), len(plans) - len(todo),
                 len(todo))
        log.info("sweep size: %s", sweep_size(plans))
        return sweep_dir, plans

    def _job_args(self, plan: PlannedCell) -> tuple:
        return (plan.overrides, "hydra.sweep.dir", plan.index, f"job_id_for_{plan.index}", Singleton.get_state())

    def _executor_params(self, exclude: set[str]) -> dict[str, Any]:
        return {k: v for k, v in self.params.items() if k not in exclude}


class LocalGpusLauncher(_PlannedLauncher):
    LAUNCHER = "local"  # the manifest's name for it
    _CONFIG = LocalGpusLauncherConfig

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        sweep_dir, plans = self._plan(job_overrides, initial_job_idx)
        p = self.params
        gpus = list(p["gpus"]) if p.get("gpus") is not None else detect_gpus()
        slots = gpu_slots(gpus, p["gpus_per_cell"]) if gpus else [()] * max(1, p["max_parallel"])
        if gpus and not slots:
            raise ValueError(f"hydra.launcher.gpus_per_cell={p['gpus_per_cell']} but only GPUs {gpus} are visible")
        log.info("local_gpus: %s", f"GPU slots {slots}" if gpus else f"{len(slots)} CPU cell(s) at a time")
        returns: dict[int, JobReturn] = {pl.index: skipped_return(pl, sweep_dir) for pl in plans if pl.complete}
        pending = [pl for pl in plans if not pl.complete]
        progress = SweepProgress(sweep_dir, len(plans), len(returns), len(slots))
        free = list(slots)
        running: list[tuple[Any, PlannedCell, tuple[int, ...], float, int | None]] = []  # job, cell, GPUs, start, OOM kills
        try:
            self._run_local(sweep_dir, p, pending, running, free, returns, progress)
        except KeyboardInterrupt:  # Ctrl-C: the running cells record where they stopped; one line names them
            stop_after_interrupt(sweep_dir, plans, running)
        waiting = _awaiting_eval(sweep_dir, plans)
        if waiting:
            run_shared_eval(sweep_dir, slots[0])
            for plan in waiting:  # no result now (still waiting, or sent back to training): the cell failed
                if load_result(sweep_dir / plan.subdir / RESULT_FILE) is None:
                    returns[plan.index] = failed_return(plan, sweep_dir, RuntimeError("no result from the shared eval"),
                                                        f"shared eval failed (see {sweep_dir / 'shared_eval.log'})")
        if p["aggregate"]:
            run_aggregation(sweep_dir)
        progress.summary(p["aggregate"])
        return [returns[pl.index] for pl in plans]

    def _run_local(self, sweep_dir: Path, p, pending: list, running: list, free: list, returns: dict,
                   progress: SweepProgress) -> None:
        """Start cells on free slots and collect the finished ones, until none is pending or running."""
        import submitit

        while pending or running:
            while pending and free:
                plan, slot = pending.pop(0), free.pop(0)
                executor = submitit.LocalExecutor(folder=str(sweep_dir / ".submitit" / str(plan.index)))
                executor.update_parameters(timeout_min=p["timeout_min"], gpus_per_node=len(slot),
                                           visible_gpus=slot, stderr_to_stdout=p["stderr_to_stdout"])
                with ignoring_sigint():  # the controller ignores Ctrl-C; the cell hears it and records its phase
                    job = executor.submit(self, *self._job_args(plan))
                progress.started(plan.index, f"GPU {','.join(map(str, slot))}" if slot else "CPU",
                                 " ".join(filter_overrides(plan.overrides)), job.job_id, plan.subdir)
                running.append((job, plan, slot, time.monotonic(), oom_kills()))
            time.sleep(p["poll_interval_s"])
            for item in [r for r in running if r[0].done()]:
                job, plan, slot, started, oom_before = item
                running.remove(item)
                free.append(slot)
                where = f"GPU {','.join(map(str, slot))}" if slot else "CPU"
                try:
                    ret = job.results()[0]
                    if ret.status == JobStatus.FAILED:  # the cell raised: Hydra caught it in the job
                        raise job_error(ret)
                    returns[plan.index] = ret
                    progress.finished(plan.index, where, time.monotonic() - started, plan.subdir)
                except Exception as e:  # raised, killed, out of memory, timed out: the cell failed, the sweep goes on
                    why = how_it_ended(sweep_dir / plan.subdir, e, oom_before)
                    progress.finished(plan.index, where, time.monotonic() - started, plan.subdir, why)
                    returns[plan.index] = failed_return(plan, sweep_dir, e, why)


class SlurmArrayLauncher(_PlannedLauncher):
    LAUNCHER = "slurm"
    _CONFIG = SlurmLauncherConfig

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        import submitit

        sweep_dir, plans = self._plan(job_overrides, initial_job_idx)
        returns: dict[int, JobReturn] = {pl.index: skipped_return(pl, sweep_dir) for pl in plans if pl.complete}
        todo = [pl for pl in plans if not pl.complete]
        ours = {"aggregate", "aggregate_time_min", "aggregate_mem_gb", "submitit_folder"}
        params = self._executor_params(ours)
        executor = submitit.AutoExecutor(folder=self.params["submitit_folder"], cluster="slurm")
        executor.update_parameters(**{("slurm_" + k if k not in _BASE_KEYS else k): v for k, v in params.items()
                                      if k != "max_num_timeout"})
        jobs = executor.map_array(self, *zip(*[self._job_args(pl) for pl in todo])) if todo else []
        array_id = jobs[0].job_id.split("_")[0] if jobs else None
        if jobs:
            log.info("slurm: array %s with %d cells", array_id, len(jobs))
        after = array_id
        if array_id and any(pl.engine_per == "base" for pl in todo):  # the shared eval, once the array ends
            ev = submitit.AutoExecutor(folder=str(sweep_dir / ".submitit" / "shared_eval"), cluster="slurm")
            # a cell's resources; its time limit once per cell, since it samples for every cell in turn
            ev.update_parameters(**{("slurm_" + k if k not in _BASE_KEYS else k): v for k, v in params.items()
                                    if k not in ("max_num_timeout", "array_parallelism", "name", "timeout_min")},
                                 timeout_min=params["timeout_min"] * len(todo), name="marker-lab-shared-eval",
                                 slurm_dependency=f"afterany:{array_id}")
            ev_job = ev.submit(_shared_eval_job, str(sweep_dir))
            log.info("slurm: shared eval job %s (afterany:%s)", ev_job.job_id, array_id)
            after = ev_job.job_id
        if self.params["aggregate"]:
            agg = submitit.AutoExecutor(folder=str(sweep_dir / ".submitit" / "aggregate"), cluster="slurm")
            agg_params = {"timeout_min": self.params["aggregate_time_min"], "mem_gb": self.params["aggregate_mem_gb"],
                          "slurm_partition": self.params.get("partition"), "name": "marker-lab-aggregate",
                          "slurm_setup": self.params.get("setup")}
            if after:
                agg_params["slurm_dependency"] = f"afterany:{after}"
            agg.update_parameters(**{k: v for k, v in agg_params.items() if v is not None})
            agg_job = agg.submit(_aggregate_job, str(sweep_dir))
            log.info("slurm: aggregation job %s (afterany:%s)", agg_job.job_id, after)
        for job, plan in zip(jobs, todo):
            try:
                ret = job.results()[0]
                if ret.status == JobStatus.FAILED:  # the cell raised: Hydra caught it in the job
                    raise job_error(ret)
                returns[plan.index] = ret
            except Exception as e:  # raised, OOM kill, timeout, preemption: recorded; the rest of the array goes on
                why = how_it_ended(sweep_dir / plan.subdir, e, None)
                log.error("cell #%d (%s) FAILED: %s", plan.index, job.job_id, why)
                returns[plan.index] = failed_return(plan, sweep_dir, e, why)
        return [returns[pl.index] for pl in plans]


_BASE_KEYS = {"timeout_min", "cpus_per_task", "gpus_per_node", "tasks_per_node", "mem_gb", "nodes", "name",
              "stderr_to_stdout"}


def _shared_eval_job(sweep_dir: str) -> str:
    """The Slurm job of the shared eval: the same process as on a local node (its GPUs are the job's)."""
    if not run_shared_eval(Path(sweep_dir)):
        raise RuntimeError(f"the shared eval left cells without a result (see {Path(sweep_dir) / 'shared_eval.log'})")
    return "shared eval complete"


def _aggregate_job(sweep_dir: str) -> str:
    from marker_lab.results.aggregate import aggregate

    return str(aggregate(Path(sweep_dir)))
