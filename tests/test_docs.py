"""The documentation site (mkdocs.yml, docs/): it builds with `mkdocs build --strict` (a broken link or anchor, or a
page neither in the nav nor in not_in_nav, fails it), every page of the nav exists, and no page under docs/ is
silently unreachable.

The build needs the `docs` extra (`pip install -e ".[docs]"`); without it that test is skipped, except where
MARKER_LAB_REQUIRE_DOCS=1 (CI installs the extra and sets it), where a missing MkDocs fails it.
"""

from __future__ import annotations

import fnmatch
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
MKDOCS_YML = ROOT / "mkdocs.yml"
DOCS = ROOT / "docs"

# CI installs the docs extra and sets MARKER_LAB_REQUIRE_DOCS=1, so a MkDocs that fails to import fails the build
# test instead of skipping it
REQUIRE_DOCS = os.environ.get("MARKER_LAB_REQUIRE_DOCS") == "1"


class _Loader(yaml.SafeLoader):
    """mkdocs.yml as data: tags that name Python objects (`!!python/name:...`, as Material's extensions use) read as
    None instead of failing the safe loader."""


_Loader.add_multi_constructor("tag:yaml.org,2002:python/", lambda loader, suffix, node: None)


def site_config() -> dict:
    return yaml.load(MKDOCS_YML.read_text(), Loader=_Loader)


def nav_pages(nav) -> list[str]:
    """Every page (path relative to docs/) that the nav names, in order; external links left out."""
    if isinstance(nav, str):
        return [] if re.match(r"^[a-z]+://", nav) else [nav]
    if isinstance(nav, list):
        return [page for item in nav for page in nav_pages(item)]
    if isinstance(nav, dict):
        return [page for value in nav.values() for page in nav_pages(value)]
    return []


def not_in_nav(config: dict, page: str) -> bool:
    """Whether `page` (relative to docs/) matches a pattern of not_in_nav (the gitignore-style patterns MkDocs reads:
    a leading / anchors at docs/, a trailing / names a folder, * and ? match within a name)."""
    for line in (config.get("not_in_nav") or "").splitlines():
        pattern = line.strip()
        if not pattern or pattern.startswith("#"):
            continue
        assert not pattern.startswith("!"), f"not_in_nav: negated pattern {pattern!r} is not read by this test"
        anchored, pattern = pattern.startswith("/"), pattern.lstrip("/")
        if pattern.endswith("/"):  # a folder: every page under it
            pattern += "*"
        candidates = [page] if anchored or "/" in pattern else [page, page.rsplit("/", 1)[-1]]
        if any(fnmatch.fnmatchcase(c, pattern) for c in candidates):
            return True
    return False


def docs_pages() -> list[str]:
    return sorted(p.relative_to(DOCS).as_posix() for p in DOCS.rglob("*.md"))


def test_the_site_config_reads_docs():
    config = site_config()
    assert config["docs_dir"] == "docs" and config["theme"]["name"] == "material", config


def test_every_page_of_the_nav_exists():
    config = site_config()
    missing = [page for page in nav_pages(config["nav"]) if not (DOCS / page).is_file()]
    assert not missing, f"pages in mkdocs.yml's nav that are not under docs/: {missing}"


def test_every_page_is_in_the_nav_or_listed_as_not_in_it():
    """A new page under docs/ must go into the nav (or, for a page kept out of the user docs, into not_in_nav): else
    no reader finds it."""
    config = site_config()
    in_nav = set(nav_pages(config["nav"]))
    unreachable = [page for page in docs_pages() if page not in in_nav and not not_in_nav(config, page)]
    assert not unreachable, f"pages under docs/ neither in mkdocs.yml's nav nor in its not_in_nav: {unreachable}"
    both = [page for page in in_nav if not_in_nav(config, page)]
    assert not both, f"pages both in the nav and in not_in_nav: {both}"


def _setup_commands(markdown: str) -> list[str]:
    """The commands of the first ```bash block, without their comments."""
    block = re.search(r"^```bash\n(.*?)^```", markdown, re.S | re.M)
    assert block, "no ```bash block"
    lines = (re.sub(r"\s+#.*$", "", line).strip() for line in block.group(1).splitlines())
    return [line for line in lines if line and not line.startswith("#")]


def test_the_home_page_sets_up_as_the_readme_does():
    """docs/index.md shows the README's set-up commands (the site cannot link to a file outside docs/): the same
    commands, so the two cannot drift apart."""
    readme = _setup_commands((ROOT / "README.md").read_text())
    home = _setup_commands((DOCS / "index.md").read_text())
    assert home == readme, f"docs/index.md's set-up block differs from README.md's:\n{home}\n{readme}"


def _require_mkdocs() -> None:
    """Skip without the docs extra; where MARKER_LAB_REQUIRE_DOCS=1, fail instead."""
    for module in ("mkdocs", "material"):
        if REQUIRE_DOCS:
            try:
                __import__(module)
            except ImportError as e:
                pytest.fail(f"MARKER_LAB_REQUIRE_DOCS=1 but {module} does not import ({e}): "
                            "pip install -e \".[docs]\"")
        else:
            pytest.importorskip(module, reason=f"{module} not installed (the docs extra: pip install -e \".[docs]\")")


def test_the_site_builds_strictly(tmp_path):
    _require_mkdocs()
    site = tmp_path / "site"
    env = dict(os.environ, NO_MKDOCS_2_WARNING="1", NO_COLOR="1")  # Material's end-of-life banner, colours
    done = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"mkdocs build --strict failed:\n{done.stdout}\n{done.stderr}"
    # each page of the nav became a page of the site (use_directory_urls: a.md -> a/index.html)
    for page in nav_pages(site_config()["nav"]):
        stem = page[:-len(".md")]
        html = site / ("index.html" if stem == "index" else f"{stem.removesuffix('/index')}/index.html")
        assert html.is_file(), f"{page}: no {html.relative_to(site)} in the built site"
