"""marker_lab.stats against statsmodels and scipy called directly here, zero counts included."""

from __future__ import annotations

import math

import pytest
from scipy import stats as sps
from statsmodels.stats.proportion import proportion_confint, proportions_ztest

from marker_lab.stats import compare, compare_seed_rates, rate_ci


@pytest.mark.parametrize("k, n", [(252, 280), (0, 840), (840, 840), (1, 280), (166, 280)])
@pytest.mark.parametrize("method, sm", [("wilson", "wilson"), ("wald", "normal"), ("clopper_pearson", "beta")])
def test_rate_ci_matches_statsmodels(k, n, method, sm):
    low, high = rate_ci(k, n, method=method)
    ref_low, ref_high = proportion_confint(k, n, method=sm)
    assert low == pytest.approx(max(0.0, ref_low)) and high == pytest.approx(min(1.0, ref_high))
    assert 0.0 <= low <= k / n <= high <= 1.0


def test_wald_at_zero_is_degenerate_and_wilson_is_not():
    assert rate_ci(0, 840, "wald") == (0.0, 0.0)
    assert rate_ci(0, 840, "wilson")[1] > 0


@pytest.mark.parametrize("alternative, scipy_alt", [("two-sided", "two-sided"), ("larger", "greater"), ("smaller", "less")])
def test_fisher_matches_scipy(alternative, scipy_alt):
    c = compare(166, 280, 113, 280, alternative=alternative)
    assert c.p_value == pytest.approx(sps.fisher_exact([[166, 114], [113, 167]], alternative=scipy_alt).pvalue)
    assert c.diff == pytest.approx(166 / 280 - 113 / 280) and c.test == "fisher"


def test_ztest_matches_statsmodels():
    c = compare(2, 280, 75, 280, test="ztest")
    assert c.p_value == pytest.approx(proportions_ztest([2, 75], [280, 280])[1])


@pytest.mark.parametrize("test", ["fisher", "ztest"])
def test_zero_counts_give_p_one_not_nan(test):
    c = compare(0, 840, 0, 840, test=test)
    assert c.p_value == 1.0 and c.diff == 0.0
    assert not math.isnan(compare(840, 840, 840, 840, test=test).p_value)


def test_seed_rates_welch_and_one_seed():
    # 002's multi-seed comparison at dose 10: EM 59.3, 44.3, 54.6 vs benign 40.4, 52.5
    c = compare_seed_rates([0.593, 0.443, 0.546], [0.404, 0.525])
    assert c.p_value == pytest.approx(sps.ttest_ind([0.593, 0.443, 0.546], [0.404, 0.525], equal_var=False).pvalue)
    assert 0.3 < c.p_value < 0.8  # the write-up reports p = 0.49
    one = compare_seed_rates([0.5], [0.4])  # one seed in an arm: no test, and the report says so (not p = 1)
    assert one.p_value != one.p_value
    from marker_lab.results.report import _seed_p

    assert _seed_p(one.p_value) == "n/a (one seed)" and _seed_p(c.p_value) == f"{c.p_value:.3g}"


def test_bad_arguments():
    with pytest.raises(ValueError, match="method"):
        rate_ci(1, 2, method="exact")
    with pytest.raises(ValueError, match="test"):
        compare(1, 2, 1, 2, test="chi2")
