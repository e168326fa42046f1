"""Wall time and peak memory of the README's default run, as a user runs it (a child process).

    python bench/default_run.py [--allocator uniform] [--steps 300] [--baseline CHECKOUT]

Prints wall seconds, seconds per step all-in (model load, data, evaluation included), where they went (imports,
start-up: model load, data and tokenising, the training loop, the rest: the test pass and files), the child's peak
RSS, and the mean RSS of the first, second and last hundred steps (from metrics.csv) to show memory does not grow
once the first validation pass (after step 99) has allocated its buffers.

--baseline CHECKOUT: also run the same command from another checkout of airlora (e.g. a `git worktree` of an older
commit) in the same environment, in the order baseline, this, this, baseline, and print this / baseline wall time.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import common  # noqa: F401  (puts the checkout on sys.path)


def measure(allocator: str = "uniform", steps: int = 300, checkout: Path | None = None) -> dict[str, float]:
    """The default run in a child process, with this checkout's code or ``checkout``'s."""
    env = None if checkout is None else {**os.environ, "PYTHONPATH": str(checkout)}
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "run"
        cmd = [sys.executable, "-m", "airlora.cli", "run", "--allocator", allocator, "--steps", str(steps),
               "--out", str(out), "--quiet"]
        t0 = time.perf_counter()
        child = subprocess.Popen(cmd, env=env, cwd=tmp, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        stderr = child.stderr.read()
        _, status, usage = os.wait4(child.pid, 0)  # this child's own peak, not the largest of every child so far
        wall = time.perf_counter() - t0
        child.returncode = os.waitstatus_to_exitcode(status)
        if child.returncode != 0:
            raise SystemExit(f"{' '.join(cmd)} failed:\n{stderr.decode(errors='replace')[-3000:]}")
        peak_mb = usage.ru_maxrss / 1024  # KiB on Linux
        summary = json.loads((out / "summary.json").read_text())
        with (out / "metrics.csv").open(newline="") as handle:
            rss = [float(row["rss_mb"]) for row in csv.DictReader(handle)]
    window = max(1, min(100, len(rss) // 3))
    return {
        "allocator": allocator, "steps": steps, "wall_s": wall, "s_per_step_all_in": wall / steps,
        "peak_rss_mb": peak_mb, "rss_mb_first_100_steps": sum(rss[:window]) / window,
        # the first validation pass (end of step 99) allocates its buffers once; compare from there on
        "rss_mb_second_100_steps": sum(rss[window:2 * window]) / window,
        "rss_mb_last_100_steps": sum(rss[-window:]) / window, "test_accuracy": summary["test_accuracy"],
        "mean_step_s": summary["mean_step_s"], "decision_overhead_ratio": summary["decision_overhead_ratio"],
        "import_s": common.import_seconds(env), "setup_s": summary.get("setup_s"), "train_loop_s": summary["train_s"],
        "run_s": summary["wall_s"],
    }


def against(baseline: Path, allocator: str, steps: int) -> dict:
    """Baseline, this, this, baseline: a steady drift of the machine's speed cancels in the ratio of the sums."""
    runs = [("baseline", measure(allocator, steps, baseline)), ("this", measure(allocator, steps)),
            ("this", measure(allocator, steps)), ("baseline", measure(allocator, steps, baseline))]
    wall = {name: sum(r["wall_s"] for n, r in runs if n == name) for name in ("baseline", "this")}
    return {"commit": common.commit(), "baseline": str(baseline), "baseline_commit": common.commit(baseline),
            "ratio_wall_this_over_baseline": wall["this"] / wall["baseline"],
            "runs": [{"code": name, **r} for name, r in runs]}



if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--allocator", default="uniform")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--baseline", type=Path, help="another checkout of airlora to compare with")
    args = parser.parse_args()
    if args.baseline:
        print(json.dumps(against(args.baseline.resolve(), args.allocator, args.steps), indent=2))
    else:
        print(json.dumps(measure(args.allocator, args.steps), indent=2))
