"""Uniform allocator: the largest common rank (at most r_max) whose adapter fits this step's budget.

With several allowed precisions (``channel.bits``) it picks the best common (rank, precision) pair: the largest
rank that fits at any allowed precision, then the highest precision at which that rank still fits
(``Budget.uniform_pair``); with one, the largest rank at that precision, as always.
"""

from __future__ import annotations

from airlora.allocators.base import AllocationContext, Allocator, Decision


class UniformAllocator(Allocator):
    """Every module gets the same rank and precision: the largest rank that fits the budget at this step's SNR."""

    name = "uniform"

    def allocate(self, ctx: AllocationContext) -> Decision:
        budget = ctx.budget
        if len(budget.allowed_bits) == 1:
            return dict.fromkeys(budget.keys, budget.max_uniform_rank())
        rank, bits = budget.uniform_pair()
        return dict.fromkeys(budget.keys, rank), dict.fromkeys(budget.keys, bits)
