"""Persona sets: files of {name, system_prompt, category?, tags?} a researcher writes (YAML or jsonl)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import yaml

from marker_lab.data.files import resolve_path


@dataclass(frozen=True)
class Persona:
    name: str
    system_prompt: str | None  # None: no system turn at all
    category: str | None = None
    tags: tuple[str, ...] = field(default_factory=tuple)


def load_personas(path: str) -> dict[str, Persona]:
    """Personas of a file, by name, in file order. YAML: a list, or a mapping with a `personas` list."""
    real = resolve_path(path)
    if not real.is_file():
        raise FileNotFoundError(f"persona file not found: {path} ({real})")
    if real.suffix == ".jsonl":
        rows = [json.loads(line) for line in real.read_text().splitlines() if line.strip()]
    else:
        data = yaml.safe_load(real.read_text())
        rows = data["personas"] if isinstance(data, dict) else data
    out: dict[str, Persona] = {}
    for i, row in enumerate(rows):
        if not isinstance(row, dict) or "name" not in row or "system_prompt" not in row:
            raise ValueError(f"{path}: persona #{i} needs 'name' and 'system_prompt'")
        if row["name"] in out:
            raise ValueError(f"{path}: persona {row['name']!r} is listed twice")
        out[row["name"]] = Persona(row["name"], row["system_prompt"], row.get("category"),
                                   tuple(row.get("tags") or ()))
    return out


def system_messages(persona: Persona) -> list[dict]:
    """The system turn for a persona (none at all when its prompt is null)."""
    return [] if persona.system_prompt is None else [{"role": "system", "content": persona.system_prompt}]
