"""A whole `airlora sweep` with this checkout's code against another checkout's: wall times, ratio, same rows.

    python bench/sweep_before_after.py BASELINE_CHECKOUT [--sweep configs/smoke.yaml] [--out FILE]

BASELINE_CHECKOUT is another checkout of airlora (e.g. `git worktree add /tmp/before REV`), run in this environment
with PYTHONPATH pointing at it. The sweep runs four times, each into a fresh folder, in the order baseline, this,
this, baseline (a steady drift of the machine's speed cancels in the ratio of the sums), timed from the command's
start to its end. The rows of every pass are compared with the first's, timings aside.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as `python bench/x.py` from a checkout

from common import commit, emit  # noqa: E402
from sweep_throughput import differences  # noqa: E402


def one_sweep(sweep: Path, out: Path, checkout: Path | None) -> tuple[float, list[dict]]:
    env = None if checkout is None else {**os.environ, "PYTHONPATH": str(checkout)}
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "airlora.cli", "sweep", str(sweep), "--out", str(out), "--quiet"],
                   check=True, capture_output=True, env=env, cwd=out.parent)
    wall = time.perf_counter() - t0
    return wall, [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("baseline", type=Path, help="another checkout of airlora")
    parser.add_argument("--sweep", type=Path, default=ROOT / "configs" / "smoke.yaml")
    parser.add_argument("--out", type=Path, help="also write the JSON here (atomically)")
    args = parser.parse_args()
    baseline, sweep = args.baseline.resolve(), args.sweep.resolve()
    passes = []
    with tempfile.TemporaryDirectory() as tmp:
        for i, code in enumerate(("baseline", "this", "this", "baseline")):
            wall, rows = one_sweep(sweep, Path(tmp) / f"{i}-{code}", baseline if code == "baseline" else None)
            passes.append({"code": code, "wall_s": wall, "rows": rows})
            print(f"pass {i + 1}/4 ({code}): {wall:.1f} s", file=sys.stderr, flush=True)
    wall = {code: sum(p["wall_s"] for p in passes if p["code"] == code) for code in ("baseline", "this")}
    diffs = sorted({d for p in passes[1:] for d in differences(passes[0]["rows"], p["rows"])})
    result = {"commit": commit(ROOT), "baseline": str(baseline), "baseline_commit": commit(baseline),
              "sweep": str(sweep), "runs": len(passes[0]["rows"]),
              "wall_s": [{"code": p["code"], "wall_s": p["wall_s"]} for p in passes],
              "ratio_wall_this_over_baseline": wall["this"] / wall["baseline"],
              "identical_rows": not diffs, "differences": diffs}
    emit(result, args.out)


if __name__ == "__main__":
    main()
