"""`heuristic`: channel-aware ranks without learning, the simple baseline a learned policy must beat.

The paper's reference point "reduces rank under low SNR". Each decision:
1. a budget-proportional uniform floor: every module keeps floor(share · r_u), where r_u is the largest common
   rank that fits this step's budget (so the floor shrinks with the SNR);
2. a greedy importance-per-bit fill of the rest of the budget: triplets are added by AdaLoRA's sensitivity score
   (``TripletSensitivity``, from PEFT's EMAs of |θ·∂L/∂θ|) divided by their on-air bits cost_m·b, best first,
   while they fit.
The scores only say how many triplets a module gets; which of its triplets are active is SVDLinear's top-|λ| rule.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
from torch import nn

from airlora.allocators.adalora import TripletSensitivity
from airlora.allocators.base import AllocationContext, Allocator, StepOutcome
from airlora.channel import Budget
from airlora.config import RunConfig
from airlora.ranks import RankMap


def greedy_fill(budget: Budget, base: RankMap, values: Mapping[str, np.ndarray] | None = None) -> RankMap:
    """Add triplets to a feasible ``base`` by value per on-air bit, best first, while they fit (greedy knapsack).

    ``values[key]`` holds a score per stored triplet of that module; the module's j-th extra triplet is worth its
    j-th best score, so a module's triplets come in order, and one that does not fit ends its module's run (the
    room only shrinks). Missing values count as 0; equal value per bit goes to the cheaper module first.
    Returns ``base`` projected onto the budget if it does not fit.
    """
    r = budget.vector(base)  # (M,)
    room = budget.room(base)
    if room < 0 or np.any(r > budget.r_max):
        return budget.project(base)
    values = values or {}
    module, worth = [], []
    for m, key in enumerate(budget.keys):
        ranked = np.sort(np.asarray(values.get(key, np.zeros(budget.r_max)), dtype=np.float64))[::-1]  # (R,)
        extra = ranked[r[m]:budget.r_max]
        module += [m] * extra.size
        worth.append(extra)
    module = np.asarray(module, dtype=np.int64)  # (N,) candidate triplets
    if module.size == 0:
        return {key: int(v) for key, v in zip(budget.keys, r, strict=True)}
    cost = budget.costs[module]
    per_bit = np.concatenate(worth) / (cost * budget.bits_per_param)
    for i in np.lexsort((np.arange(module.size), cost, -per_bit)):  # best value per bit, then cheapest, then order
        if cost[i] <= room:
            r[module[i]] += 1
            room -= int(cost[i])
    return {key: int(v) for key, v in zip(budget.keys, r, strict=True)}


class HeuristicAllocator(Allocator):
    """Uniform floor proportional to the budget, then the most important triplets per on-air bit."""

    name = "heuristic"

    def __init__(self, config: RunConfig, seed: int) -> None:
        super().__init__(config, seed)
        self.floor_share = config.heuristic.floor_share
        self.sensitivity: TripletSensitivity | None = None

    def allocate(self, ctx: AllocationContext) -> RankMap:
        budget = ctx.budget
        floor_rank = int(self.floor_share * budget.max_uniform_rank())
        scores = self.sensitivity.scores() if self.sensitivity is not None else None
        return greedy_fill(budget, dict.fromkeys(budget.keys, floor_rank), scores)

    def observe(self, outcome: StepOutcome) -> None:
        if outcome.model is None:  # no gradients to score triplets by (the bandit): the floor and cheapest-first fill
            return
        if self.sensitivity is None:
            self._start(outcome.model)
        self.sensitivity.update(outcome.model)

    def _start(self, model: nn.Module) -> None:
        from peft import AdaLoraConfig

        # Only PEFT's EMA machinery is used; the schedule fields are required by AdaLoraConfig, not read here.
        peft_config = AdaLoraConfig(init_r=self.config.adapter.r_max, total_step=self.config.train.steps,
                                    beta1=self.config.adalora.beta1, beta2=self.config.adalora.beta2)
        self.sensitivity = TripletSensitivity(model, peft_config, self.config.adapter.target_modules)

    def state_dict(self) -> dict[str, Any]:
        return {"sensitivity": self.sensitivity.state_dict() if self.sensitivity is not None else None}

    def load_state_dict(self, state: dict[str, Any], ctx: AllocationContext, model: nn.Module) -> None:
        if state["sensitivity"] is not None:
            self._start(model)
            self.sensitivity.load_state_dict(state["sensitivity"])
