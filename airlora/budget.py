"""The airtime budget a delivery must fit, and the projection of any (ranks, precisions) onto it (paper §III-B).

A module m sent at rank r_m and precision b_m costs r_m·u_m(b_m) bits, u_m(b) its exact bits per unit rank under
codec b (``airlora.codecs``; the paper's (d_in + d_out + 1)·b at fp32). The delivery also carries reserved bits:
the task head at its codec and a bound on the delivery's own header, config and manifest. Feasible:
(Σ_m r_m·u_m(b_m) + reserved_bits) / C ≤ T_max, 0 ≤ r_m ≤ r_max, b_m ∈ the allowed precisions. ``Budget`` is the one
place feasibility is decided; ``airlora.channel`` re-exports it.
Dimension letters: M = number of adapted modules (6L), K = allowed precisions, N = Σ_m r_m candidate triplets.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from airlora.codecs import codec
from airlora.errors import AirloraError
from airlora.ranks import MODULES, RankMap, parse_key

RanksLike = Mapping[str, float] | np.ndarray
PrecisionMap = dict[str, int]
"""The precision format: ``"layers.{i}.{module}" -> bits per value`` (a key of ``airlora.codecs.CODECS``), the
same keys as a rank mapping."""


def module_cost(d_in: int, d_out: int) -> int:
    """Parameters on the air per unit rank: a column of P (d_out), a row of Q (d_in) and one λ."""
    if not all(isinstance(d, (int, np.integer)) and not isinstance(d, bool) and d >= 1 for d in (d_in, d_out)):
        raise AirloraError(f"module shape ({d_in!r}, {d_out!r}) is not allowed; expected two integers >= 1")
    return int(d_in) + int(d_out) + 1


def _canonical(key: str) -> tuple[int, int]:
    layer, module = parse_key(key)
    return layer, MODULES.index(module)


def airtime_of_params_s(params: int, bits_per_param: int, capacity_bps: float) -> float:
    """The one airtime expression, (P·b)/C: every airtime and feasibility figure goes through here (bits: b = 1)."""
    return (params * bits_per_param) / capacity_bps


def param_cap(bits_per_param: int, capacity_bps: float, t_max_s: float) -> int:
    """Largest parameter count P whose airtime (P·b)/C is within T_max, by that same float expression.

    Airtime is monotone in P, so "params ≤ cap" is the feasibility test in exact integers, which lets the
    projection and the allocators work on integer sums. ``param_cap(1, C, T)`` is the cap in bits.
    """
    cap = int(t_max_s * capacity_bps // bits_per_param)
    while cap > 0 and airtime_of_params_s(cap, bits_per_param, capacity_bps) > t_max_s:
        cap -= 1
    while airtime_of_params_s(cap + 1, bits_per_param, capacity_bps) <= t_max_s:
        cap += 1
    return cap


@dataclass(frozen=True, eq=False)  # eq=False: ndarray fields make generated __eq__/__hash__ ill-defined
class Budget:
    """The airtime budget of one step: (Σ_m r_m·u_m(b_m) + reserved_bits) / C ≤ T_max, 0 ≤ r ≤ r_max.

    Built by ``for_delivery`` (the codec table: what a run uses) or ``for_model`` (the paper's plain b bits per
    parameter, u_m = cost_m·b, one precision). Precision arguments are precision mappings; None means every module
    at ``bits_per_param``, the highest allowed precision, so a single-precision budget reads as it always did.
    """

    keys: tuple[str, ...]
    """Rank keys in canonical order (layer-major, then q, k, v, o, fc1, fc2)."""
    costs: np.ndarray
    """int64 (M,): parameters on the air per unit rank of each key, d_in + d_out + 1."""
    r_max: int
    """Largest rank of any one module."""
    bits_per_param: int
    """The highest allowed precision b (bits per value): the default of every precision argument, the task head's."""
    capacity_bps: float
    """Link capacity C at this step's SNR, in bit/s."""
    t_max_s: float
    """Latency budget T_max, in seconds."""
    reserved_params: int = 0
    """Parameters always sent (the task head); counted in every params figure."""
    allowed_bits: tuple[int, ...] = ()
    """Precisions a module may be sent at, ascending; () means (bits_per_param,)."""
    unit_bits: np.ndarray | None = None
    """int64 (M, K): bits per unit rank of each key at each allowed precision; None: costs × b (one precision)."""
    reserved_bits: int | None = None
    """Bits always sent: the head at its codec plus the delivery-overhead bound; None: reserved_params × b."""

    def __post_init__(self) -> None:
        costs = np.array(self.costs, dtype=np.int64).reshape(-1)  # (M,) private copy, then frozen
        costs.flags.writeable = False
        object.__setattr__(self, "costs", costs)
        object.__setattr__(self, "keys", tuple(self.keys))
        if len(self.keys) == 0 or len(self.keys) != costs.size:
            raise AirloraError(f"budget has {len(self.keys)} keys and {costs.size} costs; expected one cost per key")
        if np.any(costs < 1):
            raise AirloraError("budget costs must all be integers >= 1 (d_in + d_out + 1)")
        allowed = tuple(sorted(set(self.allowed_bits or (self.bits_per_param,))))
        object.__setattr__(self, "allowed_bits", allowed)
        for name, ok, expected in (
            ("r_max", self.r_max >= 1, "an integer >= 1"),
            ("bits_per_param", self.bits_per_param >= 1, "an integer >= 1"),
            ("capacity_bps", math.isfinite(self.capacity_bps) and self.capacity_bps > 0, "a positive number"),
            ("t_max_s", math.isfinite(self.t_max_s) and self.t_max_s > 0, "a positive number of seconds"),
            ("reserved_params", self.reserved_params >= 0, "an integer >= 0"),
            ("allowed_bits", allowed[-1] == self.bits_per_param and allowed[0] >= 1,
             f"positive precisions whose highest is bits_per_param = {self.bits_per_param}"),
        ):
            if not ok:
                raise AirloraError(f"budget {name} = {getattr(self, name)!r} is not allowed; expected {expected}")
        unit = (costs[:, None] * np.array(allowed, dtype=np.int64)[None, :] if self.unit_bits is None
                else np.array(self.unit_bits, dtype=np.int64).reshape(costs.size, len(allowed)))  # (M, K)
        if np.any(unit < 1):
            raise AirloraError("budget unit_bits must all be integers >= 1 (bits per unit rank)")
        unit.flags.writeable = False
        object.__setattr__(self, "unit_bits", unit)
        reserved = self.reserved_params * self.bits_per_param if self.reserved_bits is None else int(self.reserved_bits)
        if reserved < 0:
            raise AirloraError(f"budget reserved_bits = {reserved!r} is not allowed; expected an integer >= 0")
        object.__setattr__(self, "reserved_bits", reserved)
        object.__setattr__(self, "_bit_cap", param_cap(1, self.capacity_bps, self.t_max_s))

    @classmethod
    def for_model(cls, shapes: dict[str, tuple[int, int]], r_max: int, bits_per_param: int, capacity_bps: float,
                  t_max_s: float, reserved_params: int = 0) -> Budget:
        """Budget over the modules in ``shapes`` (rank key -> (d_in, d_out)) at the paper's b bits per parameter."""
        keys = sorted(shapes, key=_canonical)
        costs = np.array([module_cost(*shapes[key]) for key in keys], dtype=np.int64)
        return cls(tuple(keys), costs, r_max, bits_per_param, capacity_bps, t_max_s, reserved_params)

    @classmethod
    def for_delivery(cls, shapes: dict[str, tuple[int, int]], r_max: int, allowed_bits: tuple[int, ...],
                     capacity_bps: float, t_max_s: float, reserved_params: int = 0,
                     reserved_bits: int = 0) -> Budget:
        """Budget over ``shapes`` with each module's exact bits per unit rank under each allowed codec."""
        keys = sorted(shapes, key=_canonical)
        allowed = tuple(sorted(set(allowed_bits)))
        costs = np.array([module_cost(*shapes[key]) for key in keys], dtype=np.int64)
        unit = np.array([[codec(b).unit_bits(*shapes[key]) for b in allowed] for key in keys], dtype=np.int64)
        return cls(tuple(keys), costs, r_max, allowed[-1], capacity_bps, t_max_s, reserved_params, allowed, unit,
                   reserved_bits)

    # ---- reading ranks and precisions ----

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

    def levels(self, precisions: RanksLike | None) -> np.ndarray:
        """Precisions as int64 (M,) indices into ``allowed_bits``; None: all at the highest. Each must be allowed."""
        if precisions is None:
            return np.full(len(self.keys), len(self.allowed_bits) - 1, dtype=np.int64)
        raw = self._raw(precisions, "precisions")
        allowed = np.array(self.allowed_bits, dtype=np.float64)  # (K,)
        index = np.minimum(np.searchsorted(allowed, raw), allowed.size - 1)  # (M,)
        bad = allowed[index] != raw  # NaN too
        if np.any(bad):
            m = int(np.argmax(bad))
            raise AirloraError(f"precision of {self.keys[m]!r} is {float(raw[m])!r} bits; allowed: "
                               f"{', '.join(map(str, self.allowed_bits))} (channel.bits)")
        return index.astype(np.int64)

    def precision_map(self, levels: np.ndarray) -> PrecisionMap:
        """(M,) level indices as a precision mapping in key order."""
        return {key: int(self.allowed_bits[k]) for key, k in zip(self.keys, levels, strict=True)}

    def unit_bits_at(self, precisions: RanksLike | None = None) -> np.ndarray:
        """int64 (M,): each module's bits per unit rank at ``precisions``."""
        return self.unit_bits[np.arange(len(self.keys)), self.levels(precisions)]

    # ---- sizes, airtime, feasibility ----

    def params(self, ranks: RanksLike) -> int:
        """Parameters on the air: Σ r·cost + reserved_params (exact integer)."""
        return int(np.dot(self.vector(ranks), self.costs)) + self.reserved_params

    def bits(self, ranks: RanksLike, precisions: RanksLike | None = None) -> int:
        """Bits on the air: Σ r_m·u_m(b_m) + reserved_bits (exact integer)."""
        return int(np.dot(self.vector(ranks), self.unit_bits_at(precisions))) + self.reserved_bits

    def airtime_s(self, ranks: RanksLike, precisions: RanksLike | None = None) -> float:
        """Transmission time bits / C, in seconds."""
        return airtime_of_params_s(self.bits(ranks, precisions), 1, self.capacity_bps)

    def eta(self, ranks: RanksLike, precisions: RanksLike | None = None) -> float:
        """The paper's η = bits / (C·T_max): the share of the airtime budget used (≤ 1 when feasible)."""
        # Written as airtime / T_max so that feasible (airtime ≤ T_max) always implies η ≤ 1 in floats too.
        return self.airtime_s(ranks, precisions) / self.t_max_s

    def feasible(self, ranks: RanksLike, precisions: RanksLike | None = None) -> bool:
        """True when every rank is an integer in [0, r_max], every precision allowed, and the airtime ≤ t_max_s."""
        raw = self._raw(ranks)
        if not np.all(np.isfinite(raw) & (raw >= 0) & (raw <= self.r_max) & (raw == np.floor(raw))):
            return False
        try:
            levels = self.levels(precisions)
        except AirloraError:
            return False
        return self.airtime_s(raw, self.precision_map(levels)) <= self.t_max_s

    def room_bits(self, ranks: RanksLike, precisions: RanksLike | None = None) -> int:
        """Bits that can still be added to the delivery within the budget (negative when already over)."""
        return self._bit_cap - self.bits(ranks, precisions)

    def max_uniform_rank(self, precision: int | None = None) -> int:
        """Largest common rank r ≤ r_max for every module, at one common ``precision`` (default the highest)."""
        room = self._bit_cap - self.reserved_bits
        per_rank = int(self.unit_bits_at(None if precision is None else dict.fromkeys(self.keys, precision)).sum())
        return 0 if room < 0 else min(self.r_max, room // per_rank)

    def uniform_pair(self) -> tuple[int, int]:
        """The best common (rank, precision) that fits: the largest rank, then the highest precision at that rank.

        Rank first because a cut triplet is a direction of ΔW lost while a lower precision is bounded noise on the
        ones kept (at int8 the delivered accuracy did not move in our measurements; see the README).
        """
        best = max((self.max_uniform_rank(b), b) for b in self.allowed_bits)
        return best if best[0] > 0 else (0, self.bits_per_param)

    def nothing_fits(self) -> bool:
        """True when only all-zero ranks can fit: one triplet on the cheapest module at its cheapest precision (or the
        reserved bits alone) breaks it."""
        return self.reserved_bits + int(self.unit_bits.min()) > self._bit_cap

    # ---- projection ----

    def _as_ranks(self, vector: np.ndarray) -> RankMap:
        """An (M,) integer vector as a rank mapping in key order."""
        return {key: int(r) for key, r in zip(self.keys, vector, strict=True)}

    def _clip(self, ranks: RanksLike) -> np.ndarray:
        """clip(floor(ranks), 0, r_max) as int64 (M,); NaN counts as 0."""
        return np.clip(np.floor(np.nan_to_num(self._raw(ranks), nan=0.0)), 0, self.r_max).astype(np.int64)

    def _scores(self, scores: RanksLike | None) -> np.ndarray | None:
        if scores is None:
            return None
        value = self._raw(scores, "scores")
        if not np.all(np.isfinite(value)):
            raise AirloraError("scores must be finite numbers, one per module")
        return value

    def project(self, ranks: RanksLike, scores: RanksLike | None = None) -> RankMap:
        """The feasible integer ranks closest to ``ranks`` at the highest precision (any numbers; NaN counts as 0).

        1. r = clip(floor(ranks), 0, r_max), returned as is if feasible (all zeros if the reserved bits don't fit).
        2. The largest common scale s ∈ [0, 1] with floor(s·r) feasible, exact over the breakpoints k/r_m.
        3. Add triplets back up to r_m: largest remainder s·r_m − floor(s·r_m) first, then cheapest first; with
           ``scores`` (value per triplet of each module) by score per bit. Maximal: no r_m < r can grow by one.
        """
        r = self._clip(ranks)
        room = self._bit_cap - self.reserved_bits
        if room < 0:
            return self._as_ranks(np.zeros_like(r))
        cost = self.unit_bits[:, -1]
        if int(np.dot(r, cost)) <= room:
            return self._as_ranks(r)
        return self._as_ranks(_cut_ranks(r, cost, room, self._scores(scores)))

    def project_joint(self, ranks: RanksLike, precisions: RanksLike | None = None,
                      scores: RanksLike | None = None) -> tuple[RankMap, PrecisionMap]:
        """The feasible (ranks, precisions) closest to the proposal, never above it in rank or in precision.

        0. r = clip(floor(ranks), 0, r_max); each precision snapped down to an allowed one (below all: the lowest;
           None: the highest). Returned as is if feasible.
        1. Lower precision before cutting ranks, one level at a time from the top (every module at fp32 goes to fp16
           before any goes to int8, and so on; a level that would cost a tiny module more is skipped), within a
           level the module that saves the most bits first (with ``scores``: the least value per bit saved first),
           until it fits. Why this order: a lower precision adds
           bounded noise to every triplet kept (relative 2^−11 at fp16, ~1/254 of a group's largest value at int8,
           ~1/14 at int4), while a cut removes a triplet's direction from ΔW entirely; int8 delivery lost no
           accuracy in our measurements, and each level down costs more accuracy than the one above it.
        2. Still over with every module at its lowest precision: cut ranks by ``project``'s rule at those costs.
        3. Add back, while anything fits: a precision level towards the asked one (cheapest first; with ``scores``
           the most value per bit first), then triplets. Maximal: no module can gain one triplet, or (rank > 0) one
           precision level up to the asked one, and stay within the budget. Rank-0 modules keep the asked precision.
        """
        r = self._clip(ranks)
        target = self._snap(precisions)
        room = self._bit_cap - self.reserved_bits
        if room < 0:
            return self._as_ranks(np.zeros_like(r)), self.precision_map(target)
        unit, rows, value = self.unit_bits, np.arange(r.size), self._scores(scores)

        def used(ranks_: np.ndarray, levels_: np.ndarray) -> int:
            return int(np.dot(ranks_, unit[rows, levels_]))

        if used(r, target) <= room:
            return self._as_ranks(r), self.precision_map(target)
        # 1. precision down, level by level from the top
        levels, fits = target.copy(), False
        for level in range(len(self.allowed_bits) - 1, 0, -1):
            at = np.flatnonzero((levels == level) & (r > 0))
            # the next level down that is cheaper: a tiny module (d_in + d_out ≲ 6) costs more at int8 than at fp16
            cheaper = unit[at, :level] < unit[at, level][:, None]  # (A, level)
            below = np.where(cheaper.any(axis=1), level - 1 - np.argmax(cheaper[:, ::-1], axis=1), level)
            at, below = at[below < level], below[below < level]
            saving = r[at] * (unit[at, level] - unit[at, below])  # bits saved by going down
            order = np.lexsort((at, -saving) if value is None else (at, value[at] / saving))
            for m, down in zip(at[order], below[order], strict=True):
                levels[m] = down
                if used(r, levels) <= room:
                    fits = True
                    break
            if fits:
                break
        # 2. ranks cut at the lowest precisions
        out = r if fits else _cut_ranks(r, unit[rows, levels], room, value)
        # 3. add back precision levels, then triplets, while one fits
        while True:
            headroom = room - used(out, levels)
            up = np.flatnonzero(levels < target)
            raise_cost = out[up] * (unit[up, np.minimum(levels[up] + 1, unit.shape[1] - 1)] - unit[up, levels[up]])
            ok = raise_cost <= headroom
            if np.any(ok):
                cand, cost = up[ok], raise_cost[ok]
                key = (cand, cost) if value is None else (cand, cost, -value[cand] / np.maximum(cost, 1))
                levels[cand[np.lexsort(key)[0]]] += 1
                continue
            grow = np.flatnonzero((out < r) & (unit[rows, levels] <= headroom))
            if grow.size == 0:
                break
            m = grow[np.lexsort((grow, unit[grow, levels[grow]]))[0]]  # cheapest triplet first
            out[m] += 1
        return self._as_ranks(out), self.precision_map(levels)

    def _snap(self, precisions: RanksLike | None) -> np.ndarray:
        """Asked precisions as level indices, each snapped down to an allowed value (below all, or NaN: the lowest)."""
        if precisions is None:
            return np.full(len(self.keys), len(self.allowed_bits) - 1, dtype=np.int64)
        raw = self._raw(precisions, "precisions")
        index = np.searchsorted(np.array(self.allowed_bits, dtype=np.float64), np.nan_to_num(raw, nan=-np.inf),
                                side="right") - 1
        return np.clip(index, 0, len(self.allowed_bits) - 1).astype(np.int64)


def _cut_ranks(r: np.ndarray, cost: np.ndarray, room: int, value: np.ndarray | None) -> np.ndarray:
    """Maximal feasible ranks ≤ r for per-unit-rank costs ``cost`` (bits) and ``room`` bits, Σ r·cost > room ≥ 0.

    2. The largest common scale s with floor(s·r) feasible; 3. the add-back (see ``Budget.project``).
    """
    # 2. floor(s·r_m) jumps to k at s = k/r_m; walk those N breakpoints in order of s. Modules whose
    # breakpoints coincide jump together, so a prefix is only valid if it ends at a complete tie group.
    # Equal fractions k/r_m give identical correctly-rounded floats, so ties are exact.
    module = np.repeat(np.arange(r.size), r)  # (N,)
    k = np.arange(1, module.size + 1) - np.repeat(np.cumsum(r) - r, r)  # (N,) 1..r_m within each module
    s = k / r[module]
    order = np.argsort(s, kind="stable")
    s_sorted, cost_sorted = s[order], cost[module[order]]
    group_end = np.r_[s_sorted[1:] != s_sorted[:-1], True]
    fits = np.flatnonzero(group_end & (np.cumsum(cost_sorted) <= room))
    taken = 0 if fits.size == 0 else int(fits[-1]) + 1  # clip(r) is infeasible, so taken < N
    out = np.bincount(module[order[:taken]], minlength=r.size).astype(np.int64)
    headroom = room - int(np.dot(out, cost))
    # 3. add-back. The remainder is taken at the first excluded breakpoint s_next (the supremum of
    # feasible scales): modules about to gain their next triplet come first.
    if value is None:
        remainder = s_sorted[taken] * r - out  # (M,) in (0, 1] where r_m > 0
        first = np.lexsort((np.arange(r.size), cost, -remainder))
        for m in first[remainder[first] > 0]:
            if cost[m] <= headroom:
                out[m] += 1
                headroom -= int(cost[m])
        fill_order = np.lexsort((np.arange(r.size), cost))
    else:
        fill_order = np.lexsort((np.arange(r.size), cost, -value / cost))
    # Filling each module as far as it fits, in order, leaves headroom below the cost of every module
    # still under r_m: that is the maximality guarantee.
    for m in fill_order:
        add = min(int(r[m] - out[m]), headroom // int(cost[m]))
        if add > 0:
            out[m] += add
            headroom -= add * int(cost[m])
    return out
