"""One run as 2 processes × 1 thread (torchrun, DDP over gloo) against 1 process × 2 threads, on this CPU.

    python bench/distributed.py [--steps 30] [--batch 32] [--out FILE]

Three runs of the default model (MiniLM) and data (tweets), same seed, same global batch, uniform allocator, no
checkpoints or live log, evaluated once at the end:

- ``one_x_two``: ``python -m airlora run`` with train.threads = 2;
- ``two_x_one``: ``torchrun --nproc_per_node 2 -m airlora run`` with train.threads = 1 (each process half the batch);
- ``half_batch``: one process, one thread, half the batch: what one process of ``two_x_one`` computes, without
  talking to the other.

Examples/s = batch / median ``step_s`` of metrics.csv (forward, backward with DDP's all-reduce, optimiser step; the
first 3 steps dropped). The share of a step spent communicating is (step_s of two_x_one − step_s of half_batch) /
step_s of two_x_one: the all-reduces of the gradients and of the loss, and waiting for the slower process. Evaluation:
``eval_s`` of two_x_one (sharded over the 2 processes) against half_batch's (the whole set on one process and thread,
which is what evaluating on rank 0 alone would take). Prints one JSON object.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as `python bench/x.py` from a checkout

from bench.common import ROOT, commit, emit  # noqa: E402


def timed_run(out: Path, threads: int, batch: int, steps: int, processes: int) -> dict:
    """One run; its median step seconds, examples/s, evaluation seconds and wall time."""
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes)] \
        if processes > 1 else [sys.executable]
    sets = {"train.threads": threads, "data.batch_size": batch, "train.steps": steps, "train.eval_every": steps,
            "train.checkpoint_every": 0, "train.report_to": "none", "data.val_subset": 256, "data.test_size": 256,
            "allocator": "uniform"}
    cmd = [*launcher, "-m", "airlora", "run", "--quiet", "--out", str(out)]
    for key, value in sets.items():
        cmd += ["--set", f"{key}={value}"]
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS=str(threads))
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, capture_output=True, env=env, cwd=ROOT)
    wall = time.perf_counter() - t0
    with (out / "metrics.csv").open(newline="") as handle:
        step_s = [float(r["step_s"]) for r in csv.DictReader(handle)][3:]
    summary = json.loads((out / "summary.json").read_text())
    median = statistics.median(step_s)
    return {"processes": processes, "threads": threads, "batch_per_process": batch // processes,
            "median_step_s": median, "examples_per_s": batch / median,
            "eval_s": summary["eval_s"], "train_s": summary["train_s"], "wall_s": wall,
            "world_size": summary["world_size"], "dist_backend": summary["dist_backend"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch", type=int, default=32, help="the global batch (the default run's)")
    parser.add_argument("--out", type=Path, help="also write the JSON here (atomically)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        runs = {
            "one_x_two": timed_run(root / "a", 2, args.batch, args.steps, 1),
            "two_x_one": timed_run(root / "b", 1, args.batch, args.steps, 2),
            "half_batch": timed_run(root / "c", 1, args.batch // 2, args.steps, 1),
        }
    two, half = runs["two_x_one"], runs["half_batch"]
    result = {
        "what": "examples/s of one run as 2 processes x 1 thread (DDP, gloo) vs 1 process x 2 threads, MiniLM + "
                "tweets, uniform allocator",
        "commit": commit(),
        "cpu_count": os.cpu_count(),
        "load_average_at_end": os.getloadavg(),
        "steps": args.steps,
        "global_batch": args.batch,
        "runs": runs,
        "speedup_2x1_over_1x2": two["examples_per_s"] / runs["one_x_two"]["examples_per_s"],
        "communication_share_of_step": (two["median_step_s"] - half["median_step_s"]) / two["median_step_s"],
        "eval_sharded_s": two["eval_s"],
        "eval_one_process_one_thread_s": half["eval_s"],
    }
    emit(result, args.out)


if __name__ == "__main__":
    main()
