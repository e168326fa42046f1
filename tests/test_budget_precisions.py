"""The budget over ranks and precisions together: exact codec costs, and the joint projection's guarantees."""

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from airlora.budget import Budget
from airlora.codecs import CODECS
from airlora.config import CODEC_BITS
from airlora.errors import AirloraError
from airlora.ranks import MODULES, rank_key

MINILM = {rank_key(i, m): ((384, 384) if m in "qkvo" else (384, 1536) if m == "fc1" else (1536, 384))
          for i in range(6) for m in MODULES}


def test_codec_table_is_the_configs():
    assert sorted(CODECS) == sorted(CODEC_BITS)


def test_costs_per_unit_rank_by_hand():
    """One q module of MiniLM (384 -> 384) per unit rank, written out from the wire format."""
    budget = Budget.for_delivery({"layers.0.q": (384, 384)}, 8, (4, 8, 16, 32), 1e6, 1.0)
    assert budget.allowed_bits == (4, 8, 16, 32) and budget.bits_per_param == 32
    fp32, fp16 = 769 * 32, 769 * 16
    int8 = 2 * (384 * 8 + 6 * 16) + 32  # two rows of 384 int8 codes with 6 bf16 scales each, λ in fp32
    int4 = 2 * (192 * 8 + 6 * 16) + 32  # two values per byte
    assert budget.unit_bits.tolist() == [[int4, int8, fp16, fp32]]
    assert budget.bits({"layers.0.q": 3}, {"layers.0.q": 4}) == 3 * int4
    assert budget.bits({"layers.0.q": 3}) == 3 * fp32  # default: the highest precision


def test_single_fp32_delivery_budget_is_the_papers():
    a = Budget.for_delivery(MINILM, 8, (32,), 4.035722e6, 1.0, reserved_params=770, reserved_bits=770 * 32)
    b = Budget.for_model(MINILM, 8, 32, 4.035722e6, 1.0, reserved_params=770)
    ranks = dict.fromkeys(a.keys, 3)
    assert a.bits(ranks) == b.bits(ranks) == 32 * b.params(ranks)
    assert a.max_uniform_rank() == b.max_uniform_rank() == 3
    raw = np.arange(36) % 9
    assert a.project(raw) == b.project(raw) == a.project_joint(raw)[0]


def test_precisions_must_be_allowed():
    budget = Budget.for_delivery(MINILM, 8, (8, 32), 4.0e6, 1.0)
    ranks = dict.fromkeys(budget.keys, 1)
    with pytest.raises(AirloraError, match=r"precision of 'layers.0.q' is 16.0 bits; allowed: 8, 32"):
        budget.bits(ranks, dict.fromkeys(budget.keys, 16))
    assert not budget.feasible(ranks, dict.fromkeys(budget.keys, 16))
    # the projection snaps down instead: 16 -> 8, 2 (below every allowed one) -> 8, 64 -> 32
    out = budget.project_joint(ranks, {k: [16, 2, 64][i % 3] for i, k in enumerate(budget.keys)})[1]
    assert [out[k] for k in budget.keys[:3]] == [8, 8, 32]


def test_uniform_pair_takes_rank_then_precision():
    # at 4.036 Mbit/s (0 dB, scale-matched) fp32 fits rank 3, int8 rank 8 (and int4 rank 8 too)
    budget = Budget.for_delivery(MINILM, 8, (4, 8, 16, 32), 4.035722e6, 1.0, reserved_bits=770 * 32)
    assert budget.max_uniform_rank(32) == 3 and budget.max_uniform_rank(8) == 8
    assert budget.uniform_pair() == (8, 8)
    tight = Budget.for_delivery(MINILM, 8, (4, 8), 1.0e6, 1.0)
    assert tight.uniform_pair() == (tight.max_uniform_rank(4), 4) and tight.max_uniform_rank(4) > \
        tight.max_uniform_rank(8)


def test_nothing_fits_looks_at_the_cheapest_precision():
    shapes = {"layers.0.q": (384, 384)}
    int4 = CODECS[4].unit_bits(384, 384)
    assert not Budget.for_delivery(shapes, 4, (4, 32), float(int4 + 10), 1.0, reserved_bits=10).nothing_fits()
    assert Budget.for_delivery(shapes, 4, (4, 32), float(int4 + 9), 1.0, reserved_bits=10).nothing_fits()


