"""The fine-tuning loop: ask the allocator for ranks, project them onto the budget, train, evaluate.

One step = one batch (paper §III): deploy the ranks, one optimiser step, observe the loss, reward
R = −U − λ·η. Validation every ``eval_every`` steps; the best checkpoint (by validation accuracy) is
the adapter delivered, and its ranks, airtime and test accuracy are what the summary reports.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from airlora import distributed
from airlora.allocators import AllocationContext, StepOutcome
from airlora.allocators.base import call, checked_decision
from airlora.batching import Batch
from airlora.budget import Budget
from airlora.checkpoint import read_pointer, rng_state, save_checkpoint, set_rng_state
from airlora.errors import AirloraError
from airlora.finetuner import FineTuner, NonFiniteLoss
from airlora.io import write_csv_atomic
from airlora.regimes import probe_loss, training_ranks
from airlora.session import Session
from airlora.tracking import Tracker

METRIC_COLUMNS = [
    "step", "loss", "reward", "eta", "snr_db", "capacity_bps", "total_rank", "training_rank", "transmitted_params",
    "transmitted_bits", "airtime_s", "lexical_entropy", "oov_rate", "budget_ok", "val_accuracy", "step_s",
    "decision_s", "apply_s", "update_s", "probe_s", "rss_mb",
]
"""metrics.csv. The delivery figures (total_rank, transmitted_*, airtime_s, eta, budget_ok) are of what a delivery at
the step's channel would send: the ranks trained at ('paper') or the allocator's candidate ('delivery');
training_rank is the sum of the ranks trained at (ranks.csv has them per module)."""


CHECKPOINT_FORMAT = "airlora-checkpoint/2"  # /2: the best checkpoint keeps its ranks and precisions


@dataclass
class Checkpoint:
    """The delivered candidate: adapter and head values, and the ranks it is delivered with on its channel."""

    step: int
    val_accuracy: float
    """Validation accuracy at the delivered ranks."""
    snr_db: float
    """The delivery channel's SNR."""
    adapter_state: dict[str, torch.Tensor]
    head_state: dict[str, torch.Tensor]
    ranks: dict[str, int]
    """The delivery decision, projected onto the delivery channel's budget."""
    precisions: dict[str, int] | None = None
    """Its precisions (None: every module at the highest allowed, as in checkpoints from before the codecs)."""


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
    train_s: float
    """Seconds in the training loop, over every process of a resumed run."""
    resumed_from_step: int | None
    """The checkpoint step this process continued from, or None."""
    final_precisions: dict[str, int] | None = None
    """The precisions applied at the last step."""
    validations_skipped: int = 0
    """Validation passes ``train.eval_on_change`` skipped (the decision was the one last validated)."""
    rank_rows: list[dict[str, Any]] = field(default_factory=list)
    """Per step: its index and every module's applied rank (ranks.csv)."""
    precision_rows: list[dict[str, Any]] = field(default_factory=list)
    """Per step, when several precisions are allowed: every module's applied precision (precisions.csv)."""


def evaluate(session: Session, batches: list[Batch]) -> float:
    """Accuracy of the model as it is now on pre-built evaluation batches."""
    model = session.model
    was_training = model.training
    model.eval()
    correct = total = 0
    with torch.inference_mode(), session.autocast():
        for batch in distributed.local_share(batches):  # each process its share; the counts summed below
            batch = batch.to(session.device)
            logits = model(**batch.inputs).logits
            correct += int((logits.argmax(-1) == batch.labels).sum())
            total += int(batch.labels.numel())
    model.train(was_training)
    correct, total = distributed.summed(correct, total)
    return correct / max(total, 1)


def rss_mb() -> float:
    """Resident memory of this process in MB, from /proc (a read of ~20 µs); NaN where there is no /proc."""
    try:
        with open("/proc/self/statm") as handle:
            return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 1e6
    except (OSError, ValueError):
        return math.nan


def reward_converged(mean_reward: float, reward_lambda: float) -> bool:
    """The paper's convergence threshold: mean reward ≥ min(−λ, −0.5) (paper §V)."""
    return mean_reward >= min(-reward_lambda, -0.5)


