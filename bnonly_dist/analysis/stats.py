"""The claims' one statistical rule: Welch's 95 % interval of a difference of means over seeds.

Student's t quantile from the regularised incomplete beta function (continued fraction,
Numerical Recipes 6.4), so the analysis needs nothing beyond the standard library.
"""
from __future__ import annotations

import math
import statistics
from dataclasses import dataclass

LEVEL = 0.95


def _betacf(a: float, b: float, x: float) -> float:
    tiny = 1e-300
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1.0)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 300):
        for numerator in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
                          -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):
            d = 1.0 + numerator * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + numerator / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < 1e-14:
            break
    return h


def _betainc(a: float, b: float, x: float) -> float:
    """I_x(a, b)."""
    if x <= 0.0 or x >= 1.0:
        return max(0.0, min(1.0, x))
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x))
    if x < (a + 1.0) / (a + b + 2.0):
        return front * _betacf(a, b, x) / a
    return 1.0 - front * _betacf(b, a, 1.0 - x) / b


def t_cdf(t: float, df: float) -> float:
    tail = 0.5 * _betainc(df / 2.0, 0.5, df / (df + t * t))
    return 1.0 - tail if t > 0 else tail


def t_quantile(p: float, df: float) -> float:
    """The t with P(T <= t) = p under df degrees of freedom (df may be fractional, as Welch's is)."""
    lo, hi = 0.0, 1.0
    while t_cdf(hi, df) < p:
        hi *= 2.0
    for _ in range(200):
        mid = (lo + hi) / 2.0
        lo, hi = (mid, hi) if t_cdf(mid, df) < p else (lo, mid)
    return (lo + hi) / 2.0


@dataclass(frozen=True)
class Difference:
    diff: float  # mean(a) - mean(b)
    low: float | None  # the 95 % interval; None with fewer than two seeds on a side
    high: float | None
    df: float | None


def welch(a: list[float], b: list[float]) -> Difference:
    """mean(a) - mean(b) and Welch's 95 % interval (unequal variances, Welch-Satterthwaite df)."""
    diff = statistics.fmean(a) - statistics.fmean(b)
    if len(a) < 2 or len(b) < 2:
        return Difference(diff, None, None, None)
    va, vb = statistics.variance(a) / len(a), statistics.variance(b) / len(b)
    se = math.sqrt(va + vb)
    if se == 0.0:  # every seed gave the same number on both sides: the interval is the difference itself
        return Difference(diff, diff, diff, math.inf)
    df = (va + vb) ** 2 / ((va ** 2 / (len(a) - 1) if va else 0.0) + (vb ** 2 / (len(b) - 1) if vb else 0.0))
    half = t_quantile(1 - (1 - LEVEL) / 2, df) * se
    return Difference(diff, diff - half, diff + half, df)


def mean_interval(values: list[float]) -> tuple[float, float] | None:
    """The t 95 % interval of a mean (None with one value)."""
    if len(values) < 2:
        return None
    mean, se = statistics.fmean(values), statistics.stdev(values) / math.sqrt(len(values))
    half = t_quantile(1 - (1 - LEVEL) / 2, len(values) - 1) * se
    return mean - half, mean + half
