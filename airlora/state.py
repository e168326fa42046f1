"""The policy's state s = {SNR, W, H, ρ, progress, r / r_max} (paper §III-C plus the run's progress), in [0, 1]."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from airlora.allocators.base import AllocationContext

SNR_RANGE_DB = (-20.0, 40.0)
"""SNR values mapped linearly onto [0, 1] (clipped outside)."""
LOG10_BANDWIDTH_RANGE = (3.0, 9.0)
"""log10 of the bandwidth in Hz mapped onto [0, 1]: 1 kHz … 1 GHz."""
HEAD_FEATURES = 5
"""Entries before the ranks: SNR, W, H, ρ and the run's progress; the state has HEAD_FEATURES + D entries."""


def state_vector(snr_db: float, bandwidth_hz: float, lexical_entropy: float, oov_rate: float,
                 ranks: list[int] | np.ndarray, r_max: int, progress: float = 0.0) -> np.ndarray:
    """The normalised state (5 + D,) float32: [SNR, W, H, ρ, progress, r_1/r_max … r_D/r_max].

    The paper's state is {SNR, W, H, ρ, r}; the progress (share of the run's steps done) is added because the
    loss falls as training goes on, and a value function or critic that cannot see when a reward was earned
    reads that trend as the effect of the action (measured: the step index explained ~99 % of the variance of
    the old episode-terminal advantages on a real run's rewards).
    """
    lo, hi = SNR_RANGE_DB
    blo, bhi = LOG10_BANDWIDTH_RANGE
    head = [
        (snr_db - lo) / (hi - lo),
        (math.log10(bandwidth_hz) - blo) / (bhi - blo),
        lexical_entropy,
        oov_rate,
        progress,
    ]
    vector = np.concatenate([np.asarray(head, dtype=np.float64), np.asarray(ranks, dtype=np.float64) / r_max])
    return np.clip(np.nan_to_num(vector, nan=0.0), 0.0, 1.0).astype(np.float32)


def state_of(ctx: AllocationContext, keys: list[str]) -> np.ndarray:
    """``state_vector`` of what an allocator sees before a step, the ranks in the order of ``keys``."""
    return state_vector(ctx.snr_db, ctx.bandwidth_hz, ctx.lexical_entropy, ctx.oov_rate, [ctx.ranks[k] for k in keys],
                        ctx.budget.r_max, ctx.progress)
