"""`heuristic`: channel-aware ranks without learning, the simple baseline a learned policy must beat.

The paper's reference point "reduces rank under low SNR". Each decision:
1. a budget-proportional uniform floor: every module keeps floor(share · r_u), where r_u is the largest common
   rank that fits this step's budget (so the floor shrinks with the SNR);
2. a greedy importance-per-bit fill of the rest of the budget: triplets are added by AdaLoRA's sensitivity score
   (``TripletSensitivity``, from PEFT's EMAs of |θ·∂L/∂θ|) divided by their on-air bits cost_m·b, best first,
   while they fit.
The scores only say how many triplets a module gets; which of its triplets are active is SVDLinear's top-|λ| rule.

Joint mode (several allowed precisions, ``channel.bits``): the floor is taken at the lowest precision and every
module starts there; then one greedy fill over both kinds of move, best value per on-air bit first:
- one more triplet of module m at its precision b_m: worth its score s·(1 − ε(b_m)), costs u_m(b_m) bits;
- module m one precision level up: worth Σ (its active triplets' scores)·(ε(b) − ε(b')), costs r_m·(u_m(b') − u_m(b)),
where ε is the codec's error bound relative to a group's largest value (``Codec.relative_error``: 2^−11 at fp16,
~1/254 at int8, ~1/14 at int4), a triplet's score its AdaLoRA sensitivity. A triplet is worth as much as the loss
change of removing it, and quantisation noise of relative size ε removes about an ε share of it, so this prices
rank and precision in one currency. Ties go to the triplet (rank first, as ``uniform``), then to the cheaper move.
"""

from __future__ import annotations

import heapq
from collections.abc import Mapping
from typing import Any

import numpy as np
from torch import nn

from airlora.allocators.adalora import TripletSensitivity
from airlora.allocators.base import AllocationContext, Allocator, Decision, PrecisionMap, StepOutcome
from airlora.channel import Budget
from airlora.codecs import codec
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
    room = budget.room_bits(base)  # at the budget's one (highest) precision
    unit = budget.unit_bits_at()  # (M,) bits per triplet
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
    cost = unit[module]
    per_bit = np.concatenate(worth) / cost
    for i in np.lexsort((np.arange(module.size), cost, -per_bit)):  # best value per bit, then cheapest, then order
        if cost[i] <= room:
            r[module[i]] += 1
            room -= int(cost[i])
    return {key: int(v) for key, v in zip(budget.keys, r, strict=True)}


def greedy_fill_joint(budget: Budget, base: RankMap, values: Mapping[str, np.ndarray] | None = None
                      ) -> tuple[RankMap, PrecisionMap]:
    """From ``base`` ranks with every module at the lowest allowed precision, add triplets and precision levels by
    value per on-air bit, best first, while they fit (see the module docstring); the projection of ``base`` at the
    lowest precision if it does not fit.

    A heap of each module's two candidate moves, refreshed when the module changes: a move that does not fit is
    dropped, since the room only shrinks and its cost only changes when its module does.
    """
    lowest = dict.fromkeys(budget.keys, budget.allowed_bits[0])
    r = budget.vector(base)  # (M,)
    if np.any(r > budget.r_max) or budget.room_bits(base, lowest) < 0:
        return budget.project_joint(base, lowest)
    values = values or {}
    unit, top = budget.unit_bits, len(budget.allowed_bits) - 1  # (M, K)
    eps = np.array([codec(b).relative_error for b in budget.allowed_bits])  # (K,)
    ranked = [np.sort(np.asarray(values.get(key, np.zeros(budget.r_max)), dtype=np.float64))[::-1]
              for key in budget.keys]  # (R,) per module, best first
    kept = [np.concatenate([[0.0], np.cumsum(v)]) for v in ranked]  # value of a module's best j triplets
    level = np.zeros(r.size, dtype=np.int64)
    room = budget.room_bits(base, lowest)
    version = np.zeros(r.size, dtype=np.int64)
    heap: list[tuple[float, int, int, int, int]] = []

    def push(m: int) -> None:
        k = level[m]
        if r[m] < budget.r_max:
            worth, cost = ranked[m][r[m]] * (1 - eps[k]), int(unit[m, k])
            heapq.heappush(heap, (-worth / cost, 0, cost, m, int(version[m])))
        if k < top and r[m] > 0:
            worth, cost = kept[m][r[m]] * (eps[k] - eps[k + 1]), int(r[m] * (unit[m, k + 1] - unit[m, k]))
            heapq.heappush(heap, (-np.inf if cost <= 0 else -worth / cost, 1, cost, m, int(version[m])))

    for m in range(r.size):
        push(m)
    while heap:
        _, kind, cost, m, seen = heapq.heappop(heap)
        if seen != version[m] or cost > room:
            continue
        if kind == 0:
            r[m] += 1
        else:
            level[m] += 1
        room -= cost
        version[m] += 1
        push(m)
    return ({key: int(v) for key, v in zip(budget.keys, r, strict=True)},
            {key: int(budget.allowed_bits[k]) for key, k in zip(budget.keys, level, strict=True)})


class HeuristicAllocator(Allocator):
    """Uniform floor proportional to the budget, then the most important triplets per on-air bit."""

    name = "heuristic"

    def __init__(self, config: RunConfig, seed: int) -> None:
        super().__init__(config, seed)
        self.floor_share = config.heuristic.floor_share
        self.sensitivity: TripletSensitivity | None = None

    def allocate(self, ctx: AllocationContext) -> Decision:
        budget = ctx.budget
        scores = self.sensitivity.scores() if self.sensitivity is not None else None
        if len(budget.allowed_bits) > 1:  # joint: rank and precision by value per bit
            floor_rank = int(self.floor_share * budget.max_uniform_rank(budget.allowed_bits[0]))
            return greedy_fill_joint(budget, dict.fromkeys(budget.keys, floor_rank), scores)
        floor_rank = int(self.floor_share * budget.max_uniform_rank())
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
