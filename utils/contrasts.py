"""Planned paired contrasts between methods run on the same seeds: paired differences, t intervals, Holm-corrected
p-values and the smallest effect a design can detect (issue 15).

Every function takes plain Python floats (accuracy points) and uses scipy's Student t distribution; nothing here
knows about runs or configs (``exps/importance/protocol.py`` and ``utils/report.py`` feed it).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
from scipy import stats


@dataclass(frozen=True)
class Contrast:
    """One planned paired contrast ``a - b`` over the seeds both ran.

    Attributes:
        name: e.g. ``"MIST - none"``.
        n: number of paired seeds.
        mean: mean paired difference (points).
        sd: sample standard deviation of the paired differences (ddof 1; None with n < 2).
        low, high: two-sided 95% t interval of the mean difference (None with n < 2).
        p: two-sided p-value of the paired t test (None with n < 2, or when every paired difference is the same: no
            t statistic exists, so no test is made and Holm does not count the contrast).
        holm: Holm-adjusted p-value within its family (set by :func:`holm`).
        positive: seeds on which ``a > b``.
    """

    name: str
    n: int
    mean: float
    sd: Optional[float]
    low: Optional[float]
    high: Optional[float]
    p: Optional[float]
    positive: int
    holm: Optional[float] = None


def paired(name: str, a: Sequence[float], b: Sequence[float], level: float = 0.95) -> Contrast:
    """The paired contrast ``a - b`` (``a[i]`` and ``b[i]`` from the same seed).

    The interval is mean ± t_{(1+level)/2, n-1} * sd / sqrt(n); the p-value is the paired t test's
    (``scipy.stats.ttest_rel``), i.e. a one-sample t test of the differences against 0.

    Raises:
        ValueError: ``a`` and ``b`` differ in length, or are empty.
    """
    if len(a) != len(b) or not len(a):
        raise ValueError(f"a paired contrast needs two equal, non-empty lists of values (got {len(a)} and {len(b)})")
    d = np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)
    n, mean = len(d), float(d.mean())
    positive = int((d > 0).sum())
    if n < 2:
        return Contrast(name, n, mean, None, None, None, None, positive)
    sd = float(d.std(ddof=1))
    if sd == 0.0:  # every difference equal: no t statistic, so no test (not p = 0 or 1)
        return Contrast(name, n, mean, 0.0, mean, mean, None, positive)
    half = float(stats.t.ppf((1 + level) / 2, n - 1)) * sd / math.sqrt(n)
    p = float(2 * stats.t.sf(abs(mean) / (sd / math.sqrt(n)), n - 1))
    return Contrast(name, n, mean, sd, mean - half, mean + half, p, positive)


def holm(contrasts: Sequence[Contrast]) -> list[Contrast]:
    """Holm's step-down adjustment over one family: sort the m p-values ascending, p_(i) -> max_{j<=i} min(1,
    (m - j + 1) p_(j)) (Holm 1979). Contrasts without a p-value keep ``holm`` None and do not count in m.
    Returns the contrasts in their given order."""
    tested = sorted((c.p, i) for i, c in enumerate(contrasts) if c.p is not None)
    m, running, adjusted = len(tested), 0.0, {}
    for rank, (p, i) in enumerate(tested):
        running = max(running, min(1.0, (m - rank) * p))
        adjusted[i] = running
    return [Contrast(**{**c.__dict__, "holm": adjusted.get(i)}) for i, c in enumerate(contrasts)]


def detectable_effect(sd: float, n: int, alpha: float = 0.05, power: float = 0.8) -> float:
    """The smallest true mean paired difference a two-sided paired t test at level ``alpha`` detects with
    probability ``power``, for paired differences of standard deviation ``sd`` over ``n`` seeds: the delta with
    P(|T| > t_{1-alpha/2, n-1}) = power where T is non-central t with n - 1 degrees of freedom and non-centrality
    delta sqrt(n) / sd (scipy.stats.nct), found by bisection. inf for n < 2; 0 for sd 0."""
    if n < 2:
        return math.inf
    if sd == 0:
        return 0.0
    df, crit = n - 1, float(stats.t.ppf(1 - alpha / 2, n - 1))

    def power_at(delta: float) -> float:
        nc = delta * math.sqrt(n) / sd
        return float(stats.nct.sf(crit, df, nc) + stats.nct.cdf(-crit, df, nc))

    lo, hi = 0.0, sd
    while power_at(hi) < power:
        hi *= 2
    for _ in range(80):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if power_at(mid) < power else (lo, mid)
    return hi
