"""Statistical power of the paired differences: how small a difference a study can see.

The report's paired table (``stats.paired``) tests ``method − pretrain`` seed by seed on the same
split. With ``n`` seeds and the differences' sample standard deviation ``s``, a two-sided paired
t-test at level ``ALPHA`` detects a true mean difference ``δ`` with probability

    power(δ) = P(|T| > t_{1−α/2, n−1}),   T ~ noncentral t(n − 1, δ √n / s),

so the smallest difference it detects with probability ``POWER`` is the ``δ`` that solves
``power(δ) = POWER`` (:func:`detectable_difference`), and the seeds needed for a difference of
one point are the smallest ``n`` that reach it (:func:`seeds_needed`). ``s`` is the study's own
estimate, so both are estimates too: a planning figure, not a guarantee. For many seeds
``δ → (z_{1−α/2} + z_{power}) s / √n``, the normal approximation.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import scipy.optimize
import scipy.stats

ALPHA = 0.05  # two-sided level of the paired t-test
POWER = 0.8
MAX_SEEDS = 10_000  # seeds_needed gives up beyond this
POWER_STATS = ("tow", "forget_metric")  # the differences the report sizes

Row = dict[str, Any]


def power(difference: float, std: float, n: int, alpha: float = ALPHA) -> float:
    """Probability that a two-sided paired t-test over ``n`` seeds at level ``alpha`` rejects
    "no difference" when the true mean difference is ``difference`` and the differences' standard
    deviation is ``std`` (> 0)."""
    df = n - 1
    critical = scipy.stats.t.ppf(1 - alpha / 2, df)
    shift = abs(difference) * math.sqrt(n) / std
    upper = float(scipy.stats.nct.sf(critical, df, shift))
    lower = float(scipy.stats.nct.cdf(-critical, df, shift))
    if not math.isfinite(lower):  # scipy's series fails far in the tail, where it underflows
        lower = 0.0
    return upper + lower


def detectable_difference(std: float | None, n: int, target: float = POWER,
                          alpha: float = ALPHA) -> float | None:
    """The smallest true difference (in the differences' units) detected with probability
    ``target``; None with fewer than two seeds or no ``std``; 0 when every seed gave the same
    difference."""
    if std is None or n < 2 or not math.isfinite(std):
        return None
    if std == 0:
        return 0.0
    high = std / math.sqrt(n)  # a start below the answer for any target above alpha / 2
    while power(high, std, n, alpha) < target:
        high *= 2
    return float(scipy.optimize.brentq(lambda d: power(d, std, n, alpha) - target, 0.0, high,
                                       xtol=1e-9 * std))


def seeds_needed(std: float | None, difference: float = 1.0, target: float = POWER,
                 alpha: float = ALPHA) -> int | None:
    """The fewest seeds (≥ 2) whose paired t-test detects ``difference`` with probability
    ``target`` if the differences' standard deviation is ``std``; None without ``std`` or beyond
    ``MAX_SEEDS``."""
    if std is None or not math.isfinite(std):
        return None
    if std == 0:
        return 2

    def enough(n: int) -> bool:
        return power(difference, std, n, alpha) >= target

    if not enough(MAX_SEEDS):
        return None
    low, high = 2, 2
    while not enough(high):  # power grows with n: double, then bisect
        low, high = high, min(2 * high, MAX_SEEDS)
    while low < high:
        mid = (low + high) // 2
        low, high = (low, mid) if enough(mid) else (mid + 1, high)
    return high


def power_rows(paired_rows: Sequence[Row], stats: Sequence[str] = POWER_STATS) -> list[Row]:
    """Per row of ``stats.paired``: ``seeds`` and, per statistic, ``std`` (the paired
    differences'), ``detectable`` (:func:`detectable_difference`) and ``seeds_for_1pt``
    (:func:`seeds_needed` for one point)."""
    rows = []
    for row in paired_rows:
        out: Row = {k: row.get(k) for k in ("method", "group", "access", "num_identities",
                                             "baseline")}
        for name in stats:
            values = [v for v in row[name]["values"] if v is not None]
            std = row[name]["std"]
            out[name] = {"n": len(values), "std": std,
                         "detectable": detectable_difference(std, len(values)),
                         "seeds_for_1pt": seeds_needed(std)}
        out["seeds"] = list(row["seeds"])
        rows.append(out)
    return rows
