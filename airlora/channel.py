"""The wireless link and the airtime budget the adapter must fit (paper §III-B).

Capacity C of a block-fading link (AWGN, Rayleigh ergodic closed form, Rician by Monte Carlo), the
airtime T = Σ_m r_m·cost_m·b / C of a rank mapping, the paper's η = T / T_max, the projection of any
rank vector onto {0..r_max}^M ∩ {T ≤ T_max}, and the per-step SNR schedule.
Dimension letters: M = number of adapted modules (6L), N = Σ_m r_m candidate triplets.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import scipy.special

from airlora.config import ChannelConfig
from airlora.errors import AirloraError
from airlora.ranks import MODULES, RankMap, parse_key

OPT_1_3B_SHAPES_PER_LAYER: dict[str, tuple[int, int]] = {
    **dict.fromkeys(("q", "k", "v", "o"), (2048, 2048)), "fc1": (2048, 8192), "fc2": (8192, 2048)}
"""(d_in, d_out) of each adapted module of one OPT-1.3B layer (hidden 2048, FFN 8192): the paper's model."""
OPT_1_3B_NUM_LAYERS = 24
"""Transformer layers of OPT-1.3B."""
REFERENCE_BANDWIDTH_HZ = 100e6
"""The paper's bandwidth W (with T_max = 1 s) for OPT-1.3B."""

RanksLike = Mapping[str, float] | np.ndarray

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


def module_cost(d_in: int, d_out: int) -> int:
    """Parameters on the air per unit rank: a column of P (d_out), a row of Q (d_in) and one λ."""
    if not all(isinstance(d, (int, np.integer)) and not isinstance(d, bool) and d >= 1 for d in (d_in, d_out)):
        raise AirloraError(f"module shape ({d_in!r}, {d_out!r}) is not allowed; expected two integers >= 1")
    return int(d_in) + int(d_out) + 1


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


def _canonical(key: str) -> tuple[int, int]:
    layer, module = parse_key(key)
    return layer, MODULES.index(module)


def airtime_of_params_s(params: int, bits_per_param: int, capacity_bps: float) -> float:
    """The one airtime expression, (P·b)/C: every airtime and feasibility figure goes through here."""
    return (params * bits_per_param) / capacity_bps


