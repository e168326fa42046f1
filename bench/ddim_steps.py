"""Decision time per DDIM inference step count (the paper's Table VI, per decision), in one process.

    python bench/ddim_steps.py [--calls 200]
"""

from __future__ import annotations

import argparse
import json

import common  # noqa: F401  (puts the checkout on sys.path)

from airlora.policy.bench import time_decision


def measure(calls: int = 200) -> dict[str, float]:
    """Median milliseconds of one decision (PPO + guided DDIM + decode, one thread) at 10, 30, 50, 100 steps."""
    return {str(steps): round(time_decision(steps=steps, calls=calls)["median_ms"], 3) for steps in (10, 30, 50, 100)}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=200)
    result = measure(parser.parse_args().calls)
    print(json.dumps({"ddim_steps_time_ms": result, "ratio_100_to_10": result["100"] / result["10"]}, indent=2))
