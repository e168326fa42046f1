"""Channel capacity, the airtime budget, its projection and the SNR schedule (airlora.channel)."""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest
import scipy.integrate
from hypothesis import given, settings
from hypothesis import strategies as st

from airlora.channel import (
    OPT_1_3B_NUM_LAYERS,
    OPT_1_3B_SHAPES_PER_LAYER,
    REFERENCE_BANDWIDTH_HZ,
    Budget,
    SnrSchedule,
    capacity_awgn_bps,
    capacity_bps,
    capacity_monte_carlo_bps,
    capacity_rayleigh_bps,
    db_to_linear,
    module_cost,
    scale_matched_bandwidth_hz,
)
from airlora.config import ChannelConfig
from airlora.errors import AirloraError
from airlora.ranks import MODULES, rank_key

LN2 = math.log(2)
EULER_GAMMA = 0.5772156649015329


def transformer_shapes(layers: int, hidden: int, ffn: int) -> dict[str, tuple[int, int]]:
    per_layer = {"q": (hidden, hidden), "k": (hidden, hidden), "v": (hidden, hidden), "o": (hidden, hidden),
                 "fc1": (hidden, ffn), "fc2": (ffn, hidden)}
    return {rank_key(i, m): per_layer[m] for i in range(layers) for m in MODULES}


MINILM = transformer_shapes(6, 384, 1536)


# ---- capacity against independent values ----

def test_db_to_linear_and_awgn_hand_values() -> None:
    assert db_to_linear(10.0) == pytest.approx(10.0)
    assert db_to_linear(-5.0) == pytest.approx(0.31622776601683794)
    assert capacity_awgn_bps(0.0, 1e6) == pytest.approx(1e6)  # log2(1 + 1) = 1 bit/s/Hz
    assert capacity_awgn_bps(15.0, 1.0) == pytest.approx(5.0278, abs=1e-4)  # log2(1 + 31.6228)
    assert capacity_awgn_bps(10.0, 2.0) == pytest.approx(2 * math.log2(11.0))


@pytest.mark.parametrize("snr_db", [-5.0, 0.0, 5.0, 10.0, 15.0])
def test_rayleigh_closed_form_matches_monte_carlo_and_quadrature(snr_db: float) -> None:
    closed = capacity_rayleigh_bps(snr_db, 1.0)
    mc = capacity_monte_carlo_bps(snr_db, 1.0, "rayleigh", 0.0, 400_000, np.random.default_rng(1))
    gamma = 10 ** (snr_db / 10)
    quad, _ = scipy.integrate.quad(lambda x: math.log2(1 + gamma * x) * math.exp(-x), 0, math.inf)
    assert abs(mc - closed) / closed < 0.01
    assert closed == pytest.approx(quad, rel=1e-8)


@pytest.mark.parametrize("snr_db", [-20.0, -5.0, 0.0, 10.0, 30.0])
def test_rayleigh_below_awgn_by_jensen(snr_db: float) -> None:
    assert capacity_rayleigh_bps(snr_db, 5e6) < capacity_awgn_bps(snr_db, 5e6)


def test_rician_between_rayleigh_and_awgn_limits() -> None:
    rng = np.random.default_rng(2)
    k0 = capacity_monte_carlo_bps(5.0, 1.0, "rician", 0.0, 300_000, rng)
    k_large = capacity_monte_carlo_bps(5.0, 1.0, "rician", 1e4, 300_000, rng)
    k3 = capacity_monte_carlo_bps(5.0, 1.0, "rician", 3.0, 300_000, rng)
    assert k0 == pytest.approx(capacity_rayleigh_bps(5.0, 1.0), rel=0.01)
    assert k_large == pytest.approx(capacity_awgn_bps(5.0, 1.0), rel=1e-3)
    assert k0 < k3 < k_large
    assert capacity_monte_carlo_bps(5.0, 1.0, "awgn", 0.0, 1000, rng) == pytest.approx(capacity_awgn_bps(5.0, 1.0))


