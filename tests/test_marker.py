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
    hit = make_matcher(MarkerConfig(r"\[Z[A-Z]T\]", Matcher.regex))
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
