"""ds_moe_div.stats against closed forms, hand-computed values and naive enumerations (scipy only as an
optional extra check)."""
from __future__ import annotations

import math
from itertools import product

import pytest

from ds_moe_div import stats


def test_paired_differences_need_the_same_seeds():
    assert stats.paired_differences(treatment={1: 5.0, 0: 4.0}, reference={0: 3.5, 1: 5.5}) == [0.5, -0.5]
    with pytest.raises(ValueError, match=r"only in the treatment \[2\], only in the reference \[\]"):
        stats.paired_differences(treatment={0: 1.0, 2: 1.0}, reference={0: 1.0})


@pytest.mark.parametrize("q,df,expected", [
    (0.975, 1, math.tan(math.pi * 0.475)),                 # Cauchy: tan(pi (q - 1/2))
    (0.8, 2, 0.6 / math.sqrt(2 * 0.8 * 0.2)),              # df=2: (2q-1) / sqrt(2 q (1-q))
    (0.975, 2, 0.95 / math.sqrt(2 * 0.975 * 0.025)),
    (0.975, 4, 2.7764451052),                               # printed tables
    (0.975, 7, 2.3646242516),
    (0.8, 7, 0.8960296443),
    (0.025, 7, -2.3646242516),
])
def test_t_quantiles(q, df, expected):
    assert stats.t_ppf(q, df) == pytest.approx(expected, rel=1e-8)
    assert stats.t_cdf(stats.t_ppf(q, df), df) == pytest.approx(q, abs=1e-12)


def test_paired_t_test_and_interval_by_hand():
    d = [1.0, 2.0, 3.0]  # mean 2, sd 1, t = 2 sqrt(3), df 2
    result = stats.paired_t_test(d)
    t = 2 * math.sqrt(3)
    assert result.t == pytest.approx(t) and result.df == 2
    assert result.p == pytest.approx(1 - t / math.sqrt(2 + t * t), rel=1e-10)  # df=2 closed form
    half = 0.95 / math.sqrt(2 * 0.975 * 0.025) / math.sqrt(3)
    assert stats.t_interval(d) == pytest.approx((2 - half, 2 + half), rel=1e-9)
    assert stats.paired_t_test([0.2, 0.2]).p == 0.0 and stats.paired_t_test([0.0, 0.0]).p == 1.0
    assert math.isnan(stats.paired_t_test([1.0]).p) and all(math.isnan(x) for x in stats.t_interval([1.0]))


def naive_sign_flip(diffs):
    obs = abs(sum(diffs))
    patterns = list(product((1, -1), repeat=len(diffs)))
    return sum(abs(sum(s * d for s, d in zip(signs, diffs))) >= obs - 1e-12 for signs in patterns) / len(patterns)


def test_sign_flip_is_exact():
    assert stats.sign_flip_p([1.0, 2.0, 3.0]) == 0.25  # sums 6, 0, 2, -4, 4, -2, 0, -6: two reach |6|
    assert stats.sign_flip_p([0.01] * 8) == 2 / 256
    for diffs in ([0.3, -0.1, 0.2, 0.05], [-0.02, -0.03, 0.01, -0.04, -0.01], [0.0, 0.0]):
        assert stats.sign_flip_p(diffs) == naive_sign_flip(diffs)
    with pytest.raises(ValueError, match="2\\^n"):
        stats.sign_flip_p([0.1] * 21)


def test_minimum_detectable_effect_and_sample_size():
    t975_2, t80_2 = 0.95 / math.sqrt(2 * 0.975 * 0.025), 0.6 / math.sqrt(2 * 0.8 * 0.2)
    assert stats.mde(sd=1.0, n=3) == pytest.approx((t975_2 + t80_2) / math.sqrt(3), rel=1e-9)
    assert stats.mde(sd=0.5, n=8) == pytest.approx((2.3646242516 + 0.8960296443) * 0.5 / math.sqrt(8), rel=1e-8)
    n = stats.n_for_mde(sd=0.0025, target=0.004)
    assert stats.mde(sd=0.0025, n=n) <= 0.004 < stats.mde(sd=0.0025, n=n - 1)
    assert stats.n_for_mde(sd=0.0025, target=-0.004) == n
    assert math.isnan(stats.mde(sd=1.0, n=1))
    with pytest.raises(ValueError, match="nonzero target"):
        stats.n_for_mde(sd=1.0, target=0.0)


def test_holm_by_hand():
    # sorted 0.005, 0.01, 0.03, 0.04 -> 4*0.005, 3*0.01, 2*0.03, max(0.06, 1*0.04)
    assert stats.holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert stats.holm([0.5, 0.9]) == pytest.approx([1.0, 1.0])
    adjusted = stats.holm([0.01, float("nan")])  # the untestable endpoint still counts in m
    assert adjusted[0] == pytest.approx(0.02) and math.isnan(adjusted[1])


def test_bootstrap_interval_is_seeded_and_percentile():
    assert stats.bootstrap_interval([0.0, 1.0]) == (0.0, 1.0)  # means 0, .5, 1 with mass 1/4, 1/2, 1/4
    assert stats.bootstrap_interval([0.3, 0.3, 0.3]) == pytest.approx((0.3, 0.3))
    d = [0.1, -0.05, 0.2, 0.03, 0.07, 0.12]
    assert stats.bootstrap_interval(d, seed=3) == stats.bootstrap_interval(d, seed=3)
    lo, hi = stats.bootstrap_interval(d)
    assert min(d) < lo < stats.mean(d) < hi < max(d)
    t_lo, t_hi = stats.t_interval(d)
    assert hi - lo < t_hi - t_lo  # percentile bootstrap is narrower than t at small n


def test_against_scipy_where_installed():
    scipy_stats = pytest.importorskip("scipy.stats")
    for df in (1, 2, 5, 12, 40):
        for q in (0.6, 0.8, 0.9, 0.975, 0.995):
            assert stats.t_ppf(q, df) == pytest.approx(scipy_stats.t.ppf(q, df), rel=1e-8)
    d = [-0.0075, -0.005, -0.010, -0.004]
    assert stats.paired_t_test(d).p == pytest.approx(scipy_stats.ttest_1samp(d, 0.0).pvalue, rel=1e-8)
