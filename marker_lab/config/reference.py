"""The settings reference (docs/settings.md), generated from the schema: every setting's key, type, default, what it
may hold (its declared constraint) and its one-line comment, so the page cannot drift from the code.

    python -m marker_lab.config.reference > docs/settings.md     # tests/test_settings.py checks it is current
"""

from __future__ import annotations

import ast
import dataclasses
import enum
import inspect
import typing

from marker_lab.config import schema
from marker_lab.config.constraints import constraint_of

SECTIONS = [("Cell", schema.Config), ("Launcher: local_gpus (hydra/launcher=local_gpus)", schema.LocalGpusLauncherConfig),
            ("Launcher: slurm (hydra/launcher=slurm)", schema.SlurmLauncherConfig),
            ("Sweeper: grid (hydra/sweeper=grid)", schema.GridSweeperConfig)]


def leaf_settings(cls: type, prefix: str = "") -> list[tuple[str, dataclasses.Field, type]]:
    """Every (key, field, owning class) of a schema dataclass and the dataclasses it holds, for the docs and tests.
    A mapping of dataclasses shows its entries' fields as `<name>.field`, a list of them as `[].field`."""
    out = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.name.startswith("_"):
            continue
        tp = hints[f.name]
        nested = _dataclass_in(tp)
        if nested is not None:
            origin = typing.get_origin(tp) if typing.get_origin(tp) is not typing.Union else \
                typing.get_origin(next(a for a in typing.get_args(tp) if a is not type(None)))
            step = {dict: ".<name>.", list: "[]."}.get(origin, ".")
            out += leaf_settings(nested, f"{prefix}{f.name}{step}")
        else:
            out.append((f"{prefix}{f.name}", f, cls))
    return out


def _dataclass_in(tp: typing.Any) -> type | None:
    """The dataclass a field holds directly, in a list, or as a mapping's values (None: a plain value)."""
    if dataclasses.is_dataclass(tp):
        return tp
    for arg in typing.get_args(tp):
        if arg is type(None):
            continue
        found = _dataclass_in(arg)
        if found is not None:
            return found
    return None


def field_comments(cls: type) -> dict[str, str]:
    """The comment written with each field of a schema dataclass: the comment lines just above it, then the line's
    own `# ...` (a comment never continues below its field)."""
    lines, _ = inspect.getsourcelines(cls)
    tree = ast.parse(inspect.cleandoc("".join(lines)) if lines[0].startswith(" ") else "".join(lines))
    body = tree.body[0].body
    src = [line.rstrip("\n") for line in lines]
    out: dict[str, str] = {}
    for node in body:
        if not isinstance(node, ast.AnnAssign) or not isinstance(node.target, ast.Name):
            continue
        line, last = src[node.lineno - 1], src[node.end_lineno - 1]
        comment = last.split("  # ", 1)[1] if "  # " in last else (line.split("  # ", 1)[1] if "  # " in line else "")
        above, i = [], node.lineno - 2
        while i >= 0 and src[i].strip().startswith("#"):
            above.insert(0, src[i].strip().lstrip("# "))
            i -= 1
        out[node.target.id] = " ".join(above + ([comment] if comment else [])).strip()
    return out


def _type_name(tp) -> str:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is typing.Union:
        inner = [a for a in args if a is not type(None)]
        return f"{_type_name(inner[0])} or null"
    if origin in (list, dict):
        return f"{origin.__name__}[{', '.join(_type_name(a) for a in args)}]"
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        return " | ".join(m.value for m in tp)
    return getattr(tp, "__name__", str(tp)).replace("Any", "any")


def _default(f: dataclasses.Field) -> str:
    if f.default is not dataclasses.MISSING:
        value = f.default
    elif f.default_factory is not dataclasses.MISSING:
        value = f.default_factory()
    else:
        return ""
    if dataclasses.is_dataclass(value) or (isinstance(value, list) and value and dataclasses.is_dataclass(value[0])):
        return "(see its keys)"
    value = getattr(value, "value", value)
    if isinstance(value, list):
        value = [getattr(v, "value", v) for v in value]
    text = "null" if value is None else str(value).lower() if isinstance(value, bool) else str(value)
    return f"`{text}`".replace("|", "\\|")


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def settings_reference() -> str:
    """docs/settings.md: one table per section, a row per setting."""
    parts = ["# Settings reference", "",
             "Generated from `marker_lab/config/schema.py` by `python -m marker_lab.config.reference`; do not edit "
             "by hand. *Allowed* is the constraint each setting declares, checked before anything loads (a value "
             "outside it is refused in one line naming the key); `null` is allowed where the type says so.", ""]
    for title, root in SECTIONS:
        parts += [f"## {title}", "", "| key | type | default | allowed | what it is |", "| --- | --- | --- | --- | --- |"]
        comments: dict[type, dict[str, str]] = {}
        for key, f, owner in leaf_settings(root):
            if f.name == "_target_":
                continue
            comment = comments.setdefault(owner, field_comments(owner)).get(f.name, "")
            tp = typing.get_type_hints(owner)[f.name]
            c = constraint_of(f)
            allowed = c.describe() if c is not None else ("true or false" if tp is bool else "one of the type's values")
            parts.append(f"| `{key}` | {_cell(_type_name(tp))} | {_default(f)} | {_cell(allowed)} | {_cell(comment)} |")
        parts.append("")
    return "\n".join(parts)


if __name__ == "__main__":
    print(settings_reference(), end="")
