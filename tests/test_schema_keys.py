"""Every key of the config schema is read by the code, and every key the README names exists.

A key nothing reads still lands in the config hash and the cache keys: setting it reruns a cell under a new key and
gives the same numbers, silently (coupling.train.seed was such a key). Static, by name: each field must be read as
an attribute (`.name`) somewhere outside the schema; the few read another way are listed with the reason.
"""

from __future__ import annotations

import dataclasses
import re
import typing
from pathlib import Path

from marker_lab.config import schema

ROOT = Path(schema.__file__).resolve().parents[2]
# read without an attribute access: by Hydra or submitit from the launcher config, or as a whole section
READ_OTHERWISE = {
    "_target_": "Hydra instantiates the launcher / sweeper from it",
    "extra": "free-form notes, recorded in the resolved config and never read (documented as such)",
    "analysis": "read from the result's resolved config by aggregation, as a dict",
    "recipe": "a label of the recipe file (like experiment and condition), recorded for people",
    **{k: "handed to submitit as slurm_<key> by the Slurm launcher (launch/launchers.py)"
       for k in ("qos", "account", "additional_parameters", "array_parallelism")},
}


def fields_of(cls, prefix: str = "") -> list[tuple[str, str]]:
    """(dotted key, field name) of every field of a schema dataclass, nested dataclasses included."""
    out = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        key = f"{prefix}{f.name}"
        out.append((key, f.name))
        inner = hints[f.name]
        for arg in (typing.get_args(inner) or (inner,)):
            if dataclasses.is_dataclass(arg):
                out += fields_of(arg, key + ".")
    return out


def source_text() -> str:
    files = [p for p in ROOT.joinpath("marker_lab").rglob("*.py") if p.name != "schema.py"]
    files += list(ROOT.joinpath("hydra_plugins").rglob("*.py"))
    return "\n".join(p.read_text() for p in files)


def test_every_schema_key_is_read_by_the_code():
    text = source_text()
    launcher_keys = {f.name for cls in (schema.LocalGpusLauncherConfig, schema.SlurmLauncherConfig,
                                        schema.GridSweeperConfig) for f in dataclasses.fields(cls)}
    unread = []
    for key, name in fields_of(schema.Config):
        if name in READ_OTHERWISE or key.startswith("analysis."):
            continue
        if not re.search(rf"\.{re.escape(name)}\b|\[\"{re.escape(name)}\"\]", text):
            unread.append(key)
    for name in launcher_keys - set(READ_OTHERWISE):  # the launchers read theirs from self.params / kwargs
        if not re.search(rf"[\"']{re.escape(name)}[\"']|\b{re.escape(name)}\b\s*[=:]|\.{re.escape(name)}\b", text):
            unread.append(f"hydra.launcher.{name}")
    assert not unread, f"schema keys nothing reads: {unread}"


def test_every_key_the_readme_names_exists():
    readme = (ROOT / "README.md").read_text()
    known = {key for key, _ in fields_of(schema.Config)}
    named = set(re.findall(r"`((?:coupling|second_stage|eval|model|persona_set|judge|geometry|marker)\.[a-z_.]+)`", readme))
    named -= {"coupling.jsonl"}  # a file name (the coupling data in a cache entry), not a key
    missing = sorted(k for k in named if k not in known and not any(k.startswith(p + ".") for p in (
        "second_stage.datasets",)))
    assert not missing, f"README names keys the schema has not: {missing}"
