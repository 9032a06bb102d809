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
