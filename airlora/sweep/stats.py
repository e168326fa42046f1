"""Means with 95 % confidence intervals over seeds, and paired differences between methods."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy import stats


@dataclass(frozen=True)
class Estimate:
    """Mean of ``n`` values with the half-width of its 95 % Student-t interval (nan when n < 2)."""

    mean: float
    half_width: float
    n: int

    @property
    def low(self) -> float:
        return self.mean - self.half_width

    @property
    def high(self) -> float:
        return self.mean + self.half_width

    def format(self, digits: int = 4, scale: float = 1.0) -> str:
        """``0.8810 ± 0.0040 (n=3)``; a single value has no interval."""
        if self.n == 0:
            return "–"
        mean = self.mean * scale
        if self.n < 2:
            return f"{mean:.{digits}f} (n=1)"
        return f"{mean:.{digits}f} ± {self.half_width * scale:.{digits}f} (n={self.n})"


def mean_ci(values: list[float] | np.ndarray, level: float = 0.95) -> Estimate:
    """Mean and t-interval half-width of ``values``."""
    x = np.asarray(values, dtype=float)
    n = int(x.size)
    if n == 0:
        return Estimate(math.nan, math.nan, 0)
    if n == 1:
        return Estimate(float(x[0]), math.nan, 1)
    sem = float(np.std(x, ddof=1) / math.sqrt(n))
    return Estimate(float(x.mean()), float(stats.t.ppf(0.5 + level / 2, n - 1) * sem), n)


def paired(a: dict[Any, float], b: dict[Any, float]) -> Estimate:
    """Mean ± CI of a − b over the keys both have; keys are seeds (same seed = same data split and
    initialisation), or (seed, setting) pairs."""
    keys = sorted(set(a) & set(b), key=str)
    return mean_ci([a[k] - b[k] for k in keys])


def verdict(diff: Estimate, claimed_sign: int = 1) -> str:
    """'holds' when the interval excludes 0 on the claimed side, 'does not hold' when on the other,
    'inconclusive' otherwise (including fewer than 2 seeds)."""
    if diff.n < 2 or math.isnan(diff.half_width):
        return "inconclusive (fewer than 2 seeds)"
    low, high = diff.low * claimed_sign, diff.high * claimed_sign
    if low > 0:
        return "holds"
    if high < 0:
        return "does not hold"
    return "inconclusive at this scale"
