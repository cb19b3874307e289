"""Generation backends behind one interface (`base.GenerationEngine`), chosen by `eval.engine.name` in one place:
the `ENGINES` registry below. Each entry says how a cell's eval runs on it; the samplers live in cell/sample.py and
are imported when a cell samples (they need torch; this module, read by the start-up checks, does not)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from marker_lab.core.errors import ConfigError
from marker_lab.core.registry import Registry, load_object


@dataclass(frozen=True)
class EngineKind:
    """One generation backend, as a cell's eval uses it."""
    sampler: str  # "module:function" that samples a group of cells on one engine of this kind (cell/sample.py)
    merged_only: bool  # evaluates merged weights only (a stacked adapter cannot be served)
    saves_model: bool  # loads weights from disk: the eval writes the model it serves next to the result
    compiles_in_sibling: bool  # its decode step can compile in a sibling process while the stages train
    available: Callable[[], bool] = lambda: True  # whether its package is installed
    install: str = ""  # the command that installs it

    def load_sampler(self) -> Callable:
        return load_object(self.sampler)

    def check(self, key: str, merge_between_stages: bool) -> None:
        """ConfigError (one line naming `key`) when this engine cannot run here, before anything loads."""
        if not self.available():
            raise ConfigError(f"{key}: not installed ({self.install})")
        if self.merged_only and not merge_between_stages:
            raise ConfigError(f"merge_between_stages=false with {key}: this engine evaluates merged weights; use "
                              "merge_between_stages=true or the hf engine")


def _vllm_available() -> bool:
    from marker_lab.engines.vllm import available

    return available()


ENGINES: Registry[EngineKind] = Registry("eval.engine.name", "engine")
ENGINES.add("hf", EngineKind("marker_lab.cell.sample:sample_merging_each", merged_only=False, saves_model=False,
                             compiles_in_sibling=True))
ENGINES.add("vllm", EngineKind("marker_lab.cell.sample:sample_lora_requests", merged_only=True, saves_model=True,
                               compiles_in_sibling=False, available=_vllm_available,
                               install="vllm is not installed: pip install -e .[vllm]"))