def test_precision_is_lowered_before_any_rank_is_cut():
    budget = Budget.for_delivery(MINILM, 8, (4, 8, 16, 32), 4.035722e6, 1.0, reserved_bits=770 * 32)
    ranks, precisions = budget.project_joint(dict.fromkeys(budget.keys, 8))
    assert set(ranks.values()) == {8} and budget.feasible(ranks, precisions)
    assert set(precisions.values()) <= {8, 16}  # no module needed int4: fp16 everywhere does not fit, int8 does
    assert 8 in precisions.values()
    # where not even int4 everywhere fits, ranks are cut and every module is at int4 or was raised back
    low = Budget.for_delivery(MINILM, 8, (4, 8, 16, 32), 1.0e6, 1.0, reserved_bits=770 * 32)
    ranks, precisions = low.project_joint(dict.fromkeys(low.keys, 8))
    assert sum(ranks.values()) < 8 * 36 and low.feasible(ranks, precisions)


# ---- the joint projection's guarantees, as properties ----

@st.composite
def joint_cases(draw: st.DrawFn):
    dims = st.integers(1, 2000)
    shapes = draw(st.lists(st.tuples(dims, dims), min_size=1, max_size=16))
    allowed = tuple(sorted(draw(st.sets(st.sampled_from(CODEC_BITS), min_size=1))))
    r_max = draw(st.integers(1, 64))
    ranks = np.array(draw(st.lists(st.integers(0, r_max) | st.floats(-3, r_max + 3) | st.floats(),
                                   min_size=len(shapes), max_size=len(shapes))), dtype=np.float64)
    asked = np.array(draw(st.lists(st.sampled_from(CODEC_BITS + (2, 12, 64)) | st.floats(0, 70),
                                   min_size=len(shapes), max_size=len(shapes))), dtype=np.float64)
    keyed = {rank_key(i, MODULES[0]): s for i, s in enumerate(shapes)}
    probe = Budget.for_delivery(keyed, r_max, allowed, 1.0, 1.0)
    clipped = np.clip(np.floor(np.nan_to_num(ranks, nan=0.0)), 0, r_max)
    wanted = int(np.dot(clipped, probe.unit_bits[:, -1]))
    reserved = draw(st.just(0) | st.integers(0, max(1, wanted // 4)))
    share = draw(st.floats(1e-4, 1.25))
    t_max = draw(st.floats(1e-3, 10.0))
    budget = Budget.for_delivery(keyed, r_max, allowed, max(share * (wanted + reserved) / t_max, 1e-6), t_max,
                                 reserved_bits=reserved)
    return budget, ranks, asked


def snapped(budget: Budget, asked: np.ndarray) -> np.ndarray:
    """The asked precisions as allowed values: the largest allowed at or below each (the lowest if none)."""
    out = []
    for b in asked:
        below = [a for a in budget.allowed_bits if not math.isnan(b) and a <= b]
        out.append(below[-1] if below else budget.allowed_bits[0])
    return np.array(out)


@given(case=joint_cases(), with_scores=st.booleans(), data=st.data())
@settings(max_examples=300, deadline=None)
def test_joint_projection_is_feasible_maximal_and_the_identity_on_feasible_input(case, with_scores, data):
    budget, raw, asked = case
    scores = (np.array(data.draw(st.lists(st.floats(-1e6, 1e6), min_size=raw.size, max_size=raw.size)))
              if with_scores else None)
    ranks_map, bits_map = budget.project_joint(raw, asked, scores=scores)
    assert list(ranks_map) == list(bits_map) == list(budget.keys)
    r = budget.vector(ranks_map)
    bits = np.array([bits_map[k] for k in budget.keys])
    target_r = np.clip(np.floor(np.nan_to_num(raw, nan=0.0)), 0, budget.r_max).astype(np.int64)
    target_b = snapped(budget, asked)
    assert np.all(r <= target_r) and np.all(bits <= target_b) and set(bits) <= set(budget.allowed_bits)
    if budget.reserved_bits > budget.capacity_bps * budget.t_max_s:  # not even the reserved bits fit
        assert budget.nothing_fits() and not r.any()
        return
    assert budget.feasible(ranks_map, bits_map) and budget.eta(ranks_map, bits_map) <= 1
    if budget.feasible(target_r, dict(zip(budget.keys, target_b.tolist(), strict=True))):
        assert np.array_equal(r, target_r) and np.array_equal(bits, target_b)
    for m, key in enumerate(budget.keys):  # maximal: no single move still fits
        if r[m] < target_r[m]:
            assert not budget.feasible(ranks_map | {key: int(r[m]) + 1}, bits_map)
        if bits[m] < target_b[m]:
            up = budget.allowed_bits[budget.allowed_bits.index(int(bits[m])) + 1]
            assert r[m] > 0 and not budget.feasible(ranks_map, bits_map | {key: up})
    # precision goes first: if the asked ranks fit at the lowest precision, no rank is cut
    if budget.feasible(target_r, dict.fromkeys(budget.keys, budget.allowed_bits[0])):
        assert np.array_equal(r, target_r)
