"""A cell's inputs: every file it reads, loaded and checked once, before any model loads, with its checksum.

`CellInputs.load(cfg, cache)` reads the persona set, the question files, the training datasets, the
multiple-choice split, the judge prompts and a pre-baked adapter, whichever the cell uses. A bad file is a one-line
ConfigError naming the config key, the file and (for row files) the line. The checksums go into the result
(`provenance.inputs`): a result whose inputs changed since is stale (results/contract.is_current), not current.
Stages and metrics take what they need from here instead of reading files again.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import yaml

from marker_lab.config.schema import Config, coupling_enabled, second_stage_enabled
from marker_lab.core.cache import StageCache
from marker_lab.core.errors import ConfigError
from marker_lab.core.files import dir_checksum, file_checksum, resolve_path, safetensors_problem
from marker_lab.data.chat_datasets import Dataset, load_dataset
from marker_lab.data.formats import SECOND_STAGE_FORMATS
from marker_lab.data.multiple_choice import MCSplit, configured_split
from marker_lab.data.personas import Persona, file_roles, load_personas
from marker_lab.data.questions import Question, load_questions

@dataclass(frozen=True)
class InputFile:
    """One file (or directory) a cell reads: the config key naming it, where it was, its checksum then."""
    key: str
    path: str  # absolute, so a result can be re-checked from any directory
    checksum: str

    def record(self) -> dict:
        return {"path": self.path, "checksum": self.checksum}


@dataclass(frozen=True)
class InputNeeds:
    """What a component of the cell reads besides the files the config names for every cell (a coupling kind:
    its questions, its datasets, the capability split)."""
    questions: dict[str, str] = field(default_factory=dict)  # config key -> question file
    datasets: dict[str, tuple] = field(default_factory=dict)  # config key -> as dataset_slots' values
    capability_split: bool = False  # reads the capability multiple-choice split

    def __or__(self, other: "InputNeeds") -> "InputNeeds":
        return InputNeeds({**self.questions, **other.questions}, {**self.datasets, **other.datasets},
                          self.capability_split or other.capability_split)


@dataclass
class CellInputs:
    """Everything a cell reads from files, loaded once (see the module docstring)."""
    personas: dict[str, Persona]
    sources: list[str]  # leakage sources: persona_set.sources, else the file's list
    bystanders: list[str]  # persona_set.bystanders, else the file's list, else every non-source
    questions: dict[str, list[Question]] = field(default_factory=dict)  # by config key: eval.questions, ...
    datasets: dict[str, Dataset] = field(default_factory=dict)  # by config key: second_stage.datasets.em, ...
    mc: MCSplit | None = None  # the capability split (capability metric, wrong_answers coupling)
    files: dict[str, InputFile] = field(default_factory=dict)  # every file read, by config key

    @classmethod
    def load(cls, cfg: Config, cache: StageCache, needs: InputNeeds = InputNeeds()) -> "CellInputs":
        """Read and check every input of `cfg`, and what `needs` adds (a ConfigError names the first bad one)."""
        files: dict[str, InputFile] = {}
        personas = _personas(cfg, files)
        sources, bystanders = _roles(cfg, personas)
        inputs = cls(personas, sources, bystanders, files=files)
        for key, path in {**question_files(cfg), **needs.questions}.items():
            inputs.questions[key] = _questions(key, path, files)
        for key, (ds, column, chat, needs_reply) in {**dataset_slots(cfg), **needs.datasets}.items():
            dataset = _dataset(key, ds, cache, column, chat, needs_reply)
            inputs.datasets[key] = dataset
            if dataset.path is not None:
                _record(files, key, dataset.path)
        if needs.capability_split:
            inputs.mc = _mc_split(cfg, files)
        for kind, path in judge_prompt_files(cfg).items():
            _require_file(f"judge.prompts.{kind}", path)
            _record(files, f"judge.prompts.{kind}", resolve_path(path))
        if coupling_enabled(cfg) and cfg.coupling.adapter_path:
            _record(files, "coupling.adapter_path", adapter_weights("coupling.adapter_path", cfg.coupling.adapter_path))
        return inputs

    def checksums(self) -> dict[str, dict]:
        """{config key: {path, checksum}} of every input file, as the result records them."""
        return {k: f.record() for k, f in sorted(self.files.items())}

    def checksums_of(self, *keys: str) -> dict[str, str | None]:
        """{config key: checksum} of some inputs, for a cache key: named by the key that names the file, the same
        everywhere (None for an input this cell does not read)."""
        return {f"{k} checksum": self.checksum(k) for k in keys}

    def checksum(self, key: str) -> str | None:
        """The checksum of the input at config key `key`; None when this cell does not read it."""
        return self.files[key].checksum if key in self.files else None

    def require_persona(self, key: str, name: str | None, cfg: Config) -> None:
        """A persona a config key names must be in the set (one line naming the key and the set)."""
        if name is not None and name not in self.personas:
            raise ConfigError(f"{key}: persona {name!r} is not in persona_set {cfg.persona_set.name!r} "
                              f"({cfg.persona_set.path}); known: {', '.join(self.personas)}")


def question_files(cfg: Config) -> dict[str, str]:
    """The question files this cell reads for its own settings (its metrics and coupling kind add theirs through
    InputNeeds), by config key."""
    out = {}
    if cfg.geometry.enabled and cfg.geometry.mode == "response_mean":
        out["geometry.questions"] = cfg.geometry.questions
    return out


def dataset_slots(cfg: Config) -> dict[str, tuple]:
    """The training datasets this cell reads: {config key: (DatasetConfig, the column read, whether it holds chats,
    whether each chat needs an assistant turn)}."""
    out = {}
    s = cfg.second_stage
    if second_stage_enabled(cfg) and s.data in s.datasets:
        ds = s.datasets[s.data]
        f = SECOND_STAGE_FORMATS.get(s.format)
        out[f"second_stage.datasets.{s.data}"] = (ds, f.column(ds), f.chats, f.needs_reply(s.train.loss_mode))
    return out


def data_shapes(cfg: Config, inputs: "CellInputs") -> dict[str, dict]:
    """What each training dataset of the cell holds and what is done with it (recorded in the result, logged): rows,
    rows opening with a system turn and how those are handled. Other shapes (roles but system / user / assistant, a
    system turn mid-conversation, a last user turn) stopped the cell at start-up (chat_datasets._check_chat)."""
    out = {}
    for key, dataset in inputs.datasets.items():
        shape = {"rows": len(dataset.rows)}  # after n_examples, which is a cap: a shorter file gives all its rows
        if key.startswith("second_stage.") and not SECOND_STAGE_FORMATS.get(cfg.second_stage.format).chats:
            shape["format"] = f"{cfg.second_stage.format} text"
        else:
            chats = dataset.column_values()
            shape["rows_with_system_turns"] = sum(1 for c in chats if c and c[0]["role"] == "system")
            if key.startswith("coupling."):
                shape["system_turns"] = "dropped: the persona's system prompt replaces them"
            elif cfg.second_stage.train.loss_mode == "full":
                shape["system_turns"] = "kept, and trained on (loss_mode=full)"
            else:
                shape["system_turns"] = f"kept, masked (no loss under loss_mode={cfg.second_stage.train.loss_mode})"
        out[key] = shape
    return out


def judge_prompt_files(cfg: Config) -> dict[str, str]:
    """The judge prompt files the cell's judged metrics read, by prompt kind."""
    from marker_lab.config.schema import JUDGED_PROMPTS

    d = cfg.eval.during_training
    used = list(cfg.eval.metrics) + (list(d.metrics) if (d.fractions or d.every_n_steps) else [])
    kinds = sorted({k for m in used for k in JUDGED_PROMPTS.get(m, ())})
    missing = [k for k in kinds if k not in cfg.judge.prompts]
    if missing:
        raise ConfigError(f"judge.prompts.{missing[0]}: missing (the prompt file for {missing[0]} scores)")
    return {k: cfg.judge.prompts[k] for k in kinds}


