"""Persona sets: files of {name, system_prompt, category?, tags?} a researcher writes (YAML or jsonl).

A YAML file may also name its `sources` and `bystanders` at the top level (leakage experiments: sources are
coupled one at a time, bystanders are measured); `persona_set.sources` / `.bystanders` override them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import yaml

from marker_lab.core.files import resolve_path


@dataclass(frozen=True)
class Persona:
    name: str
    system_prompt: str | None  # None: no system turn at all
    category: str | None = None
    tags: tuple[str, ...] = field(default_factory=tuple)


def load_personas(path: str) -> dict[str, Persona]:
    """Personas of a file, by name, in file order. YAML: a list, or a mapping with a `personas` list."""
    return _read(path)[0]


def file_roles(path: str) -> tuple[list[str] | None, list[str] | None]:
    """The (sources, bystanders) a YAML persona file names at its top level (None where it names none)."""
    _, data = _read(path)
    roles = []
    for key in ("sources", "bystanders"):
        names = data.get(key) if isinstance(data, dict) else None
        if names is not None and (not isinstance(names, list) or not all(isinstance(n, str) for n in names)):
            raise ValueError(f"{path}: '{key}' must be a list of persona names")
        roles.append(names)
    return roles[0], roles[1]


def _read(path: str) -> tuple[dict[str, Persona], object]:
    real = resolve_path(path)
    if not real.is_file():
        raise FileNotFoundError(f"persona file not found: {path} ({real})")
    data = None
    if real.suffix == ".jsonl":
        rows = []
        for n, line in enumerate(real.read_text().splitlines(), 1):
            try:
                rows += [json.loads(line)] if line.strip() else []
            except json.JSONDecodeError as e:
                raise ValueError(f"{path} line {n}: not JSON ({e.msg})") from None
    else:
        data = yaml.safe_load(real.read_text())
        rows = data.get("personas") if isinstance(data, dict) else data
    if not rows or not isinstance(rows, list):
        raise ValueError(f"{path}: no personas (expected a list of {{name, system_prompt}}, or a mapping with a "
                         "'personas' list)")
    out: dict[str, Persona] = {}
    folded: dict[str, str] = {}  # lower-cased name -> the name as written
    for i, row in enumerate(rows):
        where = f"{path} line {i + 1}" if real.suffix == ".jsonl" else f"{path}: persona #{i}"
        if not isinstance(row, dict) or "name" not in row or "system_prompt" not in row:
            raise ValueError(f"{where} needs 'name' and 'system_prompt'")
        name, prompt = row["name"], row["system_prompt"]
        problem = name_problem(name)
        if problem:
            raise ValueError(f"{where}: name {name!r} {problem}")
        if name in out:
            raise ValueError(f"{where}: persona {name!r} is listed twice")
        if name.lower() in folded:  # results are written per persona name, and file systems may fold case
            raise ValueError(f"{where}: persona {name!r} differs from {folded[name.lower()]!r} only in case")
        if prompt is not None and not isinstance(prompt, str):
            raise ValueError(f"{where}: persona {name!r} has a system_prompt that is not text "
                             f"({type(prompt).__name__}: {str(prompt)[:40]!r}); quote it, or use null for none")
        folded[name.lower()] = name
        out[name] = Persona(name, prompt, row.get("category"), tuple(row.get("tags") or ()))
    return out, data


def name_problem(name: object) -> str | None:
    """Why a persona name cannot be used (None: it can). Names become keys of results, file names of figures and
    columns of tables: text, not blank, no path separators, control characters or spaces at either end."""
    if not isinstance(name, str):
        return f"is not text ({type(name).__name__}); quote it"
    if not name.strip():
        return "is blank"
    if name != name.strip():
        return "has spaces at its start or end"
    if any(c in name for c in "/\\") or any(ord(c) < 32 for c in name) or name in (".", ".."):
        return "is not safe as a file name (no /, \\, control characters, '.' or '..')"
    return None


def system_messages(persona: Persona) -> list[dict]:
    """The system turn for a persona (none at all when its prompt is null)."""
    return [] if persona.system_prompt is None else [{"role": "system", "content": persona.system_prompt}]


def persona_prompt(persona: Persona | None, user: str) -> list[dict]:
    """A chat prompt: the persona's system turn (none for None or a null prompt), then `user`'s turn."""
    return ([] if persona is None else system_messages(persona)) + [{"role": "user", "content": user}]


def set_roles(cfg_persona_set) -> tuple[list[str], list[str]]:
    """(sources, bystanders) of the configured set: config overrides, else the file's lists; bystanders default to
    every persona that is not a source."""
    personas = load_personas(cfg_persona_set.path)
    file_sources, file_bystanders = file_roles(cfg_persona_set.path)
    sources = list(cfg_persona_set.sources or file_sources or [])
    bystanders = list(cfg_persona_set.bystanders or file_bystanders or [p for p in personas if p not in sources])
    return sources, bystanders