def test_rayleigh_stable_at_extreme_snr() -> None:
    low = capacity_rayleigh_bps(-60.0, 1e8)
    assert math.isfinite(low) and low > 0
    assert low == pytest.approx(1e-6 / LN2 * 1e8, rel=1e-5)  # C ≈ Wγ/ln2 for small γ
    high = capacity_rayleigh_bps(60.0, 1e8)
    assert math.isfinite(high) and high > 0
    assert high == pytest.approx(1e8 * (math.log2(1e6) - EULER_GAMMA / LN2), rel=1e-5)  # W(log2 γ − γ_E/ln2)
    for snr_db in (-300.0, -150.0, 150.0, 300.0):
        assert math.isfinite(capacity_rayleigh_bps(snr_db, 1.0)) and capacity_rayleigh_bps(snr_db, 1.0) > 0


def test_rayleigh_matches_mpmath_across_the_series_switch() -> None:
    mpmath = pytest.importorskip("mpmath")
    mpmath.mp.dps = 40
    # 1/γ = 50 is where the implementation switches from exp·E1 to the asymptotic series.
    for snr_db in np.r_[np.linspace(-80, 80, 33), -10 * math.log10(50) + np.array([-1e-6, 0.0, 1e-6])]:
        x = mpmath.mpf(10) ** (-mpmath.mpf(float(snr_db)) / 10)
        expected = float(mpmath.exp(x) * mpmath.e1(x) / mpmath.log(2))
        assert capacity_rayleigh_bps(float(snr_db), 1.0) == pytest.approx(expected, rel=1e-12)


def test_capacity_bps_dispatch_deterministic_and_rician_cached() -> None:
    for fading, expected in (("awgn", capacity_awgn_bps(3.0, 2e6)), ("rayleigh", capacity_rayleigh_bps(3.0, 2e6))):
        assert capacity_bps(3.0, ChannelConfig(fading=fading), 2e6) == expected
    rician = ChannelConfig(fading="rician", rician_k=3.0, monte_carlo_samples=50_000)
    first = capacity_bps(3.0, rician, 2e6)
    assert capacity_bps(3.0, ChannelConfig(fading="rician", rician_k=3.0, monte_carlo_samples=50_000), 2e6) == first
    assert capacity_rayleigh_bps(3.0, 2e6) < first < capacity_awgn_bps(3.0, 2e6)
    assert capacity_bps(0.0, rician, 2e6) < first  # common random numbers keep it monotone in SNR


@pytest.mark.parametrize("bad", [dict(snr_db=math.nan), dict(snr_db=400.0), dict(bandwidth_hz=0.0),
                                 dict(bandwidth_hz=-1.0), dict(bandwidth_hz=math.inf)])
def test_capacity_rejects_bad_link(bad: dict) -> None:
    args = {"snr_db": 0.0, "bandwidth_hz": 1e6} | bad
    with pytest.raises(AirloraError, match=next(iter(bad))):
        capacity_rayleigh_bps(**args)


def test_monte_carlo_rejects_unknown_fading() -> None:
    with pytest.raises(AirloraError, match="fading"):
        capacity_monte_carlo_bps(0.0, 1.0, "nakagami", 0.0, 100, np.random.default_rng(0))


# ---- scale matching ----

def test_scale_matched_bandwidth_for_minilm() -> None:
    assert module_cost(384, 1536) == 1921
    assert scale_matched_bandwidth_hz(MINILM) == pytest.approx(4.69e6, rel=1e-3)
    opt = transformer_shapes(OPT_1_3B_NUM_LAYERS, 2048, 8192)
    assert {m: opt[rank_key(0, m)] for m in MODULES} == OPT_1_3B_SHAPES_PER_LAYER
    assert scale_matched_bandwidth_hz(opt) == pytest.approx(REFERENCE_BANDWIDTH_HZ)


@pytest.mark.parametrize("snr_db,r_max", [(-5.0, 8), (10.0, 64)])
def test_scale_matched_bandwidth_equalises_full_rank_eta(snr_db: float, r_max: int) -> None:
    opt_shapes = transformer_shapes(OPT_1_3B_NUM_LAYERS, 2048, 8192)
    etas = []
    for shapes, bandwidth in ((opt_shapes, REFERENCE_BANDWIDTH_HZ), (MINILM, scale_matched_bandwidth_hz(MINILM))):
        budget = Budget.for_model(shapes, r_max, 32, capacity_rayleigh_bps(snr_db, bandwidth), 1.0)
        etas.append(budget.eta(dict.fromkeys(budget.keys, r_max)))
    assert etas[0] == pytest.approx(etas[1], rel=1e-12)


