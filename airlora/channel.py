"""The wireless link the adapter is delivered over (paper §III-B).

Capacity C of a block-fading link (AWGN, Rayleigh ergodic closed form, Rician by Monte Carlo), the scale-matched
bandwidth, and the per-step SNR schedule. The airtime budget (``Budget``: airtime of a (ranks, precisions) mapping,
the paper's η = T / T_max, the projection onto {0..r_max}^M ∩ {T ≤ T_max}) lives in ``airlora.budget`` and is
re-exported here, with its helpers.
"""

from __future__ import annotations

import functools
import math
from pathlib import Path

import numpy as np
import scipy.special

from airlora.budget import Budget, PrecisionMap, RanksLike, airtime_of_params_s, module_cost, param_cap
from airlora.config import ChannelConfig
from airlora.errors import AirloraError

__all__ = ["Budget", "PrecisionMap", "RanksLike", "SnrSchedule", "airtime_of_params_s", "capacity_awgn_bps",
           "capacity_bps", "capacity_monte_carlo_bps", "capacity_rayleigh_bps", "db_to_linear", "module_cost",
           "param_cap", "scale_matched_bandwidth_hz"]

OPT_1_3B_SHAPES_PER_LAYER: dict[str, tuple[int, int]] = {
    **dict.fromkeys(("q", "k", "v", "o"), (2048, 2048)), "fc1": (2048, 8192), "fc2": (8192, 2048)}
"""(d_in, d_out) of each adapted module of one OPT-1.3B layer (hidden 2048, FFN 8192): the paper's model."""
OPT_1_3B_NUM_LAYERS = 24
"""Transformer layers of OPT-1.3B."""
REFERENCE_BANDWIDTH_HZ = 100e6
"""The paper's bandwidth W (with T_max = 1 s) for OPT-1.3B."""

# Below this 1/γ, exp(x)·E1(x) is evaluated directly; above it E1 heads for underflow and the asymptotic
# series Σ (−1)^k k!/x^(k+1) with 20 terms is accurate to ~3e-16 relative (first omitted term 20!/50^20).
_SERIES_FROM_X = 50.0
_SERIES_TERMS = 20
# Rician capacity is a Monte Carlo estimate; a fixed seed makes it a deterministic function of its arguments
# and uses common random numbers across SNRs, so capacity stays monotone in SNR.
_MONTE_CARLO_SEED = 20250715
_SNR_LIMIT_DB = 300.0


def _check_link(snr_db: float, bandwidth_hz: float) -> None:
    # ±300 dB keeps γ and 1/γ well inside double range (10^±30) while covering any physical link.
    if not (math.isfinite(snr_db) and abs(snr_db) <= _SNR_LIMIT_DB):
        raise AirloraError(f"snr_db = {snr_db!r} is not allowed; expected a number of dB in [-300, 300]")
    if not (math.isfinite(bandwidth_hz) and bandwidth_hz > 0):
        raise AirloraError(f"bandwidth_hz = {bandwidth_hz!r} is not allowed; expected a positive number of Hz")


def db_to_linear(snr_db: float) -> float:
    """Power ratio γ = 10^(dB/10)."""
    return 10.0 ** (snr_db / 10.0)


def capacity_awgn_bps(snr_db: float, bandwidth_hz: float) -> float:
    """Shannon capacity W·log2(1 + γ) of a link without fading, in bit/s."""
    _check_link(snr_db, bandwidth_hz)
    return bandwidth_hz * math.log1p(db_to_linear(snr_db)) / math.log(2)


def _exp_e1(x: float) -> float:
    """exp(x)·E1(x) for x > 0 without overflow (large x) or underflow of E1."""
    if x <= _SERIES_FROM_X:
        return math.exp(x) * float(scipy.special.exp1(x))
    term, total = 1.0 / x, 0.0
    for k in range(_SERIES_TERMS):
        total += term
        term *= -(k + 1) / x
    return total


def capacity_rayleigh_bps(snr_db: float, bandwidth_hz: float) -> float:
    """Ergodic Rayleigh capacity E[W·log2(1 + |h|²γ)] = W·e^(1/γ)·E1(1/γ)/ln 2, in bit/s (stable over ±300 dB)."""
    _check_link(snr_db, bandwidth_hz)
    return bandwidth_hz * _exp_e1(1.0 / db_to_linear(snr_db)) / math.log(2)


def capacity_monte_carlo_bps(snr_db: float, bandwidth_hz: float, fading: str, rician_k: float, samples: int,
                             rng: np.random.Generator) -> float:
    """Monte Carlo E_h[W·log2(1 + |h|²γ)] with E|h|² = 1 for fading 'rayleigh', 'rician' (K factor) or 'awgn'."""
    _check_link(snr_db, bandwidth_hz)
    if samples < 1:
        raise AirloraError(f"samples = {samples!r} is not allowed; expected an integer >= 1")
    if fading == "awgn":
        gain = np.ones(samples)  # (S,)
    elif fading in ("rayleigh", "rician"):
        k = 0.0 if fading == "rayleigh" else float(rician_k)
        if not (math.isfinite(k) and k >= 0):
            raise AirloraError(f"rician_k = {rician_k!r} is not allowed; expected a finite number >= 0")
        scattered = (rng.standard_normal(samples) + 1j * rng.standard_normal(samples)) / math.sqrt(2.0)  # CN(0, 1)
        h = math.sqrt(k / (k + 1.0)) + math.sqrt(1.0 / (k + 1.0)) * scattered
        gain = np.abs(h) ** 2
    else:
        raise AirloraError(f"fading = {fading!r} is not allowed; expected 'rayleigh', 'rician' or 'awgn'")
    return bandwidth_hz * float(np.mean(np.log1p(gain * db_to_linear(snr_db)))) / math.log(2)


