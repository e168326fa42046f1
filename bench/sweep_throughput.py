"""Runs per hour of a sweep: every run built from scratch in its worker (the executor before warm workers) against
warm workers that keep the loaded model, the read data and the tokenised splits between runs.

    python bench/sweep_throughput.py [--steps 60] [--seeds 0 1] [--allocators uniform random heuristic airllm]
        [--order ABBA] [--threads-compare] [--out FILE]

The grid is each allocator × each seed at --steps steps of the default run (MiniLM + tweets, 1,000 validation and
2,000 test tweets): 8 runs × 60 steps by default, two workers of one thread on 2 cores. Both executors run it from
this process, one after the other, each into a fresh folder, in the order --order gives (ABBA: cold, warm, warm, cold,
so a steady drift of the machine's speed cancels). Printed: the runs per hour of each, their ratio, whether their rows
are identical (every number but the timings), and where a run's seconds go (start-up, training loop, the rest).
--threads-compare also runs the grid with warm workers as one run at a time on 2 threads, against two runs on one,
and lists the row values that differ at two threads (the last float bits of a loss depend on the thread count).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as `python bench/x.py` from a checkout

from common import commit, emit, import_seconds  # noqa: E402

from airlora.sweep.execute import execute  # noqa: E402
from airlora.sweep.grid import load_sweep  # noqa: E402

TIMING_KEYS = {"wall_s", "mean_step_s", "mean_decision_s", "decision_overhead_ratio", "mean_apply_s"}
"""Row values that are seconds: they differ from run to run; every other value must not."""


def sweep_file(folder: Path, steps: int, seeds: list[int], allocators: list[str]) -> Path:
    path = folder / "grid.json"
    path.write_text(json.dumps({"name": "throughput", "base": {"train": {"steps": steps}}, "seeds": seeds,
                                "experiments": {"mix": {"allocator": allocators}}}))
    return path


def one_pass(path: Path, out: Path, worker_cache: bool, workers: int) -> dict:
    """One executor over the whole grid: wall seconds, runs per hour, the rows, and per-run seconds from summaries."""
    t0 = time.perf_counter()
    rows = execute(load_sweep(path), out, workers=workers, progress=False, worker_cache=worker_cache)
    wall = time.perf_counter() - t0
    failed = [r["run_id"] for r in rows if r["status"] != "ok"]
    if failed:
        raise SystemExit(f"runs failed in {out}: {failed}")
    summaries = [json.loads((out / "runs" / r["run_id"] / "summary.json").read_text()) for r in rows]
    return {"worker_cache": worker_cache, "workers": workers, "wall_s": wall, "runs": len(rows),
            "runs_per_hour": len(rows) / wall * 3600, "rows": rows,
            "mean_setup_s": statistics.fmean(s["setup_s"] for s in summaries),
            "mean_train_loop_s": statistics.fmean(s["train_s"] for s in summaries),
            "mean_run_s": statistics.fmean(s["wall_s"] for s in summaries)}


def comparable(rows: list[dict]) -> dict[str, dict]:
    return {r["run_id"]: {k: v for k, v in r.items() if k not in TIMING_KEYS} for r in rows}


def differences(a: list[dict], b: list[dict]) -> list[str]:
    """'run_id: key' for every non-timing value that differs between two passes' rows."""
    ca, cb = comparable(a), comparable(b)
    if ca.keys() != cb.keys():
        return [f"run ids differ: {sorted(ca.keys() ^ cb.keys())}"]
    return [f"{rid}: {k}" for rid in ca for k in sorted(set(ca[rid]) | set(cb[rid]))
            if ca[rid].get(k) != cb[rid].get(k)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--allocators", nargs="+", default=["uniform", "random", "heuristic", "airllm"])
    parser.add_argument("--order", default="ABBA", help="A: cold (every run from scratch), B: warm workers")
    parser.add_argument("--threads-compare", action="store_true", help="also warm workers, one run × 2 threads")
    parser.add_argument("--out", type=Path, help="also write the JSON here (atomically)")
    args = parser.parse_args()
    if set(args.order) - {"A", "B"} or not {"A", "B"} <= set(args.order):
        raise SystemExit("--order: a string of A (cold) and B (warm) holding both, e.g. ABBA")
    passes: dict[str, list[dict]] = {"A": [], "B": []}
    with tempfile.TemporaryDirectory() as tmp:
        path = sweep_file(Path(tmp), args.steps, args.seeds, args.allocators)
        for i, which in enumerate(args.order):
            passes[which].append(one_pass(path, Path(tmp) / f"{i}-{which}", worker_cache=which == "B", workers=2))
            print(f"pass {i + 1}/{len(args.order)} ({'warm' if which == 'B' else 'cold'}): "
                  f"{passes[which][-1]['wall_s']:.1f} s", file=sys.stderr, flush=True)
        threads = one_pass(path, Path(tmp) / "threads", worker_cache=True, workers=1) if args.threads_compare else None
    cold_wall = sum(p["wall_s"] for p in passes["A"])
    warm_wall = sum(p["wall_s"] for p in passes["B"])
    runs = passes["A"][0]["runs"]
    reference = passes["A"][0]["rows"]
    diffs = sorted({d for p in passes["A"][1:] + passes["B"] for d in differences(reference, p["rows"])})
    result = {
        "commit": commit(),
        "grid": {"steps": args.steps, "seeds": args.seeds, "allocators": args.allocators, "runs": runs,
                 "workers": 2, "threads_per_run": 1, "order": args.order},
        "runs_per_hour_cold": runs * len(passes["A"]) / cold_wall * 3600,
        "runs_per_hour_warm": runs * len(passes["B"]) / warm_wall * 3600,
        "ratio_warm_over_cold": (runs * len(passes["B"]) / warm_wall) / (runs * len(passes["A"]) / cold_wall),
        "identical_rows": not diffs,
        "differences": diffs,
        "import_s": import_seconds(),
        "passes": [{k: v for k, v in p.items() if k != "rows"} for which in "AB" for p in passes[which]],
    }
    if threads:
        result["one_run_two_threads"] = {k: v for k, v in threads.items() if k != "rows"}
        result["ratio_two_runs_one_thread_over_one_run_two_threads"] = (
            result["runs_per_hour_warm"] / threads["runs_per_hour"])
        # not expected to be empty: matmul reductions split over two threads round differently in the last bit
        result["differences_at_two_threads"] = differences(reference, threads["rows"])
    emit(result, args.out)


if __name__ == "__main__":
    main()
