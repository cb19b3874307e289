"""What every setting may hold, declared where the setting is declared, and one check of the whole config.

Each field of the schema (config/schema.py) that holds a number, text, a list or a mapping is declared with
`setting(...)`, which puts a `Constraint` in the field's metadata:

    temperature: float = setting(1.0, ge=0, le=100, meaning={0: "greedy"})  # sampling temperature

`check_settings(cfg)` walks a composed config and checks every field against its constraint: one ConfigError naming
the key, the value and what is allowed, before any file or model is read (preflight runs it first, for a single run
and for every cell of a sweep). Booleans and choice fields are checked by OmegaConf at composition; `null` passes
wherever the schema allows it (an Optional field; its meaning is in the field's comment). The reference docs and the
schema fuzz test (tests/test_settings.py) read the same constraints.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from dataclasses import MISSING, dataclass
from typing import Any, Callable

from marker_lab.core.errors import ConfigError

INT64_MAX = 2 ** 63 - 1  # no count, step or size of ours goes beyond what torch's int64 holds
SEED_MAX = 2 ** 32 - 1  # numpy's and Python's seeding take seeds below 2**32 on every platform


class PathKind:
    """What a path setting must name (checked on the value as given: `pkg:`, `conf:` and `module:` resolved)."""
    FILE = "file"  # an existing regular file
    DIR = "dir"  # an existing directory
    FILE_OR_DIR = "file_or_dir"  # a file, or a directory (a saved `datasets` dataset)
    DIR_OR_HUB = "dir_or_hub"  # a local directory, or a Hugging Face Hub id (`org/name`; anything not path-like)
    OUTPUT_DIR = "output_dir"  # a directory we create: must not be an existing file
    DATA = "data"  # a data file or `datasets` directory: checked where a stage reads it (data/inputs.py), since a
    # preset may name datasets a cell does not use (sft's em and benign)


@dataclass(frozen=True)
class Constraint:
    """What one setting may hold. Numbers: a range (ge/gt/le/lt) and finiteness; text, lists and mappings: whether
    they may be empty; paths: what they must name; list items: a constraint of their own."""
    ge: float | None = None  # value >= ge
    gt: float | None = None  # value > gt
    le: float | None = None  # value <= le
    lt: float | None = None  # value < lt
    finite: bool = True  # numbers: NaN and +-inf refused
    empty: bool = False  # text, lists, mappings: may be empty (text: blank counts as empty)
    length: int | None = None  # lists: exactly this many items
    path: str | None = None  # a PathKind: the text names a file or directory that must be there
    regex: bool = False  # text: a regular expression that must compile
    match: str | None = None  # text: must match this regular expression whole
    one_of: tuple | None = None  # text: one of these values
    items: "Constraint | None" = None  # lists: the constraint of each item
    free: bool = False  # a mapping or text recorded as given and never interpreted (labels, notes)
    meaning: tuple = ()  # ((value, what it means), ...): values at the edge of the range that mean something special

    def describe(self) -> str:
        """The allowed values in words, as the reference docs and error messages say them."""
        parts = []
        rng = self.range_text()
        if rng:
            parts.append(rng)
        if self.one_of:
            parts.append("one of " + ", ".join(map(str, self.one_of)))
        if self.path:
            parts.append({"file": "an existing file", "dir": "an existing directory",
                          "file_or_dir": "an existing file or directory",
                          "dir_or_hub": "a local directory or a Hub id (org/name)",
                          "output_dir": "a directory (created if missing; not a file)",
                          "data": "a data file (or a `datasets` directory or Hub name for hf_name), checked when a "
                                  "stage uses it"}[self.path])
        if self.regex:
            parts.append("a regular expression that compiles")
        if self.match:
            parts.append(f"matching {self.match}")
        if self.length is not None:
            parts.append(f"exactly {self.length} items")
        if self.items is not None:
            parts.append(f"each item {self.items.describe()}")
        if not self.empty and not self.free and not rng and not (self.path or self.match or self.one_of):
            parts.append("not empty")
        if self.meaning:
            parts.append(", ".join(f"{v} means {m}" for v, m in self.meaning))
        return "; ".join(parts) or "any value"

    def range_text(self) -> str:
        """The numeric range in words: `>= 0`, `> 0 and <= 1` (an int64 bound is left unsaid)."""
        lo = ("[", self.ge) if self.ge is not None else ("(", self.gt) if self.gt is not None else None
        hi = (None if self.le == INT64_MAX else (self.le, "]") if self.le is not None
              else (self.lt, ")") if self.lt is not None else None)
        if lo and hi:
            return f"in {lo[0]}{_num(lo[1])}, {_num(hi[0])}{hi[1]}"
        if lo:
            return f"{'>=' if lo[0] == '[' else '>'} {_num(lo[1])}"
        if hi:
            return f"{'<=' if hi[1] == ']' else '<'} {_num(hi[0])}"
        return ""

    def problem(self, value: Any) -> str | None:
        """What is wrong with `value` (None: allowed)."""
        if value is None:
            return None
        if isinstance(value, bool):
            return None
        if isinstance(value, (int, float)):
            return self._number_problem(value)
        if isinstance(value, str):
            return self._text_problem(value)
        if isinstance(value, (list, tuple)):
            if not value and not self.empty:
                return "must not be empty"
            if self.length is not None and len(value) != self.length:
                return f"needs exactly {self.length} items, got {len(value)}"
            if self.items is not None:
                for i, item in enumerate(value):
                    why = self.items.problem(item)
                    if why:
                        return f"item {i} ({item!r}) {why}"
            return None
        if isinstance(value, dict):
            if not value and not (self.empty or self.free):
                return "must not be empty"
            if self.items is not None:
                for k, item in value.items():
                    why = self.items.problem(item)
                    if why:
                        return f"entry {k!r} ({item!r}) {why}"
            return None
        return None

    def _number_problem(self, x: float) -> str | None:
        if isinstance(x, float) and not math.isfinite(x):
            return "must be a finite number" if self.finite else None
        bad = ((self.ge is not None and not x >= self.ge) or (self.gt is not None and not x > self.gt)
               or (self.le is not None and not x <= self.le) or (self.lt is not None and not x < self.lt))
        if not bad:
            return None
        if self.le == INT64_MAX and x > INT64_MAX:
            return f"is beyond what a 64-bit integer holds (at most {INT64_MAX})"
        meaning = f" ({', '.join(f'{v} means {m}' for v, m in self.meaning)})" if self.meaning else ""
        return f"must be {self.range_text()}, got {_num(x)}{meaning}"

    def _text_problem(self, s: str) -> str | None:
        if self.free:
            return None
        if not s.strip():
            return None if self.empty else "must not be empty or blank"
        if s != s.strip() and self.path:
            return "has spaces at its start or end (a path with them is almost always a typo)"
        if self.match is not None and not re.fullmatch(self.match, s):
            return f"must match {self.match}"
        if self.one_of is not None and s not in self.one_of:
            return f"must be one of {', '.join(map(str, self.one_of))}"
        if self.regex:
            try:
                re.compile(s)
            except re.error as e:
                return f"is not a regular expression that compiles ({e})"
        if self.path:
            return _path_problem(s, self.path)
        return None


def _num(x: float) -> str:
    """A number as a message shows it: integers whole (a seed of 4294967296 is not 4.29497e+09)."""
    return str(x) if isinstance(x, int) else f"{x:g}"


def _path_problem(value: str, kind: str) -> str | None:
    from marker_lab.core.files import resolve_path

    try:
        real = resolve_path(value)
    except FileNotFoundError as e:
        if kind == PathKind.DIR_OR_HUB:  # a model's `module:` path: the model check names its install command
            return None
        return f"{value}: {e}"
    shown = value if str(real) == value else f"{value} ({real})"
    if kind == PathKind.FILE:
        if real.is_dir():
            return f"is a directory, not a file: {shown}"
        if not real.exists():
            return f"file not found: {shown}"
        if not real.is_file():
            return f"is not a regular file: {shown}"
        return None
    if kind == PathKind.DIR:
        return None if real.is_dir() else (f"is a file, not a directory: {shown}" if real.exists()
                                            else f"directory not found: {shown}")
    if kind == PathKind.FILE_OR_DIR:
        if not real.exists():
            return f"not found: {shown}"
        return None if (real.is_file() or real.is_dir()) else f"is not a regular file or directory: {shown}"
    if kind == PathKind.DIR_OR_HUB:
        if real.is_dir():
            return None
        if real.exists():
            return f"is not a directory: {shown} (name a local directory or a Hub id)"
        if _looks_local(value):
            return f"directory not found: {shown}"
        return None  # a Hub id: resolved where it loads (its own one-line error names the key)
    if kind == PathKind.DATA:
        return None  # checked where a stage reads it, with the file and line (data/inputs.py)
    if kind == PathKind.OUTPUT_DIR:
        if real.exists() and not real.is_dir():
            return f"is a file, not a directory: {shown}"
        existing = next(p for p in [real, *real.absolute().parents] if p.exists())  # what a mkdir would write into
        if not existing.is_dir():
            return f"cannot be created: {existing} is a file ({shown})"
        if not os.access(existing, os.W_OK | os.X_OK):  # a read-only file system answers this even for root
            return f"cannot be written: {existing} is read-only or not ours ({shown})"
        return None
    raise ValueError(kind)


def _looks_local(value: str) -> bool:
    """A path that can only mean the local disk (a Hub id is `name` or `org/name`, no leading / . ~)."""
    return value.startswith(("/", ".", "~", "pkg:", "conf:", "module:")) or value.count("/") > 1


def setting(default: Any = MISSING, *, factory: Callable[[], Any] | None = None, **constraint: Any) -> Any:
    """A schema field with its constraint (see Constraint's fields; `meaning` as a dict {value: what it means})."""
    if "meaning" in constraint:
        constraint["meaning"] = tuple(constraint["meaning"].items())
    meta = {"constraint": Constraint(**constraint)}
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def count(default: Any = MISSING, *, ge: int = 1, le: int = INT64_MAX, **kw: Any) -> Any:
    """An integer setting counting something (steps, examples, tokens): >= 1 unless said otherwise."""
    return setting(default, ge=ge, le=le, **kw)


def rng_seed(default: Any = MISSING, **kw: Any) -> Any:
    """A random seed: what every RNG we seed accepts (0 .. 2**32 - 1)."""
    return setting(default, ge=0, le=SEED_MAX, **kw)


def label(default: Any = MISSING, **kw: Any) -> Any:
    """Text that names something in logs and results, never interpreted: any non-empty text."""
    return setting(default, **kw)


def constraint_of(f: dataclasses.Field) -> Constraint | None:
    """The constraint declared on a schema field (None: a bool or choice field, checked by OmegaConf)."""
    return f.metadata.get("constraint")


def check_settings(obj: Any, prefix: str = "") -> None:
    """Check every setting of a composed config (a schema dataclass, as OmegaConf.to_object makes it) against its
    declared constraint; the first problem is a ConfigError naming the key, the value and what is allowed."""
    for f in dataclasses.fields(obj):
        if f.name.startswith("_"):
            continue
        key = f"{prefix}{f.name}"
        value = getattr(obj, f.name)
        c = constraint_of(f)
        if dataclasses.is_dataclass(value):
            check_settings(value, key + ".")
            continue
        if isinstance(value, list) and value and all(dataclasses.is_dataclass(v) for v in value):
            if c is not None and c.problem(value) and not value:
                raise ConfigError(f"{key}: {c.problem(value)}")
            for i, item in enumerate(value):
                check_settings(item, f"{key}[{i}].")
            continue
        if isinstance(value, dict) and value and all(dataclasses.is_dataclass(v) for v in value.values()):
            for name, item in value.items():
                check_settings(item, f"{key}.{name}.")
            continue
        if c is None:
            continue
        why = c.problem(value)
        if why:  # a path's problem names the path itself
            got = "" if c.path or (c.items is not None and c.items.path) or ", got " in why else f", got {_shown(value)}"
            raise ConfigError(f"{key}: {why}{got}")


def _shown(value: Any) -> str:
    text = repr(value) if isinstance(value, str) else str(value)
    return text if len(text) <= 80 else text[:77] + "..."


__all__ = ["Constraint", "PathKind", "setting", "count", "rng_seed", "label", "check_settings", "constraint_of",
           "INT64_MAX", "SEED_MAX"]
