"""Random allocator: independent uniform ranks in 0..r_max per module, then projected by the trainer."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

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

    def deliver(self, ctx: AllocationContext) -> RankMap:
        """One draw from a generator seeded by (seed, step), so a delivery changes nothing and repeats exactly."""
        draws = np.random.default_rng([self.seed, ctx.step]).integers(0, ctx.budget.r_max + 1, len(ctx.budget.keys))
        return {key: int(r) for key, r in zip(ctx.budget.keys, draws, strict=True)}

    def state_dict(self) -> dict[str, Any]:
        return {"rng": self.rng.bit_generator.state}

    def load_state_dict(self, state: dict[str, Any], ctx: AllocationContext, model: torch.nn.Module) -> None:
        self.rng.bit_generator.state = state["rng"]
