"""The policy's state s = {SNR, W, H, ρ, r / r_max} (paper §III-C), normalised to [0, 1]."""

from __future__ import annotations

import math

import numpy as np

SNR_RANGE_DB = (-20.0, 40.0)
"""SNR values mapped linearly onto [0, 1] (clipped outside)."""
LOG10_BANDWIDTH_RANGE = (3.0, 9.0)
"""log10 of the bandwidth in Hz mapped onto [0, 1]: 1 kHz … 1 GHz."""


def state_vector(snr_db: float, bandwidth_hz: float, lexical_entropy: float, oov_rate: float,
                 ranks: list[int] | np.ndarray, r_max: int) -> np.ndarray:
    """The normalised state (4 + D,) float32: [SNR, W, H, ρ, r_1/r_max … r_D/r_max]."""
    lo, hi = SNR_RANGE_DB
    blo, bhi = LOG10_BANDWIDTH_RANGE
    head = [
        (snr_db - lo) / (hi - lo),
        (math.log10(bandwidth_hz) - blo) / (bhi - blo),
        lexical_entropy,
        oov_rate,
    ]
    vector = np.concatenate([np.asarray(head, dtype=np.float64), np.asarray(ranks, dtype=np.float64) / r_max])
    return np.clip(np.nan_to_num(vector, nan=0.0), 0.0, 1.0).astype(np.float32)
