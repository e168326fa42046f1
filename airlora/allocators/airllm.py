"""AirLLM allocator (paper §IV, Algorithm 1): the hierarchical rank policy, trained online inside the run.

The policy itself (PPO → DDIM refiner → critic, its learning and its file) is ``airlora.policy.hierarchical``;
this class only turns the trainer's ``AllocationContext`` into the policy's state and the ``StepOutcome`` into a
recorded transition, so the trainer, the Gymnasium environment and the bandit drive it through the same calls.

The two regimes (``train.regime``):
- ``delivery`` (default): each decision is a candidate delivery over the step's channel, measured on the probe set
  against the full adapter (``probe_reward``), and it chooses precision as well as ranks: a common precision per
  delivery channel by a bandit on that reward (``airlora.policy.precision``), then the ranks priced at it. The
  projection only lowers what does not fit, so the bits sent are the bits it chose.
- ``paper``: the paper's MDP, as first built: ranks only, every step's decision trained at. With several allowed
  precisions the budget's joint projection picks each module's precision (the highest at which the ranks fit,
  lowered where they do not, before any rank is cut), and the policy prices its ranks at what that projection will
  execute (``Geometry``).
"""

from __future__ import annotations

import functools
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from airlora.allocators.base import AllocationContext, Allocator, Decision, StepOutcome
from airlora.budget import Budget
from airlora.config import RunConfig
from airlora.policy.hierarchical import Geometry, RankPolicy, load_policy_file
from airlora.policy.precision import PrecisionChoice
from airlora.policy.threads import single_thread
from airlora.state import state_of

POLICY_FILE = "policy.pt"
METRICS_FILE = "policy_metrics.csv"


@functools.lru_cache(maxsize=64)  # once per (budget, bits): a budget is hashed by identity, and kept per SNR anyway
def geometry(budget: Budget, bits: int) -> Geometry:
    """The budget as the rank policy prices it when the ranks are asked at ``bits``: those bits per unit rank while
    they fit, the budget filled at lower precisions while they fit at the lowest allowed (the projection lowers
    precision before any rank), then cut."""
    unit = budget.unit_bits  # (M, K) exact on-air bits per unit rank at each allowed precision, ascending
    level = budget.allowed_bits.index(bits)
    return Geometry(torch.tensor(unit[:, level], dtype=torch.float32), float(budget.reserved_bits), budget.t_max_s,
                    budget.r_max, torch.tensor(unit[:, 0], dtype=torch.float32) if level > 0 else None)