def _record(files: dict[str, InputFile], key: str, path: Path) -> None:
    real = Path(path).resolve()
    files[key] = InputFile(key, str(real), dir_checksum(real) if real.is_dir() else file_checksum(real))


def _require_file(key: str, path: str) -> Path:
    real = resolve_path(path)
    if real.is_dir():
        raise ConfigError(f"{key}: is a directory, not a file: {path}")
    if not real.is_file():
        raise ConfigError(f"{key}: {'is not a regular file' if real.exists() else 'file not found'}: {path}")
    return real


def _personas(cfg: Config, files: dict) -> dict[str, Persona]:
    try:
        personas = load_personas(cfg.persona_set.path)
    except (FileNotFoundError, ValueError, yaml.YAMLError) as e:
        raise ConfigError(f"persona_set.path: {' '.join(str(e).split())}") from None
    _record(files, "persona_set.path", resolve_path(cfg.persona_set.path))
    return personas


def _roles(cfg: Config, personas: dict[str, Persona]) -> tuple[list[str], list[str]]:
    try:
        file_sources, file_bystanders = file_roles(cfg.persona_set.path)
    except ValueError as e:
        raise ConfigError(f"persona_set.path: {e}") from None
    ps = cfg.persona_set
    sources = list(ps.sources or file_sources or [])
    bystanders = list(ps.bystanders or file_bystanders or [p for p in personas if p not in sources])
    return sources, bystanders


