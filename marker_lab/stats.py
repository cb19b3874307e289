"""Statistics for rates: confidence intervals and two-arm tests, on statsmodels and scipy.

    rate_ci(k, n, method="wilson")            -> (low, high)
    compare(k1, n1, k2, n2, test="fisher")    -> Comparison(diff, p_value, test, alternative)
    compare_seed_rates(rates_a, rates_b)      -> Comparison over per-seed rates (Welch's t-test)
    auc_ci(pos, neg)                          -> (auc, low, high): ROC AUC with a CI resampling questions

Counts are often 0 (0/840 vs 0/840): every test returns a p-value, never NaN (identical arms give p = 1).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import stats as sps
from statsmodels.stats.proportion import proportion_confint, proportions_ztest

CI_METHODS = {"wilson": "wilson", "wald": "normal", "clopper_pearson": "beta"}
TESTS = ("fisher", "ztest")
ALTERNATIVES = ("two-sided", "larger", "smaller")  # larger: arm 1's rate > arm 2's


def rate_ci(k: int, n: int, method: str = "wilson", alpha: float = 0.05) -> tuple[float, float]:
    """Confidence interval of k/n: wilson (default), wald (the write-ups' choice) or clopper_pearson."""
    if method not in CI_METHODS:
        raise ValueError(f"method must be one of {list(CI_METHODS)}, got {method!r}")
    if n <= 0:
        return (math.nan, math.nan)
    low, high = proportion_confint(k, n, alpha=alpha, method=CI_METHODS[method])
    return float(max(0.0, low)), float(min(1.0, high))


def rate_ci_arrays(k, n, method: str = "wilson", alpha: float = 0.05) -> tuple[np.ndarray, np.ndarray]:
    """rate_ci over arrays of counts at once (statsmodels is vectorised)."""
    if method not in CI_METHODS:
        raise ValueError(f"method must be one of {list(CI_METHODS)}, got {method!r}")
    k, n = np.asarray(k, float), np.asarray(n, float)
    low, high = proportion_confint(k, n, alpha=alpha, method=CI_METHODS[method])
    return np.clip(np.asarray(low, float), 0, 1), np.clip(np.asarray(high, float), 0, 1)


@dataclass(frozen=True)
class Comparison:
    rate_1: float
    rate_2: float
    diff: float  # rate_1 - rate_2
    p_value: float
    test: str
    alternative: str


def compare(k1: int, n1: int, k2: int, n2: int, test: str = "fisher", alternative: str = "two-sided") -> Comparison:
    """Two-arm test of k1/n1 against k2/n2: Fisher's exact test (default) or a two-proportion z-test."""
    if test not in TESTS:
        raise ValueError(f"test must be one of {TESTS}, got {test!r}")
    if alternative not in ALTERNATIVES:
        raise ValueError(f"alternative must be one of {ALTERNATIVES}, got {alternative!r}")
    r1, r2 = k1 / n1, k2 / n2
    if test == "fisher":
        alt = {"two-sided": "two-sided", "larger": "greater", "smaller": "less"}[alternative]
        p = sps.fisher_exact([[k1, n1 - k1], [k2, n2 - k2]], alternative=alt).pvalue
    else:
        pooled = (k1 + k2) / (n1 + n2)
        if pooled in (0.0, 1.0):  # no variance: the z statistic is undefined, the arms are identical
            p = 1.0
        else:
            p = proportions_ztest([k1, k2], [n1, n2], alternative=alternative)[1]
    return Comparison(r1, r2, r1 - r2, float(p), test, alternative)


def compare_seed_rates(rates_1: list[float], rates_2: list[float], alternative: str = "two-sided") -> Comparison:
    """Welch's t-test on per-seed rates (e.g. 3 seeds vs 2, as 002 compares at dose 10)."""
    a, b = np.asarray(rates_1, float), np.asarray(rates_2, float)
    m1, m2 = float(a.mean()), float(b.mean())
    if len(a) < 2 or len(b) < 2:
        p = math.nan  # one seed in an arm: no test is possible (the report says "n/a (one seed)", not p = 1)
    elif a.std() == 0 and b.std() == 0:
        p = 1.0 if m1 == m2 else 0.0  # no spread at all: the arms are equal or separated exactly
    else:
        alt = {"two-sided": "two-sided", "larger": "greater", "smaller": "less"}[alternative]
        p = float(sps.ttest_ind(a, b, equal_var=False, alternative=alt).pvalue)
    return Comparison(m1, m2, m1 - m2, p, "welch_t_seeds", alternative)


def auc_ci(pos, neg, n_resamples: int = 1000, seed: int = 0, alpha: float = 0.05) -> tuple[float, float, float]:
    """(AUC, low, high): ROC AUC of positive scores against negative ones, P(pos > neg) + P(tie) / 2, with a
    percentile bootstrap CI over clusters.

    `pos` is [Q]: one positive score per cluster (a question); `neg` is [Q] or [M, Q]: M negatives per cluster (the
    other personas on the same questions). Scores that share a question are not independent, so the bootstrap
    resamples questions, the same ones for both classes. Percentile, not BCa: a separable pair gives every
    resample AUC = 1. NaN when there are fewer than 2 clusters.
    """
    pos = np.asarray(pos, dtype=float)[None, :]
    neg = np.atleast_2d(np.asarray(neg, dtype=float))
    q = pos.shape[1]
    if q < 2 or neg.shape[1] != q:
        return (math.nan, math.nan, math.nan)

    def stat(idx: np.ndarray) -> np.ndarray:  # idx [B, q] resampled cluster indices -> [B] AUCs
        p = pos[:, idx].transpose(1, 0, 2).reshape(len(idx), -1)[:, :, None]
        n = neg[:, idx].transpose(1, 0, 2).reshape(len(idx), -1)[:, None, :]
        return (p > n).mean((1, 2)) + 0.5 * (p == n).mean((1, 2))

    rng = np.random.default_rng(seed)
    draws = np.concatenate([stat(rng.integers(0, q, (min(100, n_resamples - b), q)))
                            for b in range(0, n_resamples, 100)])  # 100 resamples at a time bounds memory
    low, high = np.quantile(draws, [alpha / 2, 1 - alpha / 2])
    return (float(stat(np.arange(q)[None, :])[0]), float(low), float(high))
