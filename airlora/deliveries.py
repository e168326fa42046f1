"""More deliveries of one trained adapter: at every SNR of the run's schedule (accuracy against SNR, the paper's
Fig. 4), and at other latency budgets and precision sets (accuracy against on-air bits: a budget front)."""

from __future__ import annotations

from typing import Any

from airlora.budget import Budget
from airlora.session import Session
from airlora.trainer import TrainResult, delivery_decision, evaluate


def per_snr_deliveries(session: Session, result: TrainResult) -> list[dict[str, Any]]:
    """For each distinct SNR of the schedule: the allocator's delivery decision for that channel, projected onto its
    budget, applied to the best checkpoint (restored by the caller), and its size, airtime and test accuracy after
    the codecs (as the edge gets it).

    One test pass per distinct (ranks, precisions); the training active sets and values are put back after each.
    """
    accuracy_of: dict[tuple, float] = {}
    return [delivered(session, result, snr_db, session.budget(snr_db), accuracy_of)
            for snr_db in sorted(set(session.snr.values))]


def budget_front(session: Session, result: TrainResult) -> list[dict[str, Any]]:
    """At the delivery SNR, for each T_max of ``train.deliver_t_max_s`` and each precision set (the run's allowed
    precisions and, when there are several, the highest alone): the allocator's decision for that budget applied to
    the best checkpoint (restored by the caller), its on-air bits, airtime and test accuracy after the codecs.

    In the ``delivery`` regime training does not depend on the budget, so each point is what a run at that budget
    would deliver from the same adapter (up to which checkpoint validation picks, and for AdaLoRA, whose pruning
    schedule aims at the run's own budget, not at all).
    """
    cfg = session.config
    snr_db = result.best.snr_db
    sets = [cfg.channel.bits] + ([(cfg.channel.bits_per_param,)] if len(cfg.channel.bits) > 1 else [])
    accuracy_of: dict[tuple, float] = {}
    return [{"t_max_s": t_max_s, "bits": list(bits)}
            | delivered(session, result, snr_db, session.budget(snr_db, t_max_s, bits), accuracy_of)
            for t_max_s in cfg.train.deliver_t_max_s for bits in sets]


def delivered(session: Session, result: TrainResult, snr_db: float, budget: Budget,
              accuracy_of: dict[tuple, float]) -> dict[str, Any]:
    """The allocator's decision for ``budget`` over the channel at ``snr_db`` at the end of training, applied to the
    restored checkpoint: its size, airtime and test accuracy after the codecs. ``accuracy_of`` caches one test pass
    per distinct (ranks, precisions) across the caller's deliveries."""
    ranks, precisions = delivery_decision(session, snr_db, result.steps_run, result.final_ranks, result.rows,
                                          result.final_precisions, budget)
    key = tuple((ranks[k], precisions[k]) for k in budget.keys)
    if key not in accuracy_of:
        with session.as_delivered(ranks, precisions):
            accuracy_of[key] = evaluate(session, session.test_batches)
    on_air = budget.bits(ranks, precisions)
    return {"snr_db": snr_db, "ranks": ranks, "precisions": precisions, "transmitted_params": budget.params(ranks),
            "transmitted_bits": on_air - 8 * session.overhead_bytes, "on_air_bits": on_air,
            "airtime_s": budget.airtime_s(ranks, precisions), "budget_ok": budget.feasible(ranks, precisions),
            "test_accuracy": accuracy_of[key]}
