"""Statistics over seeds: a mean with its 95% confidence interval, and whether two variants differ by
more than their seed-to-seed noise (a paired t interval when both ran on the same seeds, else
Welch's interval on the difference of means).

    est = estimate([1.71, 1.69, 1.70])          # mean 1.70, sd 0.01, 95% CI +-0.025
    verdict(candidate=[1.65, 1.66], baseline=[1.70, 1.71])   # "better": lower by more than the noise

Lower is better (bits per byte). With one seed there is no interval and no verdict: the table says so
rather than pretending a single run settles a difference.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

# Two-sided 95% quantiles of Student's t (t_{0.975, df}); between table rows the next smaller df is
# used, which widens the interval (conservative).
_T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228,
         11: 2.201, 12: 2.179, 13: 2.160, 14: 2.145, 15: 2.131, 16: 2.120, 17: 2.110, 18: 2.101, 19: 2.093,
         20: 2.086, 21: 2.080, 22: 2.074, 23: 2.069, 24: 2.064, 25: 2.060, 26: 2.056, 27: 2.052, 28: 2.048,
         29: 2.045, 30: 2.042, 40: 2.021, 60: 2.000, 120: 1.980}


def t975(df: float) -> float:
    """t_{0.975, df} for df >= 1 (fractional df rounds down, to the wider interval)."""
    if not df >= 1:
        raise ValueError(f"degrees of freedom must be >= 1, got {df}")
    usable = [d for d in _T975 if d <= df]
    return 1.960 if df > 1000 else _T975[max(usable)]


@dataclass(frozen=True)
class Estimate:
    """mean of n values, their sample standard deviation (nan for n = 1), and the half-width of the
    95% confidence interval of the mean (nan for n = 1)."""

    mean: float
    sd: float
    n: int
    half_width: float


def estimate(values: list[float]) -> Estimate:
    n = len(values)
    if n == 0:
        raise ValueError("no values")
    mean = sum(values) / n
    if n == 1:
        return Estimate(mean, math.nan, 1, math.nan)
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    return Estimate(mean, sd, n, t975(n - 1) * sd / math.sqrt(n))


@dataclass(frozen=True)
class Difference:
    """candidate mean - baseline mean, and the half-width of Welch's 95% interval on it."""

    delta: float
    half_width: float
    verdict: str  # "better" | "worse" | "within noise" | "one seed"


def verdict(candidate: list[float], baseline: list[float], *, paired: bool = False) -> Difference:
    """Whether ``candidate`` is lower (better) or higher than ``baseline`` by more than the 95%
    interval of the difference; "within noise" when the interval contains 0.

    paired: the i-th values of both come from the same replicate (same seed, hence the same data
    order and, in a grid with stages, the same seed model), so the interval is the t interval of the
    per-replicate differences. Otherwise Welch's interval for independent samples, which is much wider
    when seed-to-seed variation is shared by both variants."""
    if paired:
        if len(candidate) != len(baseline):
            raise ValueError(f"paired values need equal counts, got {len(candidate)} and {len(baseline)}")
        d = estimate([c - b for c, b in zip(candidate, baseline)])
        if d.n < 2:
            return Difference(d.mean, math.nan, "one seed")
        if abs(d.mean) <= d.half_width:
            return Difference(d.mean, d.half_width, "within noise")
        return Difference(d.mean, d.half_width, "better" if d.mean < 0 else "worse")
    a, b = estimate(candidate), estimate(baseline)
    delta = a.mean - b.mean
    if a.n < 2 or b.n < 2:
        return Difference(delta, math.nan, "one seed")
    va, vb = a.sd ** 2 / a.n, b.sd ** 2 / b.n
    se = math.sqrt(va + vb)
    if se == 0:
        return Difference(delta, 0.0, "within noise" if delta == 0 else ("better" if delta < 0 else "worse"))
    df = (va + vb) ** 2 / (va ** 2 / (a.n - 1) + vb ** 2 / (b.n - 1))
    half = t975(df) * se
    if abs(delta) <= half:
        return Difference(delta, half, "within noise")
    return Difference(delta, half, "better" if delta < 0 else "worse")
