"""What a running sweep says: where each cell's log is, a line per finished cell with its headline rates, the
sweep's progress (done / running / failed, ETA), and at the end where the tables, report and figures went."""

from __future__ import annotations

import logging
import time
from pathlib import Path

from marker_lab.results.contract import RESULT_FILE, load_result

log = logging.getLogger("marker_lab.launch")


def headline(cell_dir: Path) -> str:
    """The finished cell's headline: the source's and the assistant's marker rate (or the first k/n metric)."""
    result = load_result(Path(cell_dir) / RESULT_FILE)
    if result is None:
        return "no result"
    metrics = result.metrics
    name = "marker" if "marker" in metrics else next((m for m, body in metrics.items()
                                                       if any("k" in c for c in body.get("per_persona", {}).values())), None)
    if name is None:
        return ", ".join(sorted(metrics)) or "no metrics"
    per = metrics[name]["per_persona"]
    source = result.cell.source_persona
    assistant = result.resolved_config["persona_set"]["assistant"]
    shown = [f"{p} {100 * per[p]['rate']:.1f}%" for p in dict.fromkeys((source, assistant)) if p in per]
    return f"{name}: " + (", ".join(shown) or f"{len(per)} personas")


class SweepProgress:
    """Counts a sweep's cells as they start and end, and logs each event with the sweep's progress."""

    def __init__(self, sweep_dir: Path, total: int, already: int, parallel: int):
        self.sweep_dir, self.total, self.parallel = Path(sweep_dir), total, max(1, parallel)
        self.done, self.failed, self.running = already, 0, 0
        self.seconds: list[float] = []  # run time of each cell finished by this command
        self.t0 = time.monotonic()

    def started(self, index: int, where: str, overrides: str, pid: str, subdir: str) -> None:
        self.running += 1
        log.info("\t#%d on %s: %s (pid %s)\n\t   log: %s", index, where, overrides, pid,
                 self.sweep_dir / subdir / "run.log")

    def finished(self, index: int, where: str, seconds: float, subdir: str, why: str | None = None) -> None:
        self.running -= 1
        self.seconds.append(seconds)
        if why is None:
            self.done += 1
            log.info("\t#%d done on %s after %.0f s: %s  %s", index, where, seconds,
                     headline(self.sweep_dir / subdir), self.status())
        else:
            self.failed += 1
            log.error("\t#%d FAILED on %s after %.0f s: %s  %s", index, where, seconds, why, self.status())

    def status(self) -> str:
        left = self.total - self.done - self.failed
        eta = ""
        if self.seconds and left:
            per_cell = sum(self.seconds) / len(self.seconds)
            eta = f", ETA ~{max(1, round(per_cell * -(-left // self.parallel) / 60))} min"
        return f"[{self.done}/{self.total} done, {self.running} running, {self.failed} failed{eta}]"

    def summary(self, aggregated: bool) -> None:
        out = self.sweep_dir / "aggregate"
        log.info("sweep %s: %d of %d cells complete, %d failed, %.0f s%s", self.sweep_dir, self.done, self.total,
                 self.failed, time.monotonic() - self.t0,
                 f"\n\ttables: {out}\n\treport: {out / 'report.md'}\n\tfigures: {out / 'figures'}" if aggregated else "")