@dataclass
class LoopState:
    """Everything the loop carries from step to step besides the model, optimiser and allocator."""

    step: int = 0
    """The next step to run."""
    rows: list[dict[str, Any]] = field(default_factory=list)
    best: Checkpoint | None = None
    evals_without_gain: int = 0
    rewards_since_eval: list[float] = field(default_factory=list)
    nothing_fits_steps: int = 0
    eval_s: float = 0.0
    elapsed_s: float = 0.0
    """Training-loop seconds of earlier processes of this run (resumed runs)."""
    resumed_from_step: int | None = None
    precisions: dict[str, int] | None = None
    """The precisions applied at the last step run (None: the highest allowed)."""
    rank_rows: list[dict[str, Any]] = field(default_factory=list)
    precision_rows: list[dict[str, Any]] = field(default_factory=list)
    validated: tuple[dict[str, int], dict[str, int]] | None = None
    """The delivery decision (ranks, precisions) of the last validated checkpoint candidate
    (``train.eval_on_change``)."""
    validations_skipped: int = 0
    """Validation passes ``train.eval_on_change`` skipped."""
    sent: tuple[dict[str, int], dict[str, int]] | None = None
    """'delivery' regime: the last candidate delivery (held between decisions when ``train.allocate_every`` > 1)."""


def write_step_files(out: Path, rows: list[dict[str, Any]], rank_rows: list[dict[str, Any]],
                     precision_rows: list[dict[str, Any]]) -> None:
    """metrics.csv, ranks.csv (step, then each module's rank) and, with several precisions, precisions.csv."""
    write_csv_atomic(out / "metrics.csv", rows, METRIC_COLUMNS)
    for name, table in (("ranks.csv", rank_rows), ("precisions.csv", precision_rows)):
        if table:
            write_csv_atomic(out / name, table, list(table[0]))


