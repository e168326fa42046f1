"""The allocator interface: what every rank (and precision) allocator sees and returns, and when it is called.

An allocator is a subclass of ``Allocator``, built once per run as ``cls(config, seed)`` (``config`` the resolved
``RunConfig``, ``seed`` its ``train.seed``). Built-in allocators and plugins (``airlora.registry``: an entry point
of the group ``airlora.allocators`` or ``airlora.allocators.register``) are called the same way, at these points
of the trainer (``airlora.trainer.train``), like PEFT's ``update_and_allocate`` inside a training loop::

    allocator = cls(config, seed)                       # once (a resume then calls load_state_dict)
    for step in range(steps):
        if step % train.allocate_every == 0:
            decision = allocator.allocate(ctx)          # 1. before the forward pass: ranks (and precisions)
        ranks, precisions = budget.project_joint(...)   #    projected onto the step's budget, applied
        loss.backward(); optimizer.step()
        allocator.observe(outcome)                      # 2. after optimizer.step(), before zero_grad(): the
        optimizer.zero_grad()                           #    gradients are still on outcome.model's parameters
        rows = allocator.metric_rows()                  # 3. new per-episode scalars, logged (TensorBoard)
        if evaluation step:
            allocator.deliver(ctx)                      # 4. the evaluation-mode decision for the delivery channel
        if checkpoint step:
            allocator.state_dict()                      # 5. into the checkpoint (tensors and plain values)
    allocator.save(out)                                 # 6. once, at the end: its own files, extra summary fields

That is the ``paper`` regime (``train.regime``), the paper's MDP. In the default ``delivery`` regime the channel
constrains only what is sent, and the same calls mean::

    for step in range(steps):
        ranks = allocator.training_ranks(ctx)           # 0. the ranks to train at (None: every triplet, r_max);
                                                        #    never projected onto a channel
        if step % train.allocate_every == 0:
            decision = allocator.allocate(ctx)          # 1. a candidate delivery for ctx's channel (this step's SNR
        loss.backward(); optimizer.step()               #    is a delivery channel to practise on), projected
        allocator.observe(outcome)                      # 2. outcome.ranks/precisions: that candidate; reward: with
        optimizer.zero_grad()                           #    ``probe_reward`` its paired probe-set reward, else −U − λ·η
        ...                                             # 3.-6. as above

``load_state_dict(state, ctx, model)`` restores 5. on ``--resume`` before the first step. ``deliver`` is also called
for each SNR's delivery (``train.deliver_every_snr``) after training. The trainer never knows which allocator it
talks to. An error raised by any of these calls stops the run with one line naming the allocator, the call and
the step (``airlora --debug`` shows the traceback); an ``AirloraError`` keeps its own message.

What ``allocate`` and ``deliver`` return (a ``Decision``):
- a rank mapping ``{"layers.{i}.{module}": r}`` with exactly the keys of ``ctx.budget.keys`` and real numbers as
  values (the projection takes clip(floor(r), 0, r_max)): rank only. Every module is proposed at the budget's
  highest allowed precision, ``ctx.budget.bits_per_param``; the projection lowers precisions (before any rank) only
  where the budget needs it. With one allowed precision (``channel.bits: [b]``, the default [32]) this is all there
  is.
- or a pair ``(ranks, precisions)``, ``precisions`` a mapping with the same keys to bits per value, each one of
  ``ctx.budget.allowed_bits``: rank and precision chosen together. ``ctx.budget.unit_bits`` (M, K) holds each
  module's exact on-air bits per unit rank at each allowed precision, ``ctx.budget.reserved_bits`` the head and the
  delivery overhead, so an allocator can price its choice exactly; the projection still makes it feasible.
Anything else (another type, a missing or unknown key, a value that is not a finite number, a precision not
allowed) stops the run with a one-line error (``checked_decision``).
``ctx.precisions`` and ``StepOutcome.precisions`` are the precisions applied at the previous / this step (None
before the first decision and off a real run).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from airlora.errors import AirloraError
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
    """Base class: subclasses set ``name`` and implement ``allocate``; everything else has a default.

    See the module docstring for when each method is called. ``metrics``, when a subclass keeps it, is a list of
    per-episode rows of scalars (``{"episode": 3, "ppo_approx_kl": 0.01, …}``) appended as it learns; the default
    ``metric_rows`` hands it to the trainer's logger.
    """

    name: str = ""
    first_deliverable_step: int = 0
    """Checkpoints before this step are not delivered (an allocator whose final ranks come late, like AdaLoRA)."""
    probe_reward: bool = False
    """``delivery`` regime: True asks the trainer to measure each candidate delivery on the probe set, paired against
    the full adapter on the same examples (``StepOutcome.reward`` = −(U_candidate − U_full) − λ·η, two no-grad passes
    a decision); False leaves the cheap −U − λ·η of the training batch (an allocator that does not learn from it).
    Steps without a decision (``train.allocate_every`` > 1) get the batch's −U − λ·η either way: learn only from the
    steps you decided."""

    def __init__(self, config: RunConfig, seed: int) -> None:
        self.config = config
        self.seed = seed

    def allocate(self, ctx: AllocationContext) -> Decision:
        """Ranks (and optionally precisions) for the next step; the trainer projects them onto ``ctx.budget``."""
        raise NotImplementedError

    def training_ranks(self, ctx: AllocationContext) -> RankMap | None:
        """``delivery`` regime: the ranks the adapter trains at this step, not projected onto any channel; None (the
        default) trains every triplet. An allocator that schedules its own training ranks (AdaLoRA's pruning) says so
        here; the channel never throttles training."""
        return None

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

    def metric_rows(self) -> Sequence[Mapping[str, Any]]:
        """Every row of per-episode (or per-update) scalars so far, oldest first, each a mapping name -> number.

        The trainer logs each new row once, at the step it appeared, as ``losses/{name}`` (names with "loss") or
        ``policy/{name}`` (the others; ``episode`` is not logged). Rows must survive ``state_dict`` /
        ``load_state_dict`` so a resumed run does not log them twice. Default: the ``metrics`` attribute when the
        allocator keeps one (``AirLLMAllocator`` does), else none.
        """
        return getattr(self, "metrics", ())


def call(allocator: Allocator, method: str, *args: Any, step: int | None = None) -> Any:
    """``allocator.method(*args)``; any error but an ``AirloraError`` comes out as one naming the allocator, the call
    and the step (the original chained, for ``--debug``)."""
    function: Callable[..., Any] = getattr(allocator, method)
    try:
        return function(*args)
    except AirloraError:
        raise
    except Exception as err:
        at = "" if step is None else f" at step {step}"
        raise AirloraError(f"allocator {_name(allocator)!r} failed in {method}{at}: {type(err).__name__}: {err}"
                           ) from err


def _name(allocator: Allocator) -> str:
    return allocator.config.allocator if hasattr(allocator, "config") else (allocator.name or type(allocator).__name__)


def checked_decision(decision: Any, budget: Budget, allocator: Allocator, method: str,
                     step: int) -> tuple[RankMap, PrecisionMap | None]:
    """``split_decision`` of what ``allocate`` or ``deliver`` returned, after checking its form (see the module
    docstring); a bad one is one ``AirloraError`` naming the allocator, the call, the step and the problem."""
    where = f"allocator {_name(allocator)!r} returned a bad decision from {method} at step {step}"
    if isinstance(decision, tuple) and len(decision) == 2:
        ranks, precisions = decision
    elif isinstance(decision, Mapping):
        ranks, precisions = decision, None
    else:
        raise AirloraError(f"{where}: {type(decision).__name__} {_short(decision)}; expected a rank mapping "
                           "{'layers.<i>.<module>': rank} or a pair (ranks, precisions)")
    keys = list(budget.keys)
    for what, mapping in (("ranks", ranks), ("precisions", precisions)):
        if mapping is None and what == "precisions":
            continue
        if not isinstance(mapping, Mapping):
            raise AirloraError(f"{where}: {what} is {type(mapping).__name__} {_short(mapping)}; expected a mapping "
                               f"with the keys {keys[0]} … {keys[-1]}")
        unknown = [k for k in mapping if k not in budget.keys]
        missing = [k for k in keys if k not in mapping]
        if unknown or missing:
            problem = (f"unknown key {unknown[0]!r}" if unknown else
                       f"key {missing[0]!r} missing ({len(missing)} of {len(keys)} missing)")
            raise AirloraError(f"{where}: {what} has {problem}; expected exactly the keys {keys[0]} … {keys[-1]}")
        for key in keys:
            value = mapping[key]
            number = isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)
            if what == "ranks" and not number:
                raise AirloraError(f"{where}: rank of {key!r} is {value!r}; expected a finite number (the projection "
                                   f"takes clip(floor(r), 0, {budget.r_max}))")
            if what == "precisions" and not (number and value in budget.allowed_bits):
                raise AirloraError(f"{where}: precision of {key!r} is {value!r}; expected one of "
                                   f"{', '.join(map(str, budget.allowed_bits))} (channel.bits)")
    return dict(ranks), None if precisions is None else dict(precisions)


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
