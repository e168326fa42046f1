"""Uniform allocator: the largest common rank (at most r_max) whose adapter fits this step's budget."""

from __future__ import annotations

from airlora.allocators.base import AllocationContext, Allocator
from airlora.ranks import RankMap


class UniformAllocator(Allocator):
    """Every module gets the same rank: the largest that fits the budget at this step's SNR."""

    name = "uniform"

    def allocate(self, ctx: AllocationContext) -> RankMap:
        rank = ctx.budget.max_uniform_rank()
        return {key: rank for key in ctx.budget.keys}
