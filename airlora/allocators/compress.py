"""`compress`: train plainly, compress at delivery: the baseline a reviewer asks for first.

Nothing of the channel reaches training (in the default ``delivery`` regime every triplet trains at r_max). At
delivery, each module's triplets are cut and its precision chosen to fit the budget by measured value: the energy
(scaling·λ_i)² of triplet i, the squared Frobenius norm it adds to ΔW = scaling·P·diag(λ)·Q when P and Q are
orthonormal (what the regulariser keeps them near), so keeping the highest-energy triplets of ΔW is its best cut in
that norm (Eckart–Young), as PEFT's SVD-based rank pattern does for a merged update. Rank and precision share one
greedy fill by value per on-air bit (``greedy_fill_joint``, the heuristic's knapsack): a triplet is worth its energy,
a precision level up the share of its module's kept energy that the codec's error bound removes. With one allowed
precision it is the same fill over ranks alone.

In the ``paper`` regime it is the same rule applied at every step (what is trained is what that rule keeps).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

from airlora.adapters import SVDLinear
from airlora.allocators.adalora import adapter_keys
from airlora.allocators.base import AllocationContext, Allocator, Decision, StepOutcome
from airlora.allocators.heuristic import greedy_fill, greedy_fill_joint


class CompressAllocator(Allocator):
    """Every triplet trains; the delivery keeps the highest-energy triplets and precisions that fit."""

    name = "compress"

    def __init__(self, config: Any, seed: int) -> None:
        super().__init__(config, seed)
        self.modules: dict[str, SVDLinear] | None = None

    def energies(self) -> dict[str, np.ndarray] | None:
        """(scaling·λ_i)² of every stored triplet of each module, by rank key; None before the model is seen."""
        if self.modules is None:
            return None
        return {key: (m.scaling * m.lam.detach().float().cpu().numpy()) ** 2 for key, m in self.modules.items()}

    def allocate(self, ctx: AllocationContext) -> Decision:
        budget, empty = ctx.budget, dict.fromkeys(ctx.budget.keys, 0)
        if len(budget.allowed_bits) > 1:
            return greedy_fill_joint(budget, empty, self.energies())
        return greedy_fill(budget, empty, self.energies())

    def observe(self, outcome: StepOutcome) -> None:
        if self.modules is None and outcome.model is not None:
            self._find(outcome.model)

    def _find(self, model: nn.Module) -> None:
        keys = adapter_keys(model, self.config.adapter.target_modules)
        self.modules = {key: model.get_submodule(name) for name, key in keys.items()}

    def load_state_dict(self, state: dict[str, Any], ctx: AllocationContext, model: torch.nn.Module) -> None:
        self._find(model)  # nothing learned: the values are the model's own λ
