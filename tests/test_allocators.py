"""Uniform and random allocators against the budget they are given."""

import numpy as np
import pytest

from airlora.allocators import AllocationContext, make_allocator
from airlora.channel import Budget
from airlora.config import RunConfig
from airlora.ranks import MODULES

SHAPES = {f"layers.{i}.{m}": (16, 48 if m == "fc1" else 16) for i in range(3) for m in MODULES}


def _ctx(capacity_bps: float, step: int = 0) -> AllocationContext:
    budget = Budget.for_model(SHAPES, r_max=8, bits_per_param=32, capacity_bps=capacity_bps, t_max_s=1.0,
                              reserved_params=10)
    return AllocationContext(step, 0.0, budget, 0.5, 0.1, {k: 8 for k in SHAPES}, 1e6)


@pytest.mark.parametrize("capacity", [1e3, 5e4, 2e5, 1e9])
def test_uniform_is_the_largest_common_rank_that_fits(capacity):
    ctx = _ctx(capacity)
    ranks = make_allocator(RunConfig(allocator="uniform")).allocate(ctx)
    (rank,) = set(ranks.values())
    assert ctx.budget.feasible(ranks)
    if rank < 8:
        assert not ctx.budget.feasible({k: rank + 1 for k in ranks})


def test_random_is_seeded_and_spans_the_range():
    a = make_allocator(RunConfig(allocator="random"))
    b = make_allocator(RunConfig(allocator="random"))
    draws_a = [a.allocate(_ctx(1e9, s)) for s in range(20)]
    draws_b = [b.allocate(_ctx(1e9, s)) for s in range(20)]
    assert draws_a == draws_b
    values = np.array([list(d.values()) for d in draws_a])
    assert values.min() == 0 and values.max() == 8
    assert len({tuple(v) for v in values}) == 20


def test_random_after_projection_is_feasible():
    allocator = make_allocator(RunConfig(allocator="random"))
    ctx = _ctx(5e4)
    for _ in range(20):
        assert ctx.budget.feasible(ctx.budget.project(allocator.allocate(ctx)))