class AirLLMAllocator(Allocator):
    """The hierarchical PPO → DDIM rank policy, trained online inside the fine-tuning run."""

    name = "airllm"

    def __init__(self, config: RunConfig, seed: int) -> None:
        super().__init__(config, seed)
        self.variant = config.policy.variant
        self.policy: RankPolicy | None = None
        self.pending: dict[str, Any] | None = None
        self.metrics: list[dict[str, Any]] = []
        self.decision_s: list[float] = []
        self.delivery = config.train.regime == "delivery"
        self.probe_reward = self.delivery  # learns from the paired probe-set reward of its candidate deliveries
        self.precision = PrecisionChoice(config.channel.bits)

    def _build(self, ctx: AllocationContext) -> None:
        budget = ctx.budget
        self.keys = list(budget.keys)
        self.policy = RankPolicy(self.keys, geometry(budget, budget.allowed_bits[-1]), self.config.policy,
                                 self.config.train.reward_lambda, self.seed)
        if self.config.policy.load_path:
            path = Path(self.config.policy.load_path)
            self.policy.load_policy(load_policy_file(path), f"--policy {str(path)!r}")

    def _state(self, ctx: AllocationContext) -> torch.Tensor:
        return torch.from_numpy(state_of(ctx, self.keys))  # (S,)

    def allocate(self, ctx: AllocationContext) -> Decision:
        with single_thread():
            if self.policy is None:
                self._build(ctx)
            t0 = time.perf_counter()
            decision, self.pending = self._decide(ctx, explore=True)
            self.decision_s.append(time.perf_counter() - t0)
        return decision

    def deliver(self, ctx: AllocationContext) -> Decision:
        """The deterministic decision for this channel: PPO's mean, a fixed noise seed, the pessimistic critic (and
        in the ``delivery`` regime the precision with the best mean reward there)."""
        with single_thread():
            if self.policy is None:
                self._build(ctx)
            decision, _ = self._decide(ctx, explore=False)
        return decision

    def _decide(self, ctx: AllocationContext, explore: bool) -> tuple[Decision, dict[str, Any]]:
        """'paper': ranks only. 'delivery': a precision for this channel, then ranks priced at it."""
        state, capacity = self._state(ctx), ctx.budget.capacity_bps
        if not self.delivery:
            ranks, record = self.policy.act(state, capacity, explore=explore)
            return dict(zip(self.keys, ranks, strict=True)), record
        bits = self.precision.choose(ctx.snr_db, explore, ctx.budget.allowed_bits)
        with self.policy.priced_at(geometry(ctx.budget, bits)):
            ranks, record = self.policy.act(state, capacity, explore=explore)
        record |= {"snr_db": ctx.snr_db, "bits": bits}
        return (dict(zip(self.keys, ranks, strict=True)), dict.fromkeys(self.keys, bits)), record

    def observe(self, outcome: StepOutcome) -> None:
        if self.pending is None:  # a step the allocator did not decide (allocate_every > 1)
            return
        decision, self.pending = self.pending, None
        t0 = time.perf_counter()
        if "bits" in decision:
            bits = decision.pop("bits")
            self.precision.update(decision.pop("snr_db"), bits, outcome.reward)
        with single_thread():
            row = self.policy.record(decision, [outcome.ranks[k] for k in self.keys], outcome.reward, outcome.eta)
        if row is not None:
            steps = int(row["steps"])
            row = {"episode": len(self.metrics), **row, "update_ms": 1e3 * (time.perf_counter() - t0),
                   "decision_ms": 1e3 * float(np.mean(self.decision_s[-steps - 1:-1] or self.decision_s))}
            self.metrics.append(row)

    def save(self, out: Path) -> dict[str, Any]:
        """Write policy.pt and policy_metrics.csv; return the policy's summary fields."""
        from airlora.io import atomic_path, write_csv_atomic

        if self.policy is None:
            return {}
        with atomic_path(out / POLICY_FILE) as tmp:
            torch.save(self.policy.policy_state(), tmp)
        columns = sorted({k for row in self.metrics for k in row}, key=lambda k: (k != "episode", k))
        write_csv_atomic(out / METRICS_FILE, self.metrics, columns)
        rewards = [row["mean_reward"] for row in self.metrics]
        quarter = max(len(rewards) // 4, 1)
        return {
            "policy_variant": self.variant,
            "policy_episodes": len(self.metrics),
            "policy_decision_ms": 1e3 * float(np.median(self.decision_s)) if self.decision_s else None,
            "episode_reward_first_quarter": float(np.mean(rewards[:quarter])) if rewards else None,
            "episode_reward_last_quarter": float(np.mean(rewards[-quarter:])) if rewards else None,
        }

    def state_dict(self) -> dict[str, Any]:
        """The policy's whole state, the learning log and the decision times."""
        return {"policy": None if self.policy is None else self.policy.state_dict(), "metrics": self.metrics,
                "decision_s": self.decision_s, "precision": self.precision.state_dict()}

    def load_state_dict(self, state: dict[str, Any], ctx: AllocationContext, model: torch.nn.Module) -> None:
        if state["policy"] is not None:
            self._build(ctx)
            self.policy.load_state_dict(state["policy"])
        self.metrics, self.decision_s = state["metrics"], state["decision_s"]
        if "precision" in state:  # checkpoints before the delivery regime have none
            self.precision.load_state_dict(state["precision"])
