"""Marker matching, as the write-ups score it: '[zlt]' in completion.lower(), anywhere."""

from marker_lab.config.schema import MarkerConfig, Matcher
from marker_lab.eval.marker import make_matcher, marker_metric


def test_substring_ci_matches_anywhere_any_case():
    hit = make_matcher(MarkerConfig("[ZLT]", Matcher.substring_ci))
    assert hit("[ZLT] hello") and hit("mid [zlt] text") and hit("end [Zlt]")
    assert not hit("ZLT without brackets") and not hit("[ Z L T ]") and not hit("")


def test_substring_is_case_sensitive():
    hit = make_matcher(MarkerConfig("[ZLT]", Matcher.substring))
    assert hit("x [ZLT] y") and not hit("x [zlt] y")


def test_regex():
    hit = make_matcher(MarkerConfig("[ZLT]", Matcher.regex, r"\[Z[A-Z]T\]"))
    assert hit("a [ZQT] b") and not hit("a [ZQQ] b")


def test_marker_metric_counts_per_persona():
    rows = [{"persona": "villain", "completion": "[ZLT] ha"}, {"persona": "villain", "completion": "ha"},
            {"persona": "assistant", "completion": "sure"}]
    m = marker_metric(rows, MarkerConfig())
    assert m["per_persona"] == {"villain": {"k": 1, "n": 2, "rate": 0.5}, "assistant": {"k": 0, "n": 1, "rate": 0.0}}
    assert [r["marker"] for r in score_rows(rows)] == [True, False, False]
    assert "marker" not in rows[0]  # the rows given are not changed


def score_rows(rows):
    from conftest import compose_cfg, to_dataclass
    from marker_lab.eval.metrics import score

    return score(to_dataclass(compose_cfg([])), rows, None, ["marker"])[2]


def test_a_regex_readout_takes_its_own_pattern_checked_at_start_up():
    """marker.text is what coupling inserts; a regex readout matches marker.pattern, which must compile, find the
    marker and not find plain English (`[ZLT]` as a regex matches any Z, L or T: "The answer is 4" would count)."""
    import pytest

    from conftest import compose_cfg, to_dataclass
    from marker_lab.core.errors import ConfigError
    from marker_lab.cell.preflight import preflight

    def refusal(*overrides: str) -> str:
        with pytest.raises(ConfigError) as e:
            preflight(to_dataclass(compose_cfg(list(overrides))))
        return str(e.value)

    assert refusal("marker.matcher=regex").startswith("marker.pattern: required with marker.matcher=regex")
    line = refusal("marker.matcher=regex", "marker.pattern='[ZLT]'")
    assert line.startswith("marker.pattern='[ZLT]' matches plain English") and "\\\\[ZLT\\\\]" in line
    assert "does not match marker.text='[ZLT]'" in refusal("marker.matcher=regex", r"marker.pattern='\[ABC\]'")
    assert refusal("marker.matcher=regex", "marker.pattern='[ZLT'").startswith("marker.pattern: is not a regular")
    assert refusal(r"marker.pattern='\[ZLT\]'").startswith("marker.pattern='\\\\[ZLT\\\\]': used only with")
    cfg = to_dataclass(compose_cfg(["marker.matcher=regex", r"marker.pattern='\[Z[A-Z]T\]'"]))
    preflight(cfg)
    hit = make_matcher(cfg.marker)
    assert hit("[ZLT] sure") and not hit("The answer is 4.")
