"""Summaries over seeds for the reports: mean ± std strings."""

from __future__ import annotations

import math
import statistics
from typing import List


def ms(xs) -> str:
    """Mean ± std over seeds, compact (None and NaN dropped; "n/a" if nothing is left)."""
    xs = [x for x in xs if x is not None and not (isinstance(x, float) and math.isnan(x))]
    if not xs:
        return "n/a"
    if len(xs) == 1:
        return f"{xs[0]:.3g}"
    m, s = statistics.mean(xs), statistics.stdev(xs)
    return f"{m:.2f} ± {s:.2f}" if abs(m) >= 1 else f"{m:.3g} ± {s:.2g}"


def mean_std(xs: List[float]) -> str:
    """Mean ± std over seeds with three decimals (one from 100 on)."""
    if len(xs) == 1:
        return f"{xs[0]:.3f}" if abs(xs[0]) < 100 else f"{xs[0]:.1f}"
    m, s = statistics.mean(xs), statistics.stdev(xs)
    return f"{m:.3f} ± {s:.3f}" if abs(m) < 100 else f"{m:.1f} ± {s:.1f}"


# two-sided 95% quantiles of Student's t, by degrees of freedom (1.96 beyond the table)
_T975 = {
    1: 12.706,
    2: 4.303,
    3: 3.182,
    4: 2.776,
    5: 2.571,
    6: 2.447,
    7: 2.365,
    8: 2.306,
    9: 2.262,
    10: 2.228,
    11: 2.201,
    12: 2.179,
    13: 2.160,
    14: 2.145,
    15: 2.131,
    16: 2.120,
    17: 2.110,
    18: 2.101,
    19: 2.093,
    20: 2.086,
    25: 2.060,
    30: 2.042,
}


def t975(df: int) -> float:
    if df in _T975:
        return _T975[df]
    below = [k for k in _T975 if k < df]
    return _T975[max(below)] if df <= 30 else 1.96


def paired(a, b) -> dict:
    """Per-seed differences a - b (the runs of a seed share initial weights, data order and noise
    draw): mean, std, n and the 95% t-interval of the mean."""
    d = [x - y for x, y in zip(a, b)]
    n = len(d)
    m = statistics.mean(d)
    sd = statistics.stdev(d) if n > 1 else math.nan
    half = t975(n - 1) * sd / math.sqrt(n) if n > 1 else math.nan
    return {"mean": m, "std": sd, "n": n, "lo": m - half, "hi": m + half, "per_seed": d}


def ci(p: dict, digits: int = 2) -> str:
    """'+1.23 [+0.45, +2.01]' from ``paired``'s dict."""
    if math.isnan(p["lo"]):
        return f"{p['mean']:+.{digits}f}"
    return f"{p['mean']:+.{digits}f} [{p['lo']:+.{digits}f}, {p['hi']:+.{digits}f}]"
