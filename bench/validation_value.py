"""What validation buys and what it costs: the best checkpoint against the last step's delivery.

    python bench/validation_value.py [--steps 300] [--seeds 0 1 2] [--allocators uniform random heuristic adalora
        airllm] [--workers 2] [--out FILE]

Each run is the README's default run (MiniLM + tweets, validation of 1,000 tweets every 100 steps) with an
allocator and a seed, on one thread, ``--workers`` at a time. A run delivers the checkpoint with the best validation
accuracy; without intermediate validation it would deliver the last step. So besides the delivered checkpoint's test
accuracy this measures the test accuracy of the last step's delivery (ranks and precisions as the run decided them
there), and the delivery decision at each validation (what ``train.eval_on_change`` compares).

Prints one JSON object: per run the validation seconds against the run's, the best step, both test accuracies and
the decisions; over the runs how often the best is not the last step and the paired test-accuracy difference
best − last (mean ± 95 % CI).
"""

from __future__ import annotations

import argparse
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as `python bench/x.py` from a checkout


def measure_run(allocator: str, seed: int, steps: int) -> dict:
    """One run, recording every delivery decision the loop validated; both test accuracies at the end."""
    from airlora import trainer
    from airlora.config import RunConfig, merge
    from airlora.session import build_session

    decisions: dict[int, tuple[dict[str, int], dict[str, int]]] = {}
    decide = trainer.delivery_decision

    def recording(session, snr_db, step, *args, **kwargs):
        decisions[step] = decide(session, snr_db, step, *args, **kwargs)
        return decisions[step]

    trainer.delivery_decision = recording  # this process runs only this bench's runs
    config = merge(RunConfig(), {"allocator": allocator, "train.seed": seed, "train.steps": steps,
                                 "train.threads": 1, "train.progress": False, "train.report_to": "none"})
    t0 = time.perf_counter()
    session = build_session(config)
    setup_s = time.perf_counter() - t0
    result = trainer.train(session)
    last_step = max(decisions)
    t1 = time.perf_counter()
    with session.as_delivered(*decisions[last_step]):  # the model holds the last step's weights
        test_last = trainer.evaluate(session, session.test_batches)
    test_s = time.perf_counter() - t1
    trainer.restore(session, result.best)
    with session.as_delivered(result.best.ranks, result.best.precisions):
        test_best = trainer.evaluate(session, session.test_batches)
    validations = [(r["step"] + 1, r["val_accuracy"]) for r in result.rows if r["val_accuracy"] != ""]
    first = session.allocator.first_deliverable_step  # earlier checkpoints are no candidates
    ordered = [decisions[s] for s, _ in validations]
    return {
        "allocator": allocator, "seed": seed, "steps": steps, "setup_s": setup_s, "train_s": result.train_s,
        "validation_s": result.eval_s, "test_pass_s": test_s,
        "run_s": setup_s + result.train_s + test_s,  # what `airlora run` spends, less imports and file writes
        "validations": [{"after_step": s, "val_accuracy": acc} for s, acc in validations],
        "best_after_step": result.best.step + 1, "last_step": last_step,
        "test_accuracy_best": test_best, "test_accuracy_last": test_last,
        "decision_changes": sum(a != b for a, b in zip(ordered, ordered[1:], strict=False)),
        "skipped_on_change": skipped_on_change(ordered, [s - 1 >= first for s, _ in validations]),
    }


def skipped_on_change(decisions: list, candidates: list[bool]) -> int:
    """How many of these validations ``train.eval_on_change`` would skip: a checkpoint candidate's decision equal to
    the last validated candidate's, except at the last step, which is always validated."""
    skipped, validated = 0, None
    for i, (decision, candidate) in enumerate(zip(decisions, candidates, strict=True)):
        if not candidate:
            continue
        if decision == validated and i < len(decisions) - 1:
            skipped += 1
        else:
            validated = decision
    return skipped


def summarise(runs: list[dict]) -> dict:
    from airlora.sweep.stats import mean_ci

    diff = [r["test_accuracy_best"] - r["test_accuracy_last"] for r in runs]
    ci = mean_ci(diff)
    share = [r["validation_s"] / r["run_s"] for r in runs]
    return {
        "runs": len(runs),
        "best_is_not_last": sum(r["best_after_step"] != r["last_step"] for r in runs),
        "test_best_minus_last": {"mean": ci.mean, "ci95_half_width": ci.half_width, "min": min(diff),
                                 "max": max(diff)},
        "validation_share_of_run": {"mean": sum(share) / len(share), "min": min(share), "max": max(share)},
        "validations_eval_on_change_would_skip": sum(r["skipped_on_change"] for r in runs),
        "validations": sum(len(r["validations"]) for r in runs),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--allocators", nargs="+", default=["uniform", "random", "heuristic", "adalora", "airllm"])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--out", type=Path, help="also write the JSON here (atomically)")
    args = parser.parse_args()
    jobs = [(a, s, args.steps) for s in args.seeds for a in args.allocators]
    with ProcessPoolExecutor(args.workers, mp_context=get_context("spawn"), max_tasks_per_child=1) as pool:
        runs = list(pool.map(measure_run, *zip(*jobs, strict=True)))
    from common import commit, emit

    result = {"commit": commit(), "settings": vars(args) | {"out": str(args.out)}, "summary": summarise(runs),
              "runs": runs}
    emit(result, args.out)



if __name__ == "__main__":
    main()