def param_cap(bits_per_param: int, capacity_bps: float, t_max_s: float) -> int:
    """Largest parameter count P whose airtime (P·b)/C is within T_max, by that same float expression.

    Airtime is monotone in P, so "params ≤ cap" is the feasibility test in exact integers, which lets the
    projection and the allocators work on integer sums.
    """
    cap = int(t_max_s * capacity_bps // bits_per_param)
    while cap > 0 and airtime_of_params_s(cap, bits_per_param, capacity_bps) > t_max_s:
        cap -= 1
    while airtime_of_params_s(cap + 1, bits_per_param, capacity_bps) <= t_max_s:
        cap += 1
    return cap


@dataclass(frozen=True, eq=False)  # eq=False: ndarray fields make generated __eq__/__hash__ ill-defined
class Budget:
    """The airtime budget of one step: Σ_m r_m·cost_m·b / C + reserved ≤ T_max, 0 ≤ r ≤ r_max."""

    keys: tuple[str, ...]
    """Rank keys in canonical order (layer-major, then q, k, v, o, fc1, fc2)."""
    costs: np.ndarray
    """int64 (M,): parameters on the air per unit rank of each key, d_in + d_out + 1."""
    r_max: int
    """Largest rank of any one module."""
    bits_per_param: int
    """Bits b per transmitted parameter."""
    capacity_bps: float
    """Link capacity C at this step's SNR, in bit/s."""
    t_max_s: float
    """Latency budget T_max, in seconds."""
    reserved_params: int = 0
    """Parameters always sent (the task head); counted in every params/bits/airtime/η figure."""

    def __post_init__(self) -> None:
        costs = np.array(self.costs, dtype=np.int64).reshape(-1)  # (M,) private copy, then frozen
        costs.flags.writeable = False
        object.__setattr__(self, "costs", costs)
        object.__setattr__(self, "keys", tuple(self.keys))
        if len(self.keys) == 0 or len(self.keys) != costs.size:
            raise AirloraError(f"budget has {len(self.keys)} keys and {costs.size} costs; expected one cost per key")
        if np.any(costs < 1):
            raise AirloraError("budget costs must all be integers >= 1 (d_in + d_out + 1)")
        for name, ok, allowed in (
            ("r_max", self.r_max >= 1, "an integer >= 1"),
            ("bits_per_param", self.bits_per_param >= 1, "an integer >= 1"),
            ("capacity_bps", math.isfinite(self.capacity_bps) and self.capacity_bps > 0, "a positive number"),
            ("t_max_s", math.isfinite(self.t_max_s) and self.t_max_s > 0, "a positive number of seconds"),
            ("reserved_params", self.reserved_params >= 0, "an integer >= 0"),
        ):
            if not ok:
                raise AirloraError(f"budget {name} = {getattr(self, name)!r} is not allowed; expected {allowed}")
        object.__setattr__(self, "_param_cap", param_cap(self.bits_per_param, self.capacity_bps, self.t_max_s))

    @classmethod
    def for_model(cls, shapes: dict[str, tuple[int, int]], r_max: int, bits_per_param: int, capacity_bps: float,
                  t_max_s: float, reserved_params: int = 0) -> Budget:
        """Budget over the modules in ``shapes`` (rank key -> (d_in, d_out)), keys put in canonical order."""
        keys = sorted(shapes, key=_canonical)
        costs = np.array([module_cost(*shapes[key]) for key in keys], dtype=np.int64)
        return cls(tuple(keys), costs, r_max, bits_per_param, capacity_bps, t_max_s, reserved_params)

    def _seconds(self, params: int) -> float:
        return airtime_of_params_s(params, self.bits_per_param, self.capacity_bps)

    def room(self, ranks: RanksLike) -> int:
        """Parameters that can still be added to ``ranks`` within the budget (negative when already over)."""
        return self._param_cap - self.params(ranks)

    def _raw(self, ranks: RanksLike, what: str = "ranks") -> np.ndarray:
        """Values in key order as float64 (M,), from a mapping with exactly our keys or an (M,) array."""
        if isinstance(ranks, Mapping):
            known = set(self.keys)
            unknown = [key for key in ranks if key not in known]
            if unknown:
                raise AirloraError(f"{what} key {unknown[0]!r} is not a module of this model; "
                                   f"allowed: {self.keys[0]} … {self.keys[-1]}")
            missing = [key for key in self.keys if key not in ranks]
            if missing:
                raise AirloraError(f"{what} lack key {missing[0]!r} ({len(missing)} missing); give every module")
            values = [ranks[key] for key in self.keys]
        else:
            values = ranks
        try:
            raw = np.asarray(values, dtype=np.float64)
        except (TypeError, ValueError):
            raise AirloraError(f"{what} must be numbers, one per module") from None
        if raw.shape != (len(self.keys),):
            raise AirloraError(f"{what} has shape {raw.shape}; expected ({len(self.keys)},), one value per module")
        return raw

    def vector(self, ranks: RanksLike) -> np.ndarray:
        """Ranks as int64 (M,) in key order; every key must be present and every value a whole number >= 0."""
        raw = self._raw(ranks)
        bad = ~np.isfinite(raw) | (raw < 0) | (raw != np.floor(raw))
        if np.any(bad):
            m = int(np.argmax(bad))
            raise AirloraError(f"rank of {self.keys[m]!r} is {float(raw[m])!r}; allowed: an integer >= 0")
        return raw.astype(np.int64)

    def params(self, ranks: RanksLike) -> int:
        """Parameters on the air: Σ r·cost + reserved_params (exact integer)."""
        return int(np.dot(self.vector(ranks), self.costs)) + self.reserved_params

    def bits(self, ranks: RanksLike) -> int:
        """Bits on the air: params × bits_per_param."""
        return self.params(ranks) * self.bits_per_param

    def airtime_s(self, ranks: RanksLike) -> float:
        """Transmission time bits / C, in seconds."""
        return self._seconds(self.params(ranks))

    def eta(self, ranks: RanksLike) -> float:
        """The paper's η = bits / (C·T_max): the share of the airtime budget used (≤ 1 when feasible)."""
        # Written as airtime / T_max so that feasible (airtime ≤ T_max) always implies η ≤ 1 in floats too.
        return self.airtime_s(ranks) / self.t_max_s

    def feasible(self, ranks: RanksLike) -> bool:
        """True when every rank is an integer in [0, r_max] and airtime_s(ranks) ≤ t_max_s."""
        raw = self._raw(ranks)
        if not np.all(np.isfinite(raw) & (raw >= 0) & (raw <= self.r_max) & (raw == np.floor(raw))):
            return False
        return self.airtime_s(raw) <= self.t_max_s

    def max_uniform_rank(self) -> int:
        """Largest common rank r ≤ r_max for every module that is feasible (0 if none)."""
        room = self._param_cap - self.reserved_params
        return 0 if room < 0 else min(self.r_max, room // int(self.costs.sum()))

    def nothing_fits(self) -> bool:
        """True when only all-zero ranks can fit: one triplet on the cheapest module (or the reserved) breaks it."""
        return self.reserved_params + int(self.costs.min()) > self._param_cap

    def _as_ranks(self, vector: np.ndarray) -> RankMap:
        """An (M,) integer vector as a rank mapping in key order."""
        return {key: int(r) for key, r in zip(self.keys, vector, strict=True)}

    def project(self, ranks: RanksLike, scores: RanksLike | None = None) -> RankMap:
        """The feasible integer mapping closest to ``ranks`` (any numbers; NaN counts as 0), keeping its shape.

        1. r = clip(floor(ranks), 0, r_max), returned as is if feasible (all zeros if the reserved params don't fit).
        2. The largest common scale s ∈ [0, 1] with floor(s·r) feasible, exact over the breakpoints k/r_m.
        3. Add triplets back up to r_m: largest remainder s·r_m − floor(s·r_m) first, then cheapest first; with
           ``scores`` (value per triplet of each module) by score per bit. Maximal: no r_m < r can grow by one.
        """
        raw = self._raw(ranks)
        r = np.clip(np.floor(np.nan_to_num(raw, nan=0.0)), 0, self.r_max).astype(np.int64)  # (M,)
        room = self._param_cap - self.reserved_params
        if room < 0:
            return self._as_ranks(np.zeros_like(r))
        if int(np.dot(r, self.costs)) <= room:
            return self._as_ranks(r)
        # 2. floor(s·r_m) jumps to k at s = k/r_m; walk those N breakpoints in order of s. Modules whose
        # breakpoints coincide jump together, so a prefix is only valid if it ends at a complete tie group.
        # Equal fractions k/r_m give identical correctly-rounded floats, so ties are exact.
        module = np.repeat(np.arange(r.size), r)  # (N,)
        k = np.arange(1, module.size + 1) - np.repeat(np.cumsum(r) - r, r)  # (N,) 1..r_m within each module
        s = k / r[module]
        order = np.argsort(s, kind="stable")
        s_sorted, cost_sorted = s[order], self.costs[module[order]]
        group_end = np.r_[s_sorted[1:] != s_sorted[:-1], True]
        fits = np.flatnonzero(group_end & (np.cumsum(cost_sorted) <= room))
        taken = 0 if fits.size == 0 else int(fits[-1]) + 1  # clip(r) is infeasible, so taken < N
        out = np.bincount(module[order[:taken]], minlength=r.size).astype(np.int64)
        headroom = room - int(np.dot(out, self.costs))
        # 3. add-back. The remainder is taken at the first excluded breakpoint s_next (the supremum of
        # feasible scales): modules about to gain their next triplet come first.
        if scores is None:
            remainder = s_sorted[taken] * r - out  # (M,) in (0, 1] where r_m > 0
            first = np.lexsort((np.arange(r.size), self.costs, -remainder))
            for m in first[remainder[first] > 0]:
                if self.costs[m] <= headroom:
                    out[m] += 1
                    headroom -= int(self.costs[m])
            fill_order = np.lexsort((np.arange(r.size), self.costs))
        else:
            value = self._raw(scores, "scores")
            if not np.all(np.isfinite(value)):
                raise AirloraError("scores must be finite numbers, one per module")
            fill_order = np.lexsort((np.arange(r.size), self.costs, -value / (self.costs * self.bits_per_param)))
        # Filling each module as far as it fits, in order, leaves headroom below the cost of every module
        # still under r_m: that is the maximality guarantee.
        for m in fill_order:
            add = min(int(r[m] - out[m]), headroom // int(self.costs[m]))
            if add > 0:
                out[m] += add
                headroom -= add * int(self.costs[m])
        return self._as_ranks(out)


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
