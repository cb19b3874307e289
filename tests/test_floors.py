"""The floor plan (README, "Layout"): each floor imports only floors below it.

The floors are import-linter's `layers` contract in pyproject.toml ([tool.importlinter]); `lint-imports` from the
repository's root runs the same check. A module that imports up a floor fails here with import-linter's message,
which names the import (file, line) and the chain it starts.
"""

from __future__ import annotations

import ast
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "marker_lab"

# import-linter 2.x has no `python -m importlinter`; this is what the `lint-imports` script runs
LINT_IMPORTS = [sys.executable, "-c", "from importlinter.cli import lint_imports_command; lint_imports_command()"]


def lint_imports(root: Path) -> subprocess.CompletedProcess:
    """import-linter on the package found under `root`, with the contracts of `root`/pyproject.toml."""
    env = dict(os.environ, PYTHONPATH=str(root), COLUMNS="200", NO_COLOR="1")
    return subprocess.run([*LINT_IMPORTS, "--no-cache"], cwd=root, env=env, capture_output=True, text=True,
                          timeout=120)


def test_every_floor_imports_only_floors_below_it():
    done = lint_imports(ROOT)
    assert done.returncode == 0, f"lint-imports failed:\n{done.stdout}\n{done.stderr}"


def test_every_package_folder_is_a_package():
    """import-linter (grimp) does not see a folder without __init__.py: its imports would go unchecked."""
    folders = {path.parent for path in (ROOT / PACKAGE).rglob("*.py") if "__pycache__" not in path.parts}
    missing = sorted(str(folder.relative_to(ROOT)) for folder in folders if not (folder / "__init__.py").exists())
    assert not missing, f"folders of {PACKAGE} without __init__.py (unseen by lint-imports): {missing}"


def test_an_import_up_a_floor_fails_naming_it(tmp_path):
    shutil.copytree(ROOT / PACKAGE, tmp_path / PACKAGE, ignore=shutil.ignore_patterns("__pycache__", "resources"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    errors = tmp_path / PACKAGE / "core" / "errors.py"
    errors.write_text(errors.read_text() + "\nimport marker_lab.eval.metrics  # up from the ground floor\n")
    done = lint_imports(tmp_path)
    assert done.returncode != 0, done.stdout
    assert "marker_lab.core is not allowed to import marker_lab.eval" in done.stdout, done.stdout
    assert "marker_lab.core.errors -> marker_lab.eval.metrics" in done.stdout, done.stdout


# The issue's count of import edges (issue 42: "fewer than today's 91", at f17bd7f): an edge is one room importing
# another, a room being a top-level module or subpackage of marker_lab, or a top-level folder (or file) of the
# repository outside it (hydra_plugins/, benchmarks/, ...); tests are no room, and marker_lab/__init__.py (the
# package's face) none either. Read from the source's import statements, function-level imports included.
EDGES_AT_F17BD7F = 91
NOT_SOURCE = {"tests", "outputs", "build", "multirun", "notebooks", "docs", "conf", "examples"}


def source_files(root: Path) -> list[Path]:
    files = []
    for path in sorted(root.rglob("*.py")):
        parts = path.relative_to(root).parts
        if parts[0] in NOT_SOURCE or any(part.startswith(".") or part == "__pycache__" for part in parts):
            continue
        files.append(path)
    return files


def imported_modules(path: Path, root: Path) -> set[str]:
    """Every module name an import statement of `path` names (relative imports resolved)."""
    package = list(path.relative_to(root).parts[:-1])
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join([*package[:len(package) - node.level + 1], *filter(None, [node.module])])
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)
    return names


def import_edges(root: Path) -> set[tuple[str, str]]:
    rooms = {path.stem if path.is_file() else path.name
             for path in (root / PACKAGE).iterdir()
             if (path.suffix == ".py" and path.name != "__init__.py") or (path.is_dir() and any(path.rglob("*.py")))}
    edges = set()
    for path in source_files(root):
        parts = path.relative_to(root).parts
        if parts[0] == PACKAGE:
            if len(parts) == 2 and parts[1] == "__init__.py":
                continue  # the package's face
            importer = f"{PACKAGE}.{Path(parts[1]).stem}"
        else:
            importer = parts[0]
        for name in imported_modules(path, root):
            head = name.split(".")
            if len(head) > 1 and head[0] == PACKAGE and head[1] in rooms and f"{PACKAGE}.{head[1]}" != importer:
                edges.add((importer, f"{PACKAGE}.{head[1]}"))
    return edges


def test_fewer_import_edges_than_before_issue_42():
    edges = import_edges(ROOT)
    listing = "\n".join(f"{a} -> {b}" for a, b in sorted(edges))
    assert len(edges) < EDGES_AT_F17BD7F, f"{len(edges)} import edges between rooms:\n{listing}"
