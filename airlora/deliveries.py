"""Delivery at every SNR of a run's schedule from one training run (accuracy against SNR, the paper's Fig. 4)."""

from __future__ import annotations

from typing import Any

from airlora.session import Session
from airlora.trainer import TrainResult, delivery_decision, evaluate


def per_snr_deliveries(session: Session, result: TrainResult) -> list[dict[str, Any]]:
    """For each distinct SNR of the schedule: the allocator's delivery decision for that channel, projected onto its
    budget, applied to the best checkpoint (restored by the caller), and its size, airtime and test accuracy after
    the codecs (as the edge gets it).

    One test pass per distinct (ranks, precisions); the training active sets and values are put back after each.
    """
    out, accuracy_of = [], {}
    for snr_db in sorted(set(session.snr.values)):
        budget = session.budget(snr_db)
        ranks, precisions = delivery_decision(session, snr_db, result.steps_run, result.final_ranks, result.rows,
                                              result.final_precisions)
        key = tuple((ranks[k], precisions[k]) for k in budget.keys)
        if key not in accuracy_of:
            with session.as_delivered(ranks, precisions):
                accuracy_of[key] = evaluate(session, session.test_batches)
        on_air = budget.bits(ranks, precisions)
        out.append({"snr_db": snr_db, "ranks": ranks, "precisions": precisions,
                    "transmitted_params": budget.params(ranks),
                    "transmitted_bits": on_air - 8 * session.overhead_bytes, "on_air_bits": on_air,
                    "airtime_s": budget.airtime_s(ranks, precisions), "budget_ok": budget.feasible(ranks, precisions),
                    "test_accuracy": accuracy_of[key]})
    return out
