"""Paired statistics for seed-matched comparisons: intervals, p-values, power, multiplicity. No scipy.

    d = paired_differences(treatment={0: 5.52, 1: 5.56}, reference={0: 5.50, 1: 5.49})   # [0.02, 0.07]
    t_interval(d)                # 95% CI of the mean difference, Student t with n-1 df
    bootstrap_interval(d, seed=0)  # 95% percentile bootstrap of the mean (seeded, 10,000 resamples)
    paired_t_test(d).p           # two-sided
    sign_flip_p(d)               # exact two-sided permutation p over all 2^n sign flips
    mde(sd=..., n=8)             # smallest true mean difference detected with 80% power
    n_for_mde(sd=..., target=0.004)
    holm([p1, p2, p3])           # Holm-adjusted p-values, same order

Conventions: d_i = treatment_i - reference_i over the seeds both have (a lower loss is a negative d).
sd is the sample standard deviation of the d_i (n-1). The t quantities use the Student t distribution
with n-1 degrees of freedom; its CDF is computed from the regularised incomplete beta function
(continued fraction, Numerical Recipes 6.4), its quantiles by bisection.

Power (`mde`, `n_for_mde`) uses the central-t approximation of a two-sided paired t test:
    MDE(n) = (t_{1-alpha/2, n-1} + t_{power, n-1}) * sd / sqrt(n)
(exact for a known sd with normal quantiles; with t quantiles it slightly overstates power against the
noncentral-t answer for small n). The sd is the one measured in the exploratory runs.
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from itertools import product

EXACT_SIGN_FLIP_MAX_N = 20  # 2^20 sign patterns; beyond that the exact test is refused


def paired_differences(*, treatment: Mapping[int, float], reference: Mapping[int, float]) -> list[float]:
    """[treatment[s] - reference[s] for s in sorted seeds]; the two must have exactly the same seeds."""
    if set(treatment) != set(reference):
        only_t = sorted(set(treatment) - set(reference))
        only_r = sorted(set(reference) - set(treatment))
        raise ValueError(f"seeds differ: only in the treatment {only_t}, only in the reference {only_r}; "
                         "pair every seed (run the missing ones) or drop the comparison")
    return [float(treatment[s]) - float(reference[s]) for s in sorted(treatment)]


def mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if len(values) else math.nan


def sample_sd(values: Sequence[float]) -> float:
    """sqrt(sum (x - mean)^2 / (n - 1)); nan for n < 2."""
    n = len(values)
    if n < 2:
        return math.nan
    m = mean(values)
    return math.sqrt(sum((v - m) ** 2 for v in values) / (n - 1))


def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction of the incomplete beta function (modified Lentz)."""
    tiny, qab, qap, qam = 1e-300, a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 500):
        m2 = 2 * m
        for aa in (m * (b - m) * x / ((qam + m2) * (a + m2)), -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))):
            d = 1.0 + aa * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + aa / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < 1e-15:
            break
    return h


def betainc(a: float, b: float, x: float) -> float:
    """Regularised incomplete beta I_x(a, b) for a, b > 0 and 0 <= x <= 1."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    log_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(log_front) * _betacf(a, b, x) / a
    return 1.0 - math.exp(log_front) * _betacf(b, a, 1.0 - x) / b


def t_sf2(t: float, df: float) -> float:
    """Two-sided tail P(|T| >= |t|) of Student's t with df degrees of freedom = I_{df/(df+t^2)}(df/2, 1/2)."""
    if math.isinf(t):
        return 0.0
    return betainc(df / 2.0, 0.5, df / (df + t * t))


def t_cdf(t: float, df: float) -> float:
    half = 0.5 * t_sf2(t, df)
    return 1.0 - half if t >= 0 else half


def t_ppf(q: float, df: float) -> float:
    """The q-quantile of Student's t (0 < q < 1), by bisection on the CDF to ~1e-12."""
    if not 0.0 < q < 1.0:
        raise ValueError(f"q={q} must be in (0, 1)")
    if q == 0.5:
        return 0.0
    if q < 0.5:
        return -t_ppf(1.0 - q, df)
    lo, hi = 0.0, 1.0
    while t_cdf(hi, df) < q:
        lo, hi = hi, hi * 2.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if t_cdf(mid, df) < q:
            lo = mid
        else:
            hi = mid
        if hi - lo < 1e-12 * max(1.0, hi):
            break
    return 0.5 * (lo + hi)


def t_interval(diffs: Sequence[float], *, confidence: float = 0.95) -> tuple[float, float]:
    """mean +- t_{(1+confidence)/2, n-1} * sd / sqrt(n); (nan, nan) for n < 2."""
    n = len(diffs)
    if n < 2:
        return math.nan, math.nan
    half = t_ppf(0.5 + confidence / 2.0, n - 1) * sample_sd(diffs) / math.sqrt(n)
    return mean(diffs) - half, mean(diffs) + half


