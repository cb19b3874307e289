"""`hydra/sweeper=grid`: Hydra's basic sweeper over a union of grids.

The write-ups' grids are not one Cartesian product (000: c1, c2, c3, c5 x 3 seeds plus c4 x 1 seed), so a
preset lists several grids under `hydra.sweeper.grids`; the cells of all of them run once each. Plain Hydra
sweep overrides on the command line still work and replace that key in every grid.
"""

from __future__ import annotations

import sys
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional

from hydra.core.utils import JobStatus
from omegaconf import OmegaConf

from marker_lab.config.constraints import check_settings
from marker_lab.config.schema import GridSweeperConfig
from marker_lab.core.errors import ConfigError
from marker_lab.launch.hydra_compat import BasicSweeper, job_error
from marker_lab.launch.lock import SweepBusy, SweepLock


class GridSweeper(BasicSweeper):
    def __init__(self, max_batch_size: Optional[int] = None, params: Optional[Dict[str, str]] = None,
                 grids: Optional[List[Dict[str, Any]]] = None) -> None:
        super().__init__(max_batch_size=max_batch_size, params=params)
        self.grids = [{k: str(v) for k, v in g.items()} for g in (grids or [])]

    def sweep(self, arguments: List[str]) -> Any:
        assert self.config is not None and self.launcher is not None
        try:  # its own settings, as every setting: one line before anything is planned
            check_settings(GridSweeperConfig(max_batch_size=self.max_batch_size, params=dict(self.params or {}),
                                             grids=self.grids), "hydra.sweeper.")
        except ConfigError as e:
            print(f"marker-lab: config error: {e}", file=sys.stderr)
            raise SystemExit(2) from None
        cells = union_of_grids(self.grids, arguments, {k: str(v) for k, v in self.params.items()})
        self.overrides = list(self.split_overrides_to_chunks(cells, self.max_batch_size))
        sweep_dir = Path(self.config.hydra.sweep.dir)
        with holding(sweep_dir):  # one command per sweep directory
            returns, initial_job_idx = [], 0
            while not self.is_done():
                batch = self.get_job_batch()
                returns.append(self.launcher.launch(batch, initial_job_idx=initial_job_idx))
                initial_job_idx += len(batch)
            OmegaConf.save(self.config, sweep_dir / "multirun.yaml")  # once cells ran: Hydra's record of the sweep
        failed = [r for batch in returns for r in batch if r.status == JobStatus.FAILED]
        if failed:  # one summary line and each failed cell's log, instead of a traceback per cell
            total = sum(len(batch) for batch in returns)
            print(f"marker-lab: {len(failed)} of {total} cells failed in {sweep_dir} (marker-lab status {sweep_dir}):",
                  file=sys.stderr)
            for r in failed:
                print(f"  {r.working_dir}: {' '.join(str(job_error(r)).split())[:300]}", file=sys.stderr)
            raise SystemExit(1)
        return returns


@contextmanager
def holding(sweep_dir: Path) -> Iterator[None]:
    """The sweep directory's lock for the block (one line and exit 1 when another command holds it, 2 when the
    directory cannot be written). However the block ends, the lock is released, then its files removed when
    nothing was planned (a config error), so a refused command leaves nothing behind."""
    lock = SweepLock(sweep_dir)
    with ExitStack() as held:
        try:
            held.enter_context(lock)
        except SweepBusy as e:
            print(f"marker-lab: {e}", file=sys.stderr)
            raise SystemExit(1) from None
        except OSError as e:  # a read-only file system, no permission, a file where the directory should be
            print(f"marker-lab: hydra.sweep.dir={sweep_dir}: cannot write the sweep there ({e.strerror})",
                  file=sys.stderr)
            raise SystemExit(2) from None
        try:
            yield
        finally:
            held.close()  # released first; then its files, if the sweep left no manifest
            if not (sweep_dir / "manifest.json").is_file():
                lock.remove_files()


def union_of_grids(grids: List[dict], cli_arguments: List[str], params: dict) -> List[List[str]]:
    """Cells of several grids, deduplicated, in order. A key swept on the command line replaces that key in
    every grid; keys only on the command line apply to all."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parser = OverridesParser.create()
    cli = parser.parse_overrides(cli_arguments)
    cli_keys = {o.get_key_element() for o in cli}
    cells, seen = [], set()
    for grid in grids or [{}]:
        conf = [f"{k}={v}" for k, v in {**params, **grid}.items() if k not in cli_keys]
        for cell in BasicSweeper.split_arguments(parser.parse_overrides(conf) + cli, None)[0]:
            key = tuple(sorted(cell))
            if key not in seen:
                seen.add(key)
                cells.append(cell)
    return cells