def _questions(key: str, path: str, files: dict) -> list[Question]:
    _require_file(key, path)
    try:
        questions = load_questions(path)
    except (FileNotFoundError, ValueError, yaml.YAMLError) as e:
        raise ConfigError(f"{key}: {' '.join(str(e).split())}") from None
    _record(files, key, resolve_path(path))
    return questions


def _dataset(key: str, ds, cache: StageCache, column: str, chat: bool, needs_reply: bool) -> Dataset:
    if ds is None:
        raise ConfigError(f"{key}: required (set path, hf_name or toy)")
    if sum(x is not None for x in (ds.path, ds.hf_name, ds.toy)) != 1:
        raise ConfigError(f"{key}: set exactly one of path, hf_name, toy")
    if ds.path is not None:
        _require_file(f"{key}.path", ds.path)
    try:
        return load_dataset(key, ds, cache, column, chat, needs_reply)
    except ConfigError:
        raise
    except Exception as e:  # noqa: BLE001 - `datasets` raises many kinds; all mean the same to the user
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(f"{key}: cannot load the dataset: {first}") from None


def _mc_split(cfg: Config, files: dict) -> MCSplit:
    c = cfg.eval.capability
    if c.source == "jsonl":
        if not (c.path and resolve_path(c.path).is_file()):
            raise ConfigError(f"eval.capability.path: file not found: {c.path}")
    try:  # the data itself, now: a typo in a dataset name or a malformed row fails here, not after training
        split = configured_split(c)
    except Exception as e:  # noqa: BLE001 - datasets raises many kinds; all mean the same to the user
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(f"eval.capability: cannot load the {c.source} multiple-choice data: {first}") from None
    if c.source == "jsonl":
        _record(files, "eval.capability.path", resolve_path(c.path))
    elif c.source == "hf" and Path(c.hf_name).is_dir():
        _record(files, "eval.capability.hf_name", Path(c.hf_name))
    return split


def adapter_weights(key: str, adapter_path: str) -> Path:
    """The weights file of a pre-baked peft adapter directory, checked whole (it cannot be rebuilt if damaged)."""
    root = resolve_path(adapter_path)
    if not root.is_dir():
        raise ConfigError(f"{key}: not a directory: {adapter_path}")
    configs = sorted(root.rglob("adapter_config.json"))
    if not configs:
        raise ConfigError(f"{key}: no adapter_config.json under {adapter_path}")
    weights = next(iter(sorted(configs[0].parent.glob("adapter_model.*"))), None)
    if weights is None:
        raise ConfigError(f"{key}: no adapter_model.* in {configs[0].parent}")
    problem = safetensors_problem(weights) if weights.suffix == ".safetensors" else None
    if problem:
        raise ConfigError(f"{key}: the pre-baked adapter is damaged and cannot be rebuilt: {problem}")
    return weights