def bootstrap_interval(diffs: Sequence[float], *, confidence: float = 0.95, resamples: int = 10_000,
                       seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap of the mean: resample the n differences with replacement `resamples` times
    (numpy Generator PCG64 seeded with `seed`), take the (1-c)/2 and (1+c)/2 quantiles (linear
    interpolation) of the resampled means. With n <= 5 it is too narrow to trust; reported beside t."""
    import numpy as np

    n = len(diffs)
    if n < 2:
        return math.nan, math.nan
    values = np.asarray(diffs, dtype=np.float64)
    index = np.random.default_rng(seed).integers(0, n, size=(resamples, n))
    means = values[index].mean(axis=1)
    lo, hi = np.quantile(means, [0.5 - confidence / 2.0, 0.5 + confidence / 2.0])
    return float(lo), float(hi)


@dataclass(frozen=True)
class TTest:
    t: float
    df: int
    p: float  # two-sided


def paired_t_test(diffs: Sequence[float]) -> TTest:
    """t = mean(d) / (sd(d) / sqrt(n)), df = n - 1, p = P(|T_df| >= |t|). All differences equal and
    nonzero: t = +-inf, p = 0; all zero: t = 0, p = 1; n < 2: nan."""
    n = len(diffs)
    if n < 2:
        return TTest(math.nan, n - 1, math.nan)
    m, sd = mean(diffs), sample_sd(diffs)
    if sd == 0.0:
        return TTest(0.0, n - 1, 1.0) if m == 0.0 else TTest(math.copysign(math.inf, m), n - 1, 0.0)
    t = m / (sd / math.sqrt(n))
    return TTest(t, n - 1, t_sf2(t, n - 1))


def sign_flip_p(diffs: Sequence[float]) -> float:
    """Exact two-sided permutation p of the paired design: under H0 each difference's sign is +-1 with
    probability 1/2; p = #{sign patterns s : |sum s_i d_i| >= |sum d_i|} / 2^n. Its smallest possible
    value is 2 / 2^n (0.25 at n = 3, 0.0078 at n = 8)."""
    n = len(diffs)
    if n == 0:
        return math.nan
    if n > EXACT_SIGN_FLIP_MAX_N:
        raise ValueError(f"n={n} differences: the exact sign-flip test enumerates 2^n patterns; "
                         f"use it for n <= {EXACT_SIGN_FLIP_MAX_N} and the paired t test beyond")
    observed = abs(sum(diffs))
    tolerance = 1e-12 * max(1.0, sum(abs(d) for d in diffs))
    hits = sum(abs(sum(s * d for s, d in zip(signs, diffs))) >= observed - tolerance
               for signs in product((1.0, -1.0), repeat=n))
    return hits / 2 ** n


def mde(*, sd: float, n: int, alpha: float = 0.05, power: float = 0.8) -> float:
    """Minimum detectable mean difference of a two-sided paired t test with n pairs (central-t
    approximation): (t_{1-alpha/2, n-1} + t_{power, n-1}) * sd / sqrt(n)."""
    if n < 2 or not math.isfinite(sd):
        return math.nan
    return (t_ppf(1.0 - alpha / 2.0, n - 1) + t_ppf(power, n - 1)) * sd / math.sqrt(n)


def n_for_mde(*, sd: float, target: float, alpha: float = 0.05, power: float = 0.8, max_n: int = 10_000) -> int:
    """The smallest n >= 2 with mde(sd=sd, n=n) <= |target|."""
    target = abs(target)
    if not (math.isfinite(sd) and sd >= 0 and target > 0):
        raise ValueError(f"n_for_mde needs a finite sd >= 0 and a nonzero target (sd={sd}, target={target})")
    for n in range(2, max_n + 1):
        if mde(sd=sd, n=n, alpha=alpha, power=power) <= target:
            return n
    raise ValueError(f"more than {max_n} pairs needed to detect {target} with sd {sd}")


def holm(pvalues: Sequence[float]) -> list[float]:
    """Holm's step-down adjustment, returned in input order: with p_(1) <= ... <= p_(m),
    adj_(i) = min(1, max_{j <= i} (m - j + 1) * p_(j)). A nan p-value (an endpoint that could not be
    tested) counts in m as p = 1 and stays nan in the output."""
    m = len(pvalues)
    filled = [1.0 if p is None or math.isnan(p) else float(p) for p in pvalues]
    order = sorted(range(m), key=lambda i: filled[i])
    adjusted, running = [0.0] * m, 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * filled[i]))
        adjusted[i] = running
    return [math.nan if p is None or math.isnan(p) else a for p, a in zip(pvalues, adjusted)]
