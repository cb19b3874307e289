"""Each extension point is one registry, and the code dispatches on it: no comparison of a kind key against a
registered name is left anywhere in marker_lab (an if-chain that a new entry would have to be added to)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from marker_lab.core.errors import ConfigError
from marker_lab.core.registry import Registry
from marker_lab.data.formats import SECOND_STAGE_FORMATS
from marker_lab.engines import ENGINES
from marker_lab.eval.judge.registry import JUDGES
from marker_lab.eval.metrics import METRICS, Reads
from marker_lab.stages.coupling_kinds import COUPLING_KINDS

PACKAGE = Path(__file__).resolve().parents[1] / "marker_lab"
# registry -> the attribute names of the config keys that choose its entries (cfg.eval.engine.name, ...)
REGISTRIES = {"engines": (ENGINES, {"name"}), "coupling kinds": (COUPLING_KINDS, {"kind"}),
              "second-stage formats": (SECOND_STAGE_FORMATS, {"format"}), "judges": (JUDGES, {"backend"}),
              "metrics": (METRICS, {"metrics"})}
# a comparison that is not a dispatch, with the reason
ALLOWED = {
    # the probe's own settings are checked when the probe runs: a rule about one metric's keys, not a choice
    ("eval/checks.py", "'probe' not in cfg.eval.metrics"),
}


def _strings(node: ast.AST) -> set[str]:
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return {node.value}
    if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
        return set().union(*(_strings(e) for e in node.elts)) if node.elts else set()
    return set()


def dispatch_sites(root: Path = PACKAGE) -> list[str]:
    """Every comparison under `root` of a kind key's attribute against a name its registry holds."""
    found = []
    for path in sorted(root.rglob("*.py")):
        rel = str(path.relative_to(root))
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.Compare):
                continue
            operands = [node.left, *node.comparators]
            attrs = {o.attr for o in operands if isinstance(o, ast.Attribute)}
            names = set().union(*(_strings(o) for o in operands))
            for what, (registry, keys) in REGISTRIES.items():
                if attrs & keys and names & set(registry.names()) and (rel, ast.unparse(node)) not in ALLOWED:
                    found.append(f"{rel}:{node.lineno}: {ast.unparse(node)} (use the {what} registry)")
    return found


def test_no_if_chain_over_a_registered_kind_remains():
    assert dispatch_sites() == []


def test_the_walk_finds_an_if_chain(tmp_path):
    """The walk is not vacuous: chains like those the registries replaced are found."""
    (tmp_path / "chain.py").write_text('def f(cfg):\n    if cfg.eval.engine.name == "vllm":\n        return 1\n'
                                       '    return cfg.coupling.kind in ("marker", "persona_em")\n')
    assert dispatch_sites(tmp_path) == [
        "chain.py:2: cfg.eval.engine.name == 'vllm' (use the engines registry)",
        "chain.py:4: cfg.coupling.kind in ('marker', 'persona_em') (use the coupling kinds registry)"]


def test_every_config_choice_has_an_entry_and_none_more():
    """The schema's enums and the registries list the same names (a choice without an entry fails at start-up)."""
    from marker_lab.config.schema import CouplingKind, DataFormat, EngineName, JudgeBackend, Metric

    for enum, registry in ((EngineName, ENGINES), (CouplingKind, COUPLING_KINDS), (DataFormat, SECOND_STAGE_FORMATS),
                           (JudgeBackend, JUDGES), (Metric, METRICS)):
        assert sorted(e.value for e in enum) == sorted(registry.names()), registry.key


def test_an_unknown_name_is_one_line_naming_the_key_and_the_known_names():
    with pytest.raises(ConfigError, match=r"eval.engine.name='tgi': no such engine \(known: hf, vllm\)"):
        ENGINES.get("tgi")
    registry: Registry[int] = Registry("demo.kind", "demo kind")
    registry.add("a", 1)
    with pytest.raises(ValueError, match="registered twice"):
        registry.add("a", 2)


def test_metrics_say_what_they_read():
    reads = {name: m.reads for name, m in METRICS}
    assert reads == {"marker": Reads.completions, "length": Reads.completions, "alignment": Reads.completions,
                     "coherence": Reads.completions, "capability": Reads.model, "marker_prob": Reads.model,
                     "probe": Reads.every_model}