@functools.lru_cache(maxsize=4096)
def _capacity_cached(snr_db: float, bandwidth_hz: float, fading: str, rician_k: float, samples: int) -> float:
    if fading == "awgn":
        return capacity_awgn_bps(snr_db, bandwidth_hz)
    if fading == "rayleigh":
        return capacity_rayleigh_bps(snr_db, bandwidth_hz)
    rng = np.random.default_rng(_MONTE_CARLO_SEED)
    return capacity_monte_carlo_bps(snr_db, bandwidth_hz, fading, rician_k, samples, rng)


def capacity_bps(snr_db: float, config: ChannelConfig, bandwidth_hz: float) -> float:
    """Capacity under ``config.fading`` at mean SNR ``snr_db``; deterministic and cached (asked every step)."""
    # ChannelConfig is a mutable dataclass (unhashable), so the cache is keyed on the fields that matter.
    return _capacity_cached(float(snr_db), float(bandwidth_hz), config.fading, float(config.rician_k),
                            int(config.monte_carlo_samples))


def scale_matched_bandwidth_hz(shapes: dict[str, tuple[int, int]]) -> float:
    """Bandwidth giving our model the paper's full-r_max η: 100 MHz × Σcost(ours) / Σcost(OPT-1.3B).

    η_full = r_max·Σcost·b / (C·T_max) and C ∝ W for a fixed SNR and fading, so matching η to OPT-1.3B at
    100 MHz, 1 s gives this ratio, independent of r_max, SNR, T_max and b (the same T_max is assumed).
    """
    if not shapes:
        raise AirloraError("shapes is empty; expected at least one 'layers.<i>.<module>' -> (d_in, d_out)")
    ours = sum(module_cost(d_in, d_out) for d_in, d_out in shapes.values())
    opt = OPT_1_3B_NUM_LAYERS * sum(module_cost(d_in, d_out) for d_in, d_out in OPT_1_3B_SHAPES_PER_LAYER.values())
    return REFERENCE_BANDWIDTH_HZ * ours / opt


class SnrSchedule:
    """The mean SNR of each step: a pure function of (seed, step), constant over blocks of snr_block_steps."""

    def __init__(self, config: ChannelConfig, seed: int) -> None:
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
            raise AirloraError(f"seed = {seed!r} is not allowed; expected an integer >= 0")
        self.seed = int(seed)
        self.kind = config.snr_schedule
        self.block_steps = int(config.snr_block_steps)
        self.values: tuple[float, ...] = tuple(config.snr_db)
        if self.kind == "trace":
            self.values = _read_trace(config.snr_trace)

    def snr_db(self, step: int) -> float:
        """SNR in dB at ``step`` (0-based); no hidden state, so a resumed run sees the same SNRs."""
        if isinstance(step, bool) or not isinstance(step, (int, np.integer)) or step < 0:
            raise AirloraError(f"step = {step!r} is not allowed; expected an integer >= 0")
        block = int(step) // self.block_steps
        if len(self.values) == 1:
            return self.values[0]
        if self.kind == "random":
            # A generator seeded by (seed, block) rather than one long stream: any step is reproducible alone.
            return self.values[int(np.random.default_rng([self.seed, block]).integers(len(self.values)))]
        return self.values[block % len(self.values)]  # 'cycle' over snr_db, 'trace' over the file, wrapping


def _read_trace(path_text: str | None) -> tuple[float, ...]:
    """SNRs in dB from a file with one number per line; blank lines and '#' comments are skipped."""
    allowed = "one finite SNR in dB per line (blank lines and '#' comments are skipped)"
    if path_text is None:
        raise AirloraError("channel.snr_trace is not set; expected a file path when snr_schedule is 'trace'")
    try:
        lines = Path(path_text).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise AirloraError(f"SNR trace {path_text!r} cannot be read ({err.__class__.__name__}); expected {allowed}") \
            from None
    values = []
    for number, line in enumerate(lines, start=1):
        text = line.split("#", 1)[0].strip()
        if not text:
            continue
        try:
            value = float(text)
        except ValueError:
            value = math.nan
        if not math.isfinite(value):
            raise AirloraError(f"SNR trace {path_text!r} line {number}: {text!r} is not allowed; expected {allowed}")
        values.append(value)
    if not values:
        raise AirloraError(f"SNR trace {path_text!r} has no values; expected {allowed}")
    return tuple(values)
