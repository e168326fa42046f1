"""Wall time and peak memory of the README's default run, as a user runs it (a child process).

    python bench/default_run.py [--allocator uniform] [--steps 300]

Prints wall seconds, seconds per step all-in (model load, data, evaluation included), the child's peak RSS, and
the mean RSS of the first, second and last hundred steps (from metrics.csv) to show memory does not grow once
the first validation pass (after step 99) has allocated its buffers.
"""

from __future__ import annotations

import argparse
import csv
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import common  # noqa: F401  (puts the checkout on sys.path)


def measure(allocator: str = "uniform", steps: int = 300) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "run"
        cmd = [sys.executable, "-m", "airlora.cli", "run", "--allocator", allocator, "--steps", str(steps),
               "--out", str(out), "--quiet"]
        t0 = time.perf_counter()
        subprocess.run(cmd, check=True, capture_output=True)
        wall = time.perf_counter() - t0
        peak_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024  # KiB on Linux
        summary = json.loads((out / "summary.json").read_text())
        with (out / "metrics.csv").open(newline="") as handle:
            rss = [float(row["rss_mb"]) for row in csv.DictReader(handle)]
    window = min(100, len(rss) // 3)
    return {
        "allocator": allocator, "steps": steps, "wall_s": wall, "s_per_step_all_in": wall / steps,
        "peak_rss_mb": peak_mb, "rss_mb_first_100_steps": sum(rss[:window]) / window,
        # the first validation pass (end of step 99) allocates its buffers once; compare from there on
        "rss_mb_second_100_steps": sum(rss[window:2 * window]) / window,
        "rss_mb_last_100_steps": sum(rss[-window:]) / window, "test_accuracy": summary["test_accuracy"],
        "mean_step_s": summary["mean_step_s"], "decision_overhead_ratio": summary["decision_overhead_ratio"],
    }


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--allocator", default="uniform")
    parser.add_argument("--steps", type=int, default=300)
    args = parser.parse_args()
    print(json.dumps(measure(args.allocator, args.steps), indent=2))
