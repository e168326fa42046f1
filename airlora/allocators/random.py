"""Random allocator: independent uniform ranks in 0..r_max per module, then projected by the trainer."""

from __future__ import annotations

import numpy as np

from airlora.allocators.base import AllocationContext, Allocator
from airlora.config import RunConfig
from airlora.ranks import RankMap


class RandomAllocator(Allocator):
    """A seeded random rank per module each decision; the paper's random-allocation baseline."""

    name = "random"

    def __init__(self, config: RunConfig, seed: int) -> None:
        super().__init__(config, seed)
        self.rng = np.random.default_rng(seed)

    def allocate(self, ctx: AllocationContext) -> RankMap:
        draws = self.rng.integers(0, ctx.budget.r_max + 1, size=len(ctx.budget.keys))
        return {key: int(r) for key, r in zip(ctx.budget.keys, draws, strict=True)}
