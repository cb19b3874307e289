"""A trained cell: its plan, its record (everything but the sampled eval) and how to rebuild its final model.

In the cell's own process it carries the model itself; read back from a cell directory (pending_eval.json, a sweep
with engine_per=base) it carries what rebuilds it: the base model's identity and the adapters attached to it.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

from omegaconf import OmegaConf

from marker_lab.cell.plan import CellPlan, plan_cell
from marker_lab.config.schema import Config
from marker_lab.core.cache import CHECKSUMS, verify_entry
from marker_lab.core.errors import MarkerLabError
from marker_lab.eval.checks import eval_names
from marker_lab.eval.metrics import Reads, metrics_reading
from marker_lab.eval.plan import GenerationPlan, generation_plan
from marker_lab.results import contract
from marker_lab.results.contract import AttachedAdapter, PendingEval, is_current


@dataclass
class TrainedCell:
    """A cell whose stages, readouts and model metrics are done, waiting for its sampled eval."""
    plan: CellPlan
    pending: PendingEval  # its record and the adapters that rebuild its model (pending_eval.json when deferred)
    loaded: object | None = None  # its final model (models.LoadedModel), in the process that trained it
    precompile: object | None = None  # the sibling that compiled its eval's decode step (engines/precompile.py)

    @property
    def dir(self) -> Path:
        return self.plan.out_dir

    @property
    def sampled_metrics(self) -> list[str]:
        return metrics_reading(self.plan.cfg.eval.metrics, Reads.completions)

    @cached_property
    def generation(self) -> GenerationPlan:
        return generation_plan(self.plan.cfg, self.plan.inputs, eval_names(self.plan.cfg, self.plan.inputs))

    def describe_eval(self) -> str:
        return (f"{len(eval_names(self.plan.cfg, self.plan.inputs))} personas x "
                f"{len(self.plan.inputs.questions['eval.questions'])} questions")


def read_trained(cell_dir: Path, pending: PendingEval | None) -> TrainedCell:
    """A deferred cell read back from its directory and its pending record (None: missing or unreadable), checked:
    its config and every input unchanged since it trained (MarkerLabError with the reason otherwise)."""
    if pending is None:
        raise MarkerLabError(f"{cell_dir / contract.PENDING_FILE}: damaged or of another schema; rerun the sweep")
    saved = OmegaConf.load(cell_dir / "config.yaml")  # the resolved config the cell ran with
    currency = is_current(pending.partial, contract.config_hash(OmegaConf.to_container(saved, resolve=True)))
    if not currency.current:
        raise MarkerLabError(f"{cell_dir}: stale ({currency.reason}); rerun the sweep to train it again")
    return TrainedCell(plan_cell(OmegaConf.merge(OmegaConf.structured(Config), saved)), pending)


class DamagedAdapter(MarkerLabError):
    """A cell's cached adapter no longer matches its build checksums: the cell must train again."""


def checked_adapter(adapter: AttachedAdapter) -> Path:
    """The adapter's directory, after its cache entry's files were checked against their build checksums (a
    pre-baked adapter's file was checked with the cell's inputs)."""
    entry = Path(adapter.entry)
    if (entry / CHECKSUMS).is_file():
        problem = verify_entry(entry)
        if problem:
            raise DamagedAdapter(f"adapter {adapter.path} is damaged ({problem}); rerun the sweep to rebuild it")
    return Path(adapter.path)
