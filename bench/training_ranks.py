"""What changing ranks while training costs: fixed, held-out and redrawn training ranks, with no budget.

    python bench/training_ranks.py [--steps 100] [--seeds 0 1 2] [--workers 2] [--out FILE]

Each run is MiniLM + the tweets (4,000 training tweets, 500 validation, 1,000 test), fp32, a budget that never binds
(T_max 100 s), in the ``paper`` regime so that the schedule's ranks are the ranks trained at every step. The
schedules are allocators registered in process:

- ``fixed4``: rank 4 everywhere, every step;
- ``held0``: 10 modules (a seeded draw) held at 0 for the whole run, the rest at 4;
- ``jitter2``: each module 4 ± 2 (uniform on 2..6), drawn again every step;
- ``redraw_keep``: each module uniform on 0..r_max, drawn independently every step, optimiser momentum kept;
- ``redraw_clear``: the same with the momentum of cut triplets cleared (the trainer's rule).

Every run delivers all its trained triplets in fp32 (untrained triplets have λ = 0 and add nothing), so the accuracy
measures the training alone. Accuracy is that delivery's on validation and test pooled (1,500 tweets). Rows are
appended to ``--out`` as they finish; a second call skips the rows already there.
"""

from __future__ import annotations

import argparse
import json
import sys
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as `python bench/x.py` from a checkout

SCHEDULES = ("fixed4", "held0", "jitter2", "redraw_keep", "redraw_clear")


def schedule_allocator(schedule: str):
    """An Allocator class whose ``allocate`` is the schedule and whose delivery is every trained triplet."""
    import numpy as np

    from airlora.allocators import Allocator

    class Schedule(Allocator):
        name = schedule

        def __init__(self, config, seed):
            super().__init__(config, seed)
            self.rng = np.random.default_rng([seed, 0x5C4ED])
            self.held: set[str] | None = None

        def allocate(self, ctx):
            keys, r_max = ctx.budget.keys, ctx.budget.r_max
            if schedule == "held0":
                if self.held is None:
                    self.held = set(self.rng.choice(keys, size=10, replace=False).tolist())
                return {k: 0 if k in self.held else 4 for k in keys}
            if schedule == "jitter2":
                return dict(zip(keys, self.rng.integers(2, 7, len(keys)).tolist(), strict=True))
            if schedule.startswith("redraw"):
                return dict(zip(keys, self.rng.integers(0, r_max + 1, len(keys)).tolist(), strict=True))
            return dict.fromkeys(keys, 4)

        def deliver(self, ctx):
            return dict.fromkeys(ctx.budget.keys, ctx.budget.r_max)

    return Schedule


def measure(schedule: str, seed: int, steps: int) -> dict:
    import torch

    torch.set_num_threads(1)
    from airlora import finetuner
    from airlora.allocators import register
    from airlora.config import RunConfig, merge
    from airlora.session import build_session
    from airlora.trainer import evaluate, restore, train

    if schedule == "redraw_keep":  # the one change: cut triplets keep their momentum
        finetuner.forget_momentum = lambda optimizer, cuts: None
    register(f"bench-{schedule}", schedule_allocator(schedule), replace=True)
    config = merge(RunConfig(), {
        "allocator": f"bench-{schedule}", "data.max_train_examples": 4000, "data.val_size": 500,
        "data.test_size": 1000, "train.steps": steps, "train.eval_every": steps, "train.seed": seed,
        "train.regime": "paper", "train.threads": 1, "train.progress": False, "train.report_to": "none",
        "channel.t_max_s": 100.0,
    })
    session = build_session(config)
    result = train(session)
    restore(session, result.best)
    with session.as_delivered(result.best.ranks, result.best.precisions):
        val, test = evaluate(session, session.val_batches), evaluate(session, session.test_batches)
    n_val, n_test = len(session.splits.validation), len(session.splits.test)
    rows = result.rank_rows
    keys = [k for k in rows[0] if k != "step"]
    changes = sum(rows[i][k] != rows[i - 1][k] for i in range(1, len(rows)) for k in keys) / len(keys)
    return {"schedule": schedule, "seed": seed, "steps": steps, "val_accuracy": val, "test_accuracy": test,
            "accuracy": (val * n_val + test * n_test) / (n_val + n_test),
            "rank_changes_per_module_per_15_steps": 15 * changes / max(len(rows) - 1, 1),
            "mean_training_rank": sum(r[k] for r in rows for k in keys) / (len(rows) * len(keys))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--schedules", nargs="+", default=list(SCHEDULES), choices=SCHEDULES)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("docs/results/regimes/training_ranks.jsonl"))
    args = parser.parse_args()
    from common import commit

    done = set()
    if args.out.exists():
        done = {(r["schedule"], r["seed"]) for r in map(json.loads, args.out.read_text().splitlines()) if r}
    todo = [(s, seed) for seed in args.seeds for s in args.schedules if (s, seed) not in done]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    code = commit()
    with ProcessPoolExecutor(args.workers, mp_context=get_context("spawn")) as pool:
        futures = [pool.submit(measure, s, seed, args.steps) for s, seed in todo]
        for future in futures:
            row = future.result() | {"commit": code}
            with args.out.open("a") as handle:  # one line per finished run: a stopped bench loses nothing
                handle.write(json.dumps(row) + "\n")
            print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
