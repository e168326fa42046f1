"""The fine-tuning loop: ask the allocator for ranks, project them onto the budget, train, evaluate.

One step = one batch (paper §III): deploy the ranks, one optimiser step, observe the loss, reward
R = −U − λ·η. Validation every ``eval_every`` steps; the best checkpoint (by validation accuracy) is
the adapter delivered, and its ranks, airtime and test accuracy are what the summary reports.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm
from transformers import get_linear_schedule_with_warmup

from airlora.adapters import forget_momentum
from airlora.allocators import AllocationContext, StepOutcome
from airlora.batching import Batch
from airlora.errors import AirloraError
from airlora.session import Session

METRIC_COLUMNS = [
    "step", "loss", "reward", "eta", "snr_db", "capacity_bps", "total_rank", "transmitted_params", "airtime_s",
    "lexical_entropy", "oov_rate", "budget_ok", "val_accuracy", "step_s", "decision_s", "apply_s",
    "update_s",
]


@dataclass
class Checkpoint:
    """The delivered candidate: adapter and head values, ranks and the channel it was chosen for."""

    step: int
    val_accuracy: float
    snr_db: float
    adapter_state: dict[str, torch.Tensor]
    head_state: dict[str, torch.Tensor]


@dataclass
class TrainResult:
    """What the loop produced; ``summarise`` turns it into summary.json."""

    rows: list[dict[str, Any]]
    best: Checkpoint
    final_ranks: dict[str, int]
    steps_run: int
    stopped_early: bool
    nothing_fits_steps: int
    eval_s: float
    """Seconds spent in validation passes."""


def evaluate(session: Session, batches: list[Batch]) -> float:
    """Accuracy of the model as it is now on pre-built evaluation batches."""
    model = session.model
    was_training = model.training
    model.eval()
    correct = total = 0
    with torch.inference_mode():
        for batch in batches:
            batch = batch.to(session.device)
            logits = model(**batch.inputs).logits
            correct += int((logits.argmax(-1) == batch.labels).sum())
            total += int(batch.labels.numel())
    model.train(was_training)
    return correct / max(total, 1)


def reward_converged(mean_reward: float, reward_lambda: float) -> bool:
    """The paper's convergence threshold: mean reward ≥ min(−λ, −0.5) (paper §V)."""
    return mean_reward >= min(-reward_lambda, -0.5)


class FineTuner:
    """The optimiser side of one training step, shared by the loop below and the Gymnasium environment."""

    def __init__(self, session: Session) -> None:
        cfg = session.config
        self.session = session
        # no weight decay on adapters, so cut triplets stay exactly as they were (see adapters.forget_momentum)
        self.optimizer = torch.optim.AdamW(
            [
                {"params": session.adapters.parameters(), "lr": cfg.train.lr, "weight_decay": 0.0},
                {"params": list(session.head.values()), "lr": cfg.train.head_lr, "weight_decay": 0.01},
            ]
        )
        warmup = min(cfg.train.warmup_steps, cfg.train.steps)
        self.scheduler = get_linear_schedule_with_warmup(self.optimizer, warmup, cfg.train.steps)

    def apply(self, ranks: dict[str, int]) -> None:
        """Deploy a feasible rank mapping; cut triplets keep their values."""
        forget_momentum(self.optimizer, self.session.adapters.set_ranks(ranks))

    def step(self, batch: Batch) -> float:
        """Forward, backward and optimiser step on one batch; gradients stay until ``zero_grad``."""
        cfg, model = self.session.config, self.session.model
        batch = batch.to(self.session.device)
        loss = model(**batch.inputs, labels=batch.labels).loss
        weight = cfg.adapter.orth_reg_weight
        (loss + weight * self.session.adapters.orthogonality() if weight else loss).backward()
        self.optimizer.step()
        self.scheduler.step()
        task_loss = float(loss.detach())
        if not math.isfinite(task_loss):
            raise AirloraError(f"training loss became {task_loss}; lower train.lr (now {cfg.train.lr})")
        return task_loss

    def zero_grad(self) -> None:
        """Drop this step's gradients (after the allocator has seen them)."""
        self.optimizer.zero_grad(set_to_none=True)


