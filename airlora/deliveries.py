"""Delivery at every SNR of a run's schedule from one training run (accuracy against SNR, the paper's Fig. 4)."""

from __future__ import annotations

from typing import Any

from airlora.session import Session
from airlora.trainer import TrainResult, delivery_ranks, evaluate


def per_snr_deliveries(session: Session, result: TrainResult) -> list[dict[str, Any]]:
    """For each distinct SNR of the schedule: the allocator's delivery decision for that channel, projected onto its
    budget, applied to the best checkpoint (restored by the caller), and its size, airtime and test accuracy.

    One test pass per distinct rank vector; the training active sets are put back after each.
    """
    out, accuracy_of = [], {}
    for snr_db in sorted(set(session.snr.values)):
        budget = session.budget(snr_db)
        ranks = delivery_ranks(session, snr_db, result.steps_run, result.final_ranks, result.rows)
        key = tuple(ranks[k] for k in budget.keys)
        if key not in accuracy_of:
            with session.adapters.ranks_for_evaluation(ranks):
                accuracy_of[key] = evaluate(session, session.test_batches)
        out.append({"snr_db": snr_db, "ranks": ranks, "transmitted_params": budget.params(ranks),
                    "transmitted_bits": budget.bits(ranks), "airtime_s": budget.airtime_s(ranks),
                    "budget_ok": budget.feasible(ranks), "test_accuracy": accuracy_of[key]})
    return out