def train(session: Session, out: Path | None = None, resume: dict[str, Any] | None = None,
          tracker: Tracker | None = None) -> TrainResult:
    """Run the fine-tuning loop of ``session`` to the step budget or the paper's early-stop rule.

    With ``out``, the whole state is checkpointed there every ``train.checkpoint_every`` steps; ``resume`` is
    such a checkpoint (``airlora.checkpoint.load_checkpoint``) to continue from. ``tracker`` gets every step's
    metrics, evaluations and the allocator's new metric rows (``airlora.tracking``).
    """
    cfg = session.config
    adapters, allocator = session.adapters, session.allocator
    tuner = FineTuner(session)
    session.model.train()
    loop = LoopState()
    if resume is not None:
        loop = restore_loop(session, tuner, resume)
    tracker = tracker or Tracker()
    logged_rows = len(call(allocator, "metric_rows"))  # rows before a resume's checkpoint were logged then
    paper = cfg.train.regime == "paper"
    several_bits = paper and len(cfg.channel.bits) > 1  # 'delivery' trains at full precision: no precisions.csv
    started = time.perf_counter()
    stopped_early = False
    ranks, precisions = adapters.ranks(), loop.precisions
    sent = loop.sent
    """What a delivery at this step's channel would send: the trained ranks ('paper') or the candidate ('delivery')."""
    bar = tqdm(range(loop.step, cfg.train.steps), desc=f"airlora {cfg.allocator}", disable=not cfg.train.progress,
               dynamic_ncols=True, initial=loop.step, total=cfg.train.steps)
    for step in bar:
        # 1. channel and data of this step
        snr_db = session.snr.snr_db(step)
        budget = session.budget(snr_db)
        batch = session.train_batches.batch(step)
        loop.nothing_fits_steps += budget.nothing_fits()

        # 2. the allocator's decision, projected onto this step's budget. 'paper': the ranks and precisions trained at
        #    this step. 'delivery': a candidate delivery over this step's channel; training ranks stay stable.
        t0 = time.perf_counter()
        decided = step % cfg.train.allocate_every == 0
        if paper:
            proposed = ranks, precisions
            if decided:
                decision = call(allocator, "allocate", context(session, step, ranks, batch, precisions), step=step)
                proposed = checked_decision(decision, budget, allocator, "allocate", step)
            decision_s = time.perf_counter() - t0
            ranks, precisions = budget.project_joint(*proposed)  # never train on, or deliver, what breaks this budget
            tuner.apply(ranks, precisions)
            sent = ranks, precisions
        else:
            ctx = context(session, step, ranks, batch, None)
            decided = decided or sent is None  # a first decision is a decision: it is measured and learned from
            if decided:
                decision = call(allocator, "allocate", ctx, step=step)
                sent = budget.project_joint(*checked_decision(decision, budget, allocator, "allocate", step))
            else:  # the last candidate, held (train.allocate_every > 1), made to fit this step's channel
                sent = budget.project_joint(*sent)
            decision_s = time.perf_counter() - t0
            ranks = training_ranks(session, call(allocator, "training_ranks", ctx, step=step))
            tuner.apply(ranks, sent[1])  # train.quantization_aware: fake-quantised at the candidate's precisions
        apply_s = time.perf_counter() - t0 - decision_s

        # 3. one training step; the allocator sees it before the gradients are dropped
        t1 = time.perf_counter()
        lr = tuner.optimizer.param_groups[0]["lr"]  # the adapters' lr of this step's update
        try:
            task_loss = tuner.step(batch)
        except NonFiniteLoss as err:
            if out is None:
                raise AirloraError(f"{err} at step {step}; the run stopped") from None
            # The weights of this step already give a NaN whatever the lr, so the checkpoint kept for a --resume with
            # a lower lr is the last periodic one (none yet: the resume starts from step 0); the rows up to here stay
            # in metrics.csv to look at.
            write_step_files(out, loop.rows, loop.rank_rows, loop.precision_rows)
            pointer = read_pointer(out)
            since = f"its checkpoint of step {pointer['step']}" if pointer is not None else "step 0 (no checkpoint yet)"
            raise AirloraError(f"{err} at step {step}; the run stopped. Continue it from {since} with a lower lr: "
                               f"airlora run --out {out} --resume --set train.lr=<lower>") from None
        step_s = time.perf_counter() - t1
        eta = budget.eta(*sent)
        reward = -task_loss - cfg.train.reward_lambda * eta
        probe_s = 0.0
        if not paper and decided and allocator.probe_reward:  # the candidate against the full adapter, same examples
            t3 = time.perf_counter()
            reward = -(probe_loss(session, sent) - probe_loss(session, None)) - cfg.train.reward_lambda * eta
            probe_s = time.perf_counter() - t3
        t4 = time.perf_counter()
        outcome = StepOutcome(step, task_loss, reward, eta, sent[0], session.model, sent[1])
        call(allocator, "observe", outcome, step=step)  # it learns
        tuner.zero_grad()
        update_s = time.perf_counter() - t4
        loop.rewards_since_eval.append(reward)

        row = {
            "step": step, "loss": task_loss, "reward": reward, "eta": eta, "snr_db": snr_db,
            "capacity_bps": budget.capacity_bps, "total_rank": sum(sent[0].values()),
            "training_rank": sum(ranks.values()),
            "transmitted_params": budget.params(sent[0]), "transmitted_bits": budget.bits(*sent),
            "airtime_s": budget.airtime_s(*sent),
            "lexical_entropy": batch.lexical_entropy, "oov_rate": batch.oov_rate,
            "budget_ok": budget.feasible(*sent), "val_accuracy": "", "step_s": step_s,
            "decision_s": decision_s, "apply_s": apply_s, "update_s": update_s, "probe_s": probe_s, "rss_mb": rss_mb(),
        }

        # 4. evaluation as it would be delivered (ranks, codecs), best checkpoint, the paper's early-stop rule
        last = step == cfg.train.steps - 1
        if (step + 1) % cfg.train.eval_every == 0 or last:
            t2 = time.perf_counter()
            delivery_snr = delivery_snr_db(session)
            delivered = delivery_decision(session, delivery_snr, step + 1, ranks, loop.rows + [row], precisions)
            # checkpoints before the allocator's first deliverable step are neither delivered nor counted
            candidate = step >= allocator.first_deliverable_step or last
            # train.eval_on_change: a candidate with the decision of the last validated candidate is skipped
            if cfg.train.eval_on_change and candidate and not last and delivered == loop.validated:
                loop.validations_skipped += 1
                loop.eval_s += time.perf_counter() - t2
            else:
                with session.as_delivered(*delivered):
                    val_acc = evaluate(session, session.val_batches)
                loop.eval_s += time.perf_counter() - t2
                row["val_accuracy"] = val_acc
                if candidate:
                    loop.validated = delivered
                if candidate and (loop.best is None or val_acc > loop.best.val_accuracy):
                    loop.best = Checkpoint(step, val_acc, delivery_snr, adapters.state(),
                                           {k: p.detach().clone() for k, p in session.head.items()}, *delivered)
                    loop.evals_without_gain = 0
                elif candidate:
                    loop.evals_without_gain += 1
                converged = reward_converged(float(np.mean(loop.rewards_since_eval)), cfg.train.reward_lambda)
                loop.rewards_since_eval = []
                if converged and loop.evals_without_gain >= cfg.train.patience and not last:
                    stopped_early = True
        loop.rows.append(row)
        loop.rank_rows.append({"step": step} | ranks)
        if several_bits:
            loop.precision_rows.append({"step": step} | precisions)
        loop.step, loop.precisions, loop.sent = step + 1, precisions, sent if not paper else None
        tracker.step(step, row, ranks, precisions, cfg.channel.t_max_s, cfg.adapter.r_max, lr, several_bits)
        if row["val_accuracy"] != "":
            tracker.evaluation(step, {"val_accuracy": row["val_accuracy"], "best_val_accuracy": loop.best.val_accuracy
                                      if loop.best is not None else row["val_accuracy"]})
        metric_rows = call(allocator, "metric_rows", step=step)
        for metric_row in metric_rows[logged_rows:]:
            tracker.episode(step, metric_row)
        logged_rows = len(metric_rows)
        best = loop.best
        bar.set_postfix(loss=f"{task_loss:.3f}", val=f"{best.val_accuracy:.3f}" if best else "-",
                        rank=f"{sum(ranks.values()) / len(ranks):.1f}", air=f"{row['airtime_s']:.2f}s",
                        refresh=False)
        if stopped_early:
            break
        every = cfg.train.checkpoint_every
        if out is not None and every and loop.step % every == 0 and not last:
            tracker.flush()  # first: what the checkpoint covers is on disk before it exists
            save_checkpoint(out, loop.step, snapshot(session, tuner, loop, started))
            write_step_files(out, loop.rows, loop.rank_rows, loop.precision_rows)
    bar.close()
    assert loop.best is not None  # the last step always evaluates
    return TrainResult(loop.rows, loop.best, adapters.ranks(), len(loop.rows), stopped_early, loop.nothing_fits_steps,
                       loop.eval_s, loop.elapsed_s + time.perf_counter() - started, loop.resumed_from_step,
                       loop.precisions, loop.validations_skipped, loop.rank_rows, loop.precision_rows)