# ---- budget arithmetic ----

def test_budget_params_bits_airtime_eta_by_hand() -> None:
    shapes = {"layers.1.q": (4, 4), "layers.0.fc2": (16, 4), "layers.0.q": (4, 4)}
    budget = Budget.for_model(shapes, r_max=8, bits_per_param=16, capacity_bps=1000.0, t_max_s=2.0,
                              reserved_params=10)
    assert budget.keys == ("layers.0.q", "layers.0.fc2", "layers.1.q")  # canonical, not insertion order
    assert budget.costs.tolist() == [9, 21, 9]
    ranks = {"layers.0.q": 2, "layers.0.fc2": 3, "layers.1.q": 0}
    assert budget.params(ranks) == 2 * 9 + 3 * 21 + 10
    assert budget.bits(ranks) == 91 * 16
    assert budget.airtime_s(ranks) == pytest.approx(91 * 16 / 1000.0)
    assert budget.eta(ranks) == pytest.approx(91 * 16 / (1000.0 * 2.0))
    assert budget.feasible(ranks)  # 1.456 s ≤ 2 s
    assert not budget.feasible(ranks | {"layers.0.fc2": 5})  # 2.128 s
    assert not budget.feasible(ranks | {"layers.1.q": 9})  # above r_max
    assert not budget.feasible(ranks | {"layers.1.q": 0.5})
    assert budget.vector(ranks).tolist() == [2, 3, 0]


def test_budget_rejects_unknown_and_missing_keys() -> None:
    budget = Budget.for_model(MINILM, 8, 32, 1e6, 1.0)
    full = dict.fromkeys(budget.keys, 1)
    with pytest.raises(AirloraError, match="layers.6.q"):
        budget.vector(full | {"layers.6.q": 1})
    with pytest.raises(AirloraError, match="layers.3.fc1"):
        budget.params({k: v for k, v in full.items() if k != "layers.3.fc1"})
    with pytest.raises(AirloraError, match="layers.0.k"):
        budget.vector(full | {"layers.0.k": -1})
    with pytest.raises(AirloraError, match="capacity_bps"):
        Budget.for_model(MINILM, 8, 32, 0.0, 1.0)


@given(capacity=st.floats(1e3, 1e9), r_max=st.integers(1, 128), reserved=st.integers(0, 200_000))
@settings(max_examples=100, deadline=None)
def test_max_uniform_rank_is_the_largest_feasible(capacity: float, r_max: int, reserved: int) -> None:
    budget = Budget.for_model(MINILM, r_max, 32, capacity, 1.0, reserved)
    rank = budget.max_uniform_rank()
    assert 0 <= rank <= r_max
    if rank > 0 or budget.feasible(dict.fromkeys(budget.keys, 0)):
        assert budget.feasible(dict.fromkeys(budget.keys, rank))
    if rank < r_max:
        assert not budget.feasible(dict.fromkeys(budget.keys, rank + 1))


def test_nothing_fits() -> None:
    shapes = {"layers.0.q": (4, 4), "layers.0.fc1": (4, 16)}  # costs 9 and 21
    bits_for = lambda params: Budget.for_model(shapes, 4, 1, float(params), 1.0, reserved_params=5)  # noqa: E731
    assert not bits_for(14).nothing_fits()  # 5 + 9 fits exactly
    assert bits_for(13).nothing_fits()
    assert bits_for(13).project({"layers.0.q": 4, "layers.0.fc1": 4}) == {"layers.0.q": 0, "layers.0.fc1": 0}
    assert bits_for(4).nothing_fits() and not bits_for(4).feasible({"layers.0.q": 0, "layers.0.fc1": 0})


# ---- projection: four guarantees, as properties ----

