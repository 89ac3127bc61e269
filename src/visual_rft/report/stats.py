"""Small-sample statistics for the sweep's tables: a mean's 95% confidence interval over seeds and a
two-sided t-test of a gap (paired over seeds, or Welch's), without scipy (not a dependency).

The Student-t CDF is the regularized incomplete beta function, evaluated by its continued fraction
(modified Lentz); the quantile inverts the CDF by bisection, which is plenty for table precision."""

from __future__ import annotations

import math
import statistics
from typing import Any, Sequence

LEVEL = 0.95  # the tables' confidence level; p-values are two-sided
_TINY = 1e-300


def _beta_fraction(a: float, b: float, x: float) -> float:
    """The continued fraction of I_x(a, b) (converges fast for x < (a + 1) / (a + b + 2))."""
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1.0)
    d = 1.0 / (d if abs(d) > _TINY else _TINY)
    result = d
    for m in range(1, 500):
        for numerator in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
                          -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):
            d = 1.0 + numerator * d
            d = 1.0 / (d if abs(d) > _TINY else _TINY)
            c = 1.0 + numerator / c
            c = c if abs(c) > _TINY else _TINY
            result *= c * d
        if abs(c * d - 1.0) < 1e-15:
            break
    return result


def incomplete_beta(a: float, b: float, x: float) -> float:
    """The regularized incomplete beta function I_x(a, b), for a, b > 0 and 0 <= x <= 1."""
    if not 0.0 <= x <= 1.0:
        raise ValueError(f"incomplete_beta: x={x} is outside [0, 1]")
    if x in (0.0, 1.0):
        return x
    log_front = (math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b)
                 + a * math.log(x) + b * math.log1p(-x))
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(log_front) * _beta_fraction(a, b, x) / a
    return 1.0 - math.exp(log_front) * _beta_fraction(b, a, 1.0 - x) / b  # the symmetry keeps it converging


def t_two_sided_p(t: float, df: float) -> float:
    """P(|T| >= |t|) for Student's t with `df` (> 0, need not be whole: Welch) degrees of freedom."""
    if df <= 0:
        raise ValueError(f"t distribution needs df > 0, got {df}")
    if math.isinf(t):
        return 0.0
    return incomplete_beta(df / 2.0, 0.5, df / (df + t * t))


def t_cdf(t: float, df: float) -> float:
    tail = t_two_sided_p(t, df) / 2.0
    return 1.0 - tail if t >= 0 else tail


def t_quantile(q: float, df: float) -> float:
    """The t with CDF q (0 < q < 1), by bisection on the CDF (monotone)."""
    if not 0.0 < q < 1.0:
        raise ValueError(f"t_quantile: q={q} must be in (0, 1)")
    if q < 0.5:
        return -t_quantile(1.0 - q, df)
    low, high = 0.0, 1.0
    while t_cdf(high, df) < q:
        high *= 2.0
    for _ in range(200):
        mid = (low + high) / 2.0
        if t_cdf(mid, df) < q:
            low = mid
        else:
            high = mid
        if high - low < 1e-12 * max(1.0, high):
            break
    return (low + high) / 2.0


def _estimate(center: float, se: float, df: float | None) -> dict[str, Any]:
    """Interval and two-sided p of `center` with standard error `se` on `df` degrees of freedom.
    No interval (None) without a spread estimate (one seed); a zero spread gives a zero-width
    interval and p 0 (or 1 for a zero gap): every seed agreed exactly."""
    if df is None or df <= 0:
        return {"low": None, "high": None, "p": None, "df": None}
    if se <= 1e-12 * max(1.0, abs(center)):
        return {"low": center, "high": center, "p": 1.0 if center == 0 else 0.0, "df": df}
    half = t_quantile(0.5 + LEVEL / 2.0, df) * se
    return {"low": center - half, "high": center + half, "p": t_two_sided_p(center / se, df), "df": df}


def mean_interval(mean: float, std: float, n: int) -> dict[str, Any]:
    """The 95% t interval of a mean over n seeds from its sample std (n - 1); p tests mean = 0."""
    return _estimate(mean, std / math.sqrt(n) if n > 0 else 0.0, n - 1 if n > 1 else None)


def paired_gap(a: Sequence[float], b: Sequence[float]) -> dict[str, Any]:
    """b - a paired element by element (seed s of both): the mean difference, its interval, the
    paired t-test's p (df n - 1)."""
    if len(a) != len(b) or not a:
        raise ValueError(f"paired_gap needs two equally long, non-empty lists, got {len(a)} and {len(b)}")
    diffs = [y - x for x, y in zip(a, b)]
    std = statistics.stdev(diffs) if len(diffs) > 1 else 0.0
    return {"gap": statistics.fmean(diffs), "test": "paired", "n": len(diffs),
            **mean_interval(statistics.fmean(diffs), std, len(diffs))}


def welch_gap(mean_a: float, std_a: float, n_a: int, mean_b: float, std_b: float, n_b: int) -> dict[str, Any]:
    """mean_b - mean_a of two independent samples (summaries: mean, sample std, n): Welch's
    interval and two-sided p, with the Welch-Satterthwaite degrees of freedom."""
    gap = mean_b - mean_a
    out = {"gap": gap, "test": "welch", "n": min(n_a, n_b)}
    if min(n_a, n_b) < 2:
        return {**out, **_estimate(gap, 0.0, None)}
    va, vb = std_a ** 2 / n_a, std_b ** 2 / n_b
    if va + vb == 0:
        return {**out, **_estimate(gap, 0.0, n_a + n_b - 2)}
    df = (va + vb) ** 2 / (va ** 2 / (n_a - 1) + vb ** 2 / (n_b - 1))
    return {**out, **_estimate(gap, math.sqrt(va + vb), df)}


def cell_gap(base: dict[str, Any], other: dict[str, Any]) -> dict[str, Any]:
    """other - base for two table cells: paired when both hold per-seed values for the same seeds
    (seed s drew the same k-shot sample for both methods), Welch from mean / std / n otherwise
    (different seed lists, or a table that kept only summaries)."""
    seeds_a, seeds_b = base.get("seeds"), other.get("seeds")
    if seeds_a and seeds_a == seeds_b and base.get("values") and other.get("values"):
        return paired_gap(base["values"], other["values"])
    return welch_gap(base["mean"], base["std"], base["n"], other["mean"], other["std"], other["n"])
