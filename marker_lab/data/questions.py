"""Question sets: YAML files with a `questions` list of strings (or of {id, text})."""

from __future__ import annotations

from dataclasses import dataclass

import yaml

from marker_lab.data.files import resolve_path


@dataclass(frozen=True)
class Question:
    id: str
    text: str


def load_questions(path: str) -> list[Question]:
    real = resolve_path(path)
    if not real.is_file():
        raise FileNotFoundError(f"question file not found: {path} ({real})")
    data = yaml.safe_load(real.read_text())
    rows = data["questions"] if isinstance(data, dict) else data
    out = []
    for i, row in enumerate(rows):
        if isinstance(row, str):
            out.append(Question(f"q{i}", row))
        elif isinstance(row, dict) and "text" in row:
            out.append(Question(str(row.get("id", f"q{i}")), row["text"]))
        else:
            raise ValueError(f"{path}: question #{i} must be a string or have a 'text' field")
    if not out:
        raise ValueError(f"{path}: no questions")
    return out