def train(session: Session) -> TrainResult:
    """Run the fine-tuning loop of ``session`` to the step budget or the paper's early-stop rule."""
    cfg = session.config
    adapters, allocator = session.adapters, session.allocator
    tuner = FineTuner(session)
    session.model.train()
    rows: list[dict[str, Any]] = []
    best: Checkpoint | None = None
    evals_without_gain, rewards_since_eval, nothing_fits_steps = 0, [], 0
    stopped_early = False
    eval_s = 0.0
    ranks = adapters.ranks()
    bar = tqdm(range(cfg.train.steps), desc=f"airlora {cfg.allocator}", disable=not cfg.train.progress,
               dynamic_ncols=True)
    for step in bar:
        # 1. channel and data of this step
        snr_db = session.snr.snr_db(step)
        budget = session.budget(snr_db)
        batch = session.train_batches.batch(step)
        nothing_fits_steps += budget.nothing_fits()

        # 2. ranks: the allocator's decision, then projected onto the budget and applied to the adapters
        t0 = time.perf_counter()
        proposed = ranks
        if step % cfg.train.allocate_every == 0:
            ctx = AllocationContext(step, snr_db, budget, batch.lexical_entropy, batch.oov_rate, ranks,
                                    session.bandwidth_hz)
            proposed = allocator.allocate(ctx)
        decision_s = time.perf_counter() - t0
        ranks = budget.project(proposed)  # never train on, or deliver, ranks that break this step's budget
        tuner.apply(ranks)
        apply_s = time.perf_counter() - t0 - decision_s

        # 3. one training step; the allocator sees it before the gradients are dropped
        t1 = time.perf_counter()
        task_loss = tuner.step(batch)
        step_s = time.perf_counter() - t1
        eta = budget.eta(ranks)
        reward = -task_loss - cfg.train.reward_lambda * eta
        allocator.observe(StepOutcome(step, task_loss, reward, eta, ranks, session.model))  # the allocator learns
        tuner.zero_grad()
        update_s = time.perf_counter() - t1 - step_s
        rewards_since_eval.append(reward)

        row = {
            "step": step, "loss": task_loss, "reward": reward, "eta": eta, "snr_db": snr_db,
            "capacity_bps": budget.capacity_bps, "total_rank": sum(ranks.values()),
            "transmitted_params": budget.params(ranks), "airtime_s": budget.airtime_s(ranks),
            "lexical_entropy": batch.lexical_entropy, "oov_rate": batch.oov_rate,
            "budget_ok": budget.feasible(ranks), "val_accuracy": "", "step_s": step_s, "decision_s": decision_s,
            "apply_s": apply_s, "update_s": update_s,
        }

        # 4. evaluation, best checkpoint, the paper's early-stop rule
        last = step == cfg.train.steps - 1
        if (step + 1) % cfg.train.eval_every == 0 or last:
            t2 = time.perf_counter()
            val_acc = evaluate(session, session.val_batches)
            eval_s += time.perf_counter() - t2
            row["val_accuracy"] = val_acc
            # checkpoints before the allocator's first deliverable step are neither delivered nor counted
            candidate = step >= allocator.first_deliverable_step or last
            if candidate and (best is None or val_acc > best.val_accuracy):
                best = Checkpoint(step, val_acc, snr_db, adapters.state(),
                                  {k: p.detach().clone() for k, p in session.head.items()})
                evals_without_gain = 0
            elif candidate:
                evals_without_gain += 1
            converged = reward_converged(float(np.mean(rewards_since_eval)), cfg.train.reward_lambda)
            rewards_since_eval = []
            if converged and evals_without_gain >= cfg.train.patience and not last:
                stopped_early = True
        rows.append(row)
        bar.set_postfix(loss=f"{task_loss:.3f}", val=f"{best.val_accuracy:.3f}" if best else "-",
                        rank=f"{sum(ranks.values()) / len(ranks):.1f}", air=f"{row['airtime_s']:.2f}s",
                        refresh=False)
        if stopped_early:
            break
    bar.close()
    assert best is not None  # the last step always evaluates
    return TrainResult(rows, best, adapters.ranks(), len(rows), stopped_early, nothing_fits_steps, eval_s)


def restore(session: Session, checkpoint: Checkpoint) -> None:
    """Put the checkpoint's adapter values, active sets and head back into the model."""
    session.adapters.load_state(checkpoint.adapter_state)
    with torch.no_grad():
        for name, p in session.head.items():
            p.copy_(checkpoint.head_state[name])