def delivery_snr_db(session: Session) -> float:
    """The SNR the adapter is delivered at: ``channel.delivery_snr_db``, else the median of the run's SNR values
    (a typical channel; per-SNR deliveries are in the summary with ``train.deliver_every_snr``)."""
    if session.config.channel.delivery_snr_db is not None:
        return session.config.channel.delivery_snr_db
    values = sorted(session.snr.values)
    return values[(len(values) - 1) // 2]


def delivery_decision(session: Session, snr_db: float, step: int, ranks: dict[str, int], rows: list[dict[str, Any]],
                      precisions: dict[str, int] | None = None, budget: Budget | None = None
                      ) -> tuple[dict[str, int], dict[str, int]]:
    """The allocator's evaluation-mode decision for a delivery at ``snr_db``, projected onto that budget: (ranks,
    precisions).

    Its state: the ranks and precisions now, the mean lexical entropy and OOV rate of the batches trained so far (the
    data the adapter learned from, rather than one batch's), the progress after ``step`` steps. ``budget``: another
    budget over that channel (another T_max or set of precisions) than the run's.
    """
    budget = session.budget(snr_db) if budget is None else budget
    entropy = float(np.mean([r["lexical_entropy"] for r in rows])) if rows else 0.0
    oov = float(np.mean([r["oov_rate"] for r in rows])) if rows else 0.0
    ctx = AllocationContext(step, snr_db, budget, entropy, oov, ranks, session.bandwidth_hz,
                            min(step / session.config.train.steps, 1.0), precisions)
    decision = call(session.allocator, "deliver", ctx, step=step)
    return budget.project_joint(*checked_decision(decision, budget, session.allocator, "deliver", step))


def context(session: Session, step: int, ranks: dict[str, int], batch: Batch | None = None,
            precisions: dict[str, int] | None = None) -> AllocationContext:
    """What the allocator sees before ``step`` (``batch``: that step's training batch, when already built)."""
    snr_db = session.snr.snr_db(step)
    batch = session.train_batches.batch(step) if batch is None else batch
    return AllocationContext(step, snr_db, session.budget(snr_db), batch.lexical_entropy, batch.oov_rate, ranks,
                             session.bandwidth_hz, step / session.config.train.steps, precisions)


def snapshot(session: Session, tuner: FineTuner, loop: LoopState, started: float) -> dict[str, Any]:
    """The run's whole state after ``loop.step`` steps, as tensors and plain values (weights_only-loadable)."""
    best = loop.best
    return {
        "format": CHECKPOINT_FORMAT,
        "step": loop.step,
        "rows": loop.rows,
        "rank_rows": loop.rank_rows,
        "precision_rows": loop.precision_rows,
        "best": None if best is None else {"step": best.step, "val_accuracy": best.val_accuracy,
                                           "snr_db": best.snr_db, "adapter_state": best.adapter_state,
                                           "head_state": best.head_state, "ranks": best.ranks,
                                           "precisions": best.precisions},
        "evals_without_gain": loop.evals_without_gain,
        "rewards_since_eval": loop.rewards_since_eval,
        "nothing_fits_steps": loop.nothing_fits_steps,
        "precisions": loop.precisions,
        "validated": loop.validated,
        "validations_skipped": loop.validations_skipped,
        "sent": loop.sent,
        "eval_s": loop.eval_s,
        "elapsed_s": loop.elapsed_s + time.perf_counter() - started,
        "adapters": session.adapters.state(),
        "head": {k: p.detach().cpu().clone() for k, p in session.head.items()},
        "optimizer": tuner.optimizer.state_dict(),
        "scheduler": tuner.scheduler.state_dict(),
        "allocator": call(session.allocator, "state_dict", step=loop.step),
        "rng": rng_state(),
    }


def restore_loop(session: Session, tuner: FineTuner, state: dict[str, Any]) -> LoopState:
    """Put a snapshot back: adapters, head, optimiser, schedule, allocator, RNGs; return the loop's state."""
    if state.get("format") != CHECKPOINT_FORMAT:
        raise AirloraError(f"checkpoint format {state.get('format')!r} is not {CHECKPOINT_FORMAT!r}")
    session.adapters.load_state(state["adapters"])
    with torch.no_grad():
        for name, p in session.head.items():
            p.copy_(state["head"][name])
    tuner.optimizer.load_state_dict(state["optimizer"])
    tuner.scheduler.load_state_dict(state["scheduler"])
    step = state["step"]
    call(session.allocator, "load_state_dict", state["allocator"], context(session, step, session.adapters.ranks()),
         session.model, step=step)
    set_rng_state(state["rng"])  # last: building the allocator's networks draws from the global RNG
    best = state["best"]
    return LoopState(
        step=step, rows=state["rows"],
        best=None if best is None else Checkpoint(best["step"], best["val_accuracy"], best["snr_db"],
                                                  best["adapter_state"], best["head_state"], best["ranks"],
                                                  best.get("precisions")),
        evals_without_gain=state["evals_without_gain"], rewards_since_eval=state["rewards_since_eval"],
        nothing_fits_steps=state["nothing_fits_steps"], eval_s=state["eval_s"], elapsed_s=state["elapsed_s"],
        resumed_from_step=step, precisions=state.get("precisions"), rank_rows=state.get("rank_rows", []),
        precision_rows=state.get("precision_rows", []),
        validated=None if state.get("validated") is None else tuple(state["validated"]),
        validations_skipped=state.get("validations_skipped", 0),
        sent=None if state.get("sent") is None else tuple(state["sent"]),
    )


def restore(session: Session, checkpoint: Checkpoint) -> None:
    """Put the checkpoint's adapter values, active sets and head back into the model."""
    session.adapters.load_state(checkpoint.adapter_state)
    with torch.no_grad():
        for name, p in session.head.items():
            p.copy_(checkpoint.head_state[name])
