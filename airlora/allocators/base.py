"""The allocator interface: what every rank (and precision) allocator sees and returns.

The trainer calls ``allocate`` before the forward pass of every step a decision is due, projects the answer onto
the budget (``Budget.project_joint``) and applies it; it calls ``observe`` after ``optimizer.step()`` and before
``zero_grad()`` (gradients still present, as PEFT's ``update_and_allocate`` expects). ``deliver`` is the
evaluation-mode decision for a delivery over ``ctx``'s channel. The trainer never knows which allocator it talks to.

What ``allocate`` and ``deliver`` return (a ``Decision``):
- a rank mapping ``{"layers.{i}.{module}": r}``: rank only. Every module is proposed at the budget's highest
  allowed precision, ``ctx.budget.bits_per_param``; the projection lowers precisions (before any rank) only where
  the budget needs it. With one allowed precision (``channel.bits: [b]``, the default [32]) this is all there is.
- or a pair ``(ranks, precisions)``, ``precisions`` a mapping with the same keys to bits per value, each one of
  ``ctx.budget.allowed_bits``: rank and precision chosen together. ``ctx.budget.unit_bits`` (M, K) holds each
  module's exact on-air bits per unit rank at each allowed precision, ``ctx.budget.reserved_bits`` the head and the
  delivery overhead, so an allocator can price its choice exactly; the projection still makes it feasible.
``ctx.precisions`` and ``StepOutcome.precisions`` are the precisions applied at the previous / this step (None
before the first decision and off a real run).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from airlora.ranks import RankMap

if TYPE_CHECKING:
    from airlora.channel import Budget
    from airlora.config import RunConfig

PrecisionMap = dict[str, int]
"""``"layers.{i}.{module}" -> bits per value`` (same as ``airlora.budget.PrecisionMap``)."""
Decision = RankMap | tuple[RankMap, PrecisionMap]
"""What ``allocate`` and ``deliver`` return: ranks, or ranks and precisions (see the module docstring)."""


def split_decision(decision: Decision) -> tuple[RankMap, PrecisionMap | None]:
    """(ranks, precisions) of a decision; precisions None for a rank-only one (the budget's highest)."""
    if isinstance(decision, tuple):
        ranks, precisions = decision
        return ranks, precisions
    return decision, None


@dataclass(frozen=True)
class AllocationContext:
    """What an allocator may look at when it chooses ranks for the next step."""

    step: int
    """Index of the step about to run (0-based)."""
    snr_db: float
    """This step's SNR in dB."""
    budget: Budget
    """The channel budget at this step's SNR: costs per module, r_max, capacity, projection."""
    lexical_entropy: float
    """Normalised lexical entropy of this step's batch, in [0, 1]."""
    oov_rate: float
    """Word-level OOV rate of this step's batch, in [0, 1]."""
    ranks: RankMap
    """Ranks applied at the previous step."""
    bandwidth_hz: float
    """Channel bandwidth W in Hz."""
    progress: float = 0.0
    """Share of the run's steps done before this one, in [0, 1] (the policy's state sees it: losses fall as a
    run goes on, and without it a critic or value function would read that trend as the effect of the ranks)."""
    precisions: PrecisionMap | None = None
    """Precisions applied at the previous step (None before the first)."""


@dataclass(frozen=True)
class StepOutcome:
    """What happened at a step, handed to the allocator after the optimiser step."""

    step: int
    loss: float
    """Task loss U of the batch."""
    reward: float
    """The reward of the step as its caller defines it (the trainer, the environment and the bandit: R = −U − λ·η)."""
    eta: float
    """Share of the airtime budget the applied ranks use."""
    ranks: RankMap
    """Ranks applied at this step (after projection)."""
    model: torch.nn.Module | None
    """The model, with gradients of this step still on its parameters; None where there is no model (the bandit)."""
    precisions: PrecisionMap | None = None
    """Precisions applied at this step (after projection); None where the caller has none (the bandit)."""


class Allocator:
    """Base class: subclasses set ``name`` and implement ``allocate``; ``observe`` is optional."""

    name: str = ""
    first_deliverable_step: int = 0
    """Checkpoints before this step are not delivered (an allocator whose final ranks come late, like AdaLoRA)."""

    def __init__(self, config: RunConfig, seed: int) -> None:
        self.config = config
        self.seed = seed

    def allocate(self, ctx: AllocationContext) -> Decision:
        """Ranks (and optionally precisions) for the next step; the trainer projects them onto ``ctx.budget``."""
        raise NotImplementedError

    def observe(self, outcome: StepOutcome) -> None:
        """Called after ``optimizer.step()``, before ``zero_grad()``; ``outcome.model`` is None off a real run."""

    def deliver(self, ctx: AllocationContext) -> Decision:
        """The evaluation-mode decision for delivering over the channel of ``ctx``; it changes nothing learned.

        Allocators that do not explore return their usual decision; the caller projects it onto ``ctx.budget``.
        """
        return self.allocate(ctx)

    def state_dict(self) -> dict[str, Any]:
        """Everything the allocator has learned or drawn so far, as tensors and plain values (for checkpoints)."""
        return {}

    def load_state_dict(self, state: dict[str, Any], ctx: AllocationContext, model: torch.nn.Module) -> None:
        """Restore ``state_dict()``; ``ctx`` and ``model`` are those of the step the run continues from."""

    def save(self, out: Path) -> dict[str, Any]:
        """Write allocator-specific artefacts into the run folder ``out``; return extra summary fields."""
        return {}
