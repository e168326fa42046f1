"""top-down: an example airlora allocator plugin (install this folder; then `airlora run --allocator top-down`).

It fills the airtime budget from the last layer down, every module of a layer at one rank, on the idea that the
layers next to the task head matter most; and it keeps a per-10-step summary, which airlora logs as policy/….
"""

from __future__ import annotations

from typing import Any

from airlora.allocators import AllocationContext, Allocator, StepOutcome
from airlora.ranks import parse_key


class TopDownAllocator(Allocator):
    """The deepest layers first, each at the largest common rank that still fits the step's budget."""

    name = "top-down"

    def __init__(self, config: Any, seed: int) -> None:
        super().__init__(config, seed)
        self.metrics: list[dict[str, float]] = []  # rows the trainer logs (Allocator.metric_rows)
        self.window: list[tuple[float, float]] = []  # (reward, eta) of the steps since the last row

    def allocate(self, ctx: AllocationContext) -> dict[str, int]:
        budget = ctx.budget
        ranks = dict.fromkeys(budget.keys, 0)
        for layer in sorted({parse_key(k)[0] for k in budget.keys}, reverse=True):
            keys = [k for k in budget.keys if parse_key(k)[0] == layer]
            for rank in range(budget.r_max, 0, -1):
                if budget.feasible(trial := ranks | dict.fromkeys(keys, rank)):
                    ranks = trial
                    break
        return ranks  # the trainer projects it onto the budget anyway

    def observe(self, outcome: StepOutcome) -> None:
        self.window.append((outcome.reward, outcome.eta))
        if len(self.window) == 10:
            rewards, etas = zip(*self.window, strict=True)
            self.metrics.append({"episode": len(self.metrics), "mean_reward": sum(rewards) / 10,
                                 "mean_eta": sum(etas) / 10})
            self.window = []

    def state_dict(self) -> dict[str, Any]:
        return {"metrics": self.metrics, "window": self.window}

    def load_state_dict(self, state: dict[str, Any], ctx: AllocationContext, model: Any) -> None:
        self.metrics, self.window = state["metrics"], [tuple(w) for w in state["window"]]