@st.composite
def budgets_and_ranks(draw: st.DrawFn, max_modules: int = 24, max_r: int = 128) -> tuple[Budget, np.ndarray]:
    dims = st.integers(1, 3000)
    shapes = draw(st.lists(st.tuples(dims, dims), min_size=1, max_size=max_modules))
    r_max = draw(st.integers(1, max_r))
    bits = draw(st.sampled_from([1, 8, 16, 32]))
    costs = np.array([module_cost(a, b) for a, b in shapes])
    value = st.integers(0, r_max) | st.floats(-3, r_max + 3) | st.integers(-5, 2 * r_max) | st.floats()  # NaN, ±inf
    raw = np.array(draw(st.lists(value, min_size=len(shapes), max_size=len(shapes))), dtype=np.float64)
    asked = int(np.dot(np.clip(np.floor(np.nan_to_num(raw, nan=0.0)), 0, r_max), costs))
    reserved = draw(st.just(0) | st.integers(0, int(costs.sum()) * r_max // 4))
    t_max = draw(st.floats(1e-3, 10.0))
    share = draw(st.floats(1e-4, 1.25))  # share of the asked-for parameters that fits in T_max
    capacity = max(share * (asked + reserved) * bits / t_max, 1e-6)
    budget = Budget.for_model({rank_key(i, MODULES[0]): s for i, s in enumerate(shapes)}, r_max, bits, capacity,
                              t_max, reserved)
    return budget, raw


def clipped(budget: Budget, raw: np.ndarray) -> np.ndarray:
    return np.clip(np.floor(np.nan_to_num(raw, nan=0.0)), 0, budget.r_max).astype(np.int64)


def check_guarantees(budget: Budget, raw: np.ndarray, out_map: dict[str, int]) -> np.ndarray:
    assert list(out_map) == list(budget.keys) and all(type(v) is int for v in out_map.values())
    out, target = budget.vector(out_map), clipped(budget, raw)
    assert np.all(out >= 0) and np.all(out <= target)
    if budget.reserved_params * budget.bits_per_param / budget.capacity_bps > budget.t_max_s:
        assert budget.nothing_fits() and not out.any()
        return out
    assert budget.feasible(out_map) and budget.airtime_s(out_map) <= budget.t_max_s and budget.eta(out_map) <= 1
    if budget.feasible(target):
        assert np.array_equal(out, target)
    for m in np.flatnonzero(out < target):  # maximal: no single +1 still fits
        bumped = out.copy()
        bumped[m] += 1
        assert not budget.feasible(bumped)
    return out


@given(case=budgets_and_ranks(), as_map=st.booleans())
@settings(max_examples=200, deadline=None)
def test_project_guarantees(case: tuple[Budget, np.ndarray], as_map: bool) -> None:
    budget, raw = case
    ranks = {k: float(v) for k, v in zip(budget.keys, raw, strict=True)} if as_map else raw
    check_guarantees(budget, raw, budget.project(ranks))


@given(case=budgets_and_ranks(), data=st.data())
@settings(max_examples=200, deadline=None)
def test_project_guarantees_with_scores(case: tuple[Budget, np.ndarray], data: st.DataObject) -> None:
    budget, raw = case
    scores = np.array(data.draw(st.lists(st.floats(-1e6, 1e6), min_size=raw.size, max_size=raw.size)))
    check_guarantees(budget, raw, budget.project(raw, scores=scores))


@given(case=budgets_and_ranks(max_modules=6, max_r=24))
@settings(max_examples=150, deadline=None)
def test_project_keeps_the_largest_common_scale(case: tuple[Budget, np.ndarray]) -> None:
    budget, raw = case
    out = check_guarantees(budget, raw, budget.project(raw))
    target = clipped(budget, raw)
    if budget.feasible(target) or not budget.feasible(np.zeros_like(target)):
        return
    # brute force over exact fractions: the largest breakpoint scale k/r_m whose floor(s·r) fits
    scales = sorted({Fraction(k, r) for r in target.tolist() if r for k in range(1, r + 1)}, reverse=True)
    base = next((b for s in scales if budget.feasible(b := np.array([math.floor(s * r) for r in target.tolist()]))),
                np.zeros_like(target))
    assert np.all(out >= base)


def test_project_scales_the_shape_down_and_adds_back_by_remainder() -> None:
    shapes = {"layers.0.q": (4, 4), "layers.0.k": (4, 4)}  # cost 9 each
    budget = Budget.for_model(shapes, 8, 1, 6 * 9.0, 1.0)  # room for exactly 6 triplets
    assert budget.project({"layers.0.q": 8, "layers.0.k": 4}) == {"layers.0.q": 4, "layers.0.k": 2}  # s = 1/2
    assert budget.project({"layers.0.q": 8.9, "layers.0.k": 4.2}) == {"layers.0.q": 4, "layers.0.k": 2}
    budget5 = Budget.for_model(shapes, 8, 1, 5 * 9.0, 1.0)
    # s → 1/2 from below: floor = (3, 1); both remainders reach 1, the tie goes to the first key
    assert budget5.project(np.array([8, 4])) == {"layers.0.q": 4, "layers.0.k": 1}
    # remainders before cost: 6:4:4 at room for 6 triplets → floor(s·r) = (2, 1, 1) for s < 1/2, all three reach
    # their next triplet at s = 1/2 and the first two in key order get it; cheapest-first alone would give (4, 1, 1)
    three = Budget.for_model(shapes | {"layers.0.v": (4, 4)}, 8, 1, 6 * 9.0 + 1, 1.0)
    assert three.project(np.array([6, 4, 4])) == {"layers.0.q": 3, "layers.0.k": 2, "layers.0.v": 1}
    # scores (value per triplet) steer the add-back instead
    assert budget5.project(np.array([8, 4]), scores=np.array([0.0, 1.0])) == {"layers.0.q": 3, "layers.0.k": 2}
    assert budget.project(np.array([-3.0, math.nan])) == {"layers.0.q": 0, "layers.0.k": 0}
    assert budget.project(np.array([math.inf, 1e300])) == {"layers.0.q": 3, "layers.0.k": 3}


# ---- SNR schedule ----

def test_random_schedule_is_a_pure_function_of_seed_and_block() -> None:
    config = ChannelConfig(snr_db=(-5.0, 0.0, 5.0, 10.0, 15.0), snr_block_steps=3)
    first, second = SnrSchedule(config, seed=7), SnrSchedule(config, seed=7)
    forward = [first.snr_db(s) for s in range(300)]
    assert [second.snr_db(s) for s in reversed(range(300))] == forward[::-1]  # no hidden state
    assert all(forward[3 * b] == forward[3 * b + 1] == forward[3 * b + 2] for b in range(100))
    assert set(forward) == set(config.snr_db)
    assert [SnrSchedule(config, seed=8).snr_db(s) for s in range(300)] != forward


def test_cycle_and_single_value_schedules() -> None:
    cycle = SnrSchedule(ChannelConfig(snr_db=(1.0, 2.0, 3.0), snr_schedule="cycle", snr_block_steps=2), seed=0)
    assert [cycle.snr_db(s) for s in range(8)] == [1.0, 1.0, 2.0, 2.0, 3.0, 3.0, 1.0, 1.0]
    fixed = SnrSchedule(ChannelConfig(snr_db=(4.0,)), seed=3)
    assert {fixed.snr_db(s) for s in range(50)} == {4.0}
    with pytest.raises(AirloraError, match="step"):
        cycle.snr_db(-1)


def test_trace_schedule_parses_comments_and_wraps(tmp_path) -> None:
    trace = tmp_path / "snr.txt"
    trace.write_text("# measured trace\n-5\n\n  2.5  # inline note\n1e1\n")
    schedule = SnrSchedule(ChannelConfig(snr_schedule="trace", snr_trace=str(trace)), seed=0)
    assert [schedule.snr_db(s) for s in range(5)] == [-5.0, 2.5, 10.0, -5.0, 2.5]


@pytest.mark.parametrize("text,line", [("1\n2\nabc\n", 3), ("1\n# c\nnan\n", 3), ("0\ninf\n", 2)])
def test_trace_schedule_names_the_bad_line(tmp_path, text: str, line: int) -> None:
    trace = tmp_path / "snr.txt"
    trace.write_text(text)
    with pytest.raises(AirloraError, match=rf"snr.txt.*line {line}\b.*finite"):
        SnrSchedule(ChannelConfig(snr_schedule="trace", snr_trace=str(trace)), seed=0)


@pytest.mark.parametrize("text", [None, "", "# only a comment\n\n"])
def test_trace_schedule_rejects_missing_or_empty_file(tmp_path, text: str | None) -> None:
    trace = tmp_path / "snr.txt"
    if text is not None:
        trace.write_text(text)
    with pytest.raises(AirloraError, match="snr.txt"):
        SnrSchedule(ChannelConfig(snr_schedule="trace", snr_trace=str(trace)), seed=0)
