"""Does the policy learn? Every policy variant on the rank bandit with a known optimum (airlora.bandit).

    python bench/policy_bandit.py [--episodes 1000] [--seeds 3] [--sigmas 0,0.1] [--workers 2] [--out FILE]

The bandit is DESIGN.md's: all-MiniLM-L6-v2's 36 module shapes, r_max 8, the default run's real budget (32 bits,
T_max 1 s, scale-matched 4.69 MHz, Rayleigh, the task head reserved), SNR drawn from −5, 0, 5, 10, 15 dB each step,
U = 0.3 + Σ_m w_m·exp(−r_m/2) + σ·ε with uneven w (0.5·LogNormal(0, 1) draws normalised, seed 0; fixed before any
policy setting was tuned), R = −U − 0.1·η. Each variant is trained through the allocator's own allocate/observe
calls; every 25 episodes its deterministic delivery decision is scored noise-free at each SNR. Printed: the share
of the uniform → optimum reward gap closed (0 = uniform, 1 = optimum, < 0 worse than uniform) after 100 / 300 /
1,000 episodes, mean ± std over seeds, the episodes each needs to reach 0.5, and the same share for random ranks,
the channel heuristic (the bandit has no gradients, so it gets no sensitivities: its budget-proportional floor,
then cheapest-first) and, as a reference, a greedy fill by the true marginal gains per bit.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import statistics
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as `python bench/x.py` from a checkout

import numpy as np  # noqa: E402

from airlora.allocators import make_allocator  # noqa: E402
from airlora.bandit import drive, evaluate, paper_bandit, share_of_gap  # noqa: E402
from airlora.config import RunConfig, merge  # noqa: E402
from airlora.io import write_json_atomic  # noqa: E402

VARIANTS = ["ppo+ddim-mlp", "ppo", "ddim", "ppo+ddpm", "ppo+ddim-unet"]
EVERY = 25


def config_for(variant: str, seed: int, extra: dict | None = None) -> RunConfig:
    allocator = variant if variant in ("random", "heuristic", "uniform") else "airllm"
    over = {"allocator": allocator, "train.seed": seed, "train.progress": False, **(extra or {})}
    if allocator == "airllm":
        over["policy.variant"] = variant
    return merge(RunConfig(), over)


def train_one(variant: str, sigma: float, seed: int, episodes: int, extra: dict | None = None) -> dict:
    """One variant, one σ, one seed: shares at every EVERY episodes and the wall time."""
    import torch

    torch.set_num_threads(1)
    config = config_for(variant, seed, extra)
    bandit = paper_bandit(config, sigma)
    allocator = make_allocator(config)
    t0 = time.perf_counter()
    checkpoints = tuple(range(EVERY, episodes + 1, EVERY))
    result = drive(bandit, allocator, episodes, config.policy.episode_steps, seed, checkpoints)
    shares = {e: share_of_gap(bandit, per_snr) for e, per_snr in result.evaluations.items()}
    return {"variant": variant, "sigma": sigma, "seed": seed, "shares": shares, "wall_s": time.perf_counter() - t0,
            "decision_ms": 1e3 * float(np.median(getattr(allocator, "decision_s", [math.nan]) or [math.nan]))}


def reference_shares(sigma: float) -> dict[str, float]:
    """Random (mean over 200 draws), the channel heuristic and the oracle greedy fill."""
    from airlora.allocators.heuristic import greedy_fill

    config = config_for("heuristic", 0)
    bandit = paper_bandit(config, sigma)
    ranks = dict.fromkeys(bandit.keys, bandit.r_max)
    heuristic = evaluate(bandit, make_allocator(config), 0, 1, ranks)
    rng = np.random.default_rng(0)
    random_per_snr = {}
    for snr in bandit.snr_values:
        draws = [dict(zip(bandit.keys, map(int, rng.integers(0, bandit.r_max + 1, len(bandit.keys))), strict=True))
                 for _ in range(200)]
        random_per_snr[snr] = float(np.mean([bandit.expected_reward(snr, *bandit.execute(snr, d)) for d in draws]))
    oracle = {}
    for snr in bandit.snr_values:
        budget = bandit.budgets[snr]
        marginal = np.diff(bandit.gains, axis=1)  # (M, R) true gain of each next triplet
        values = {k: marginal[m] for m, k in enumerate(bandit.keys)}
        fill = greedy_fill(budget, dict.fromkeys(bandit.keys, 0), values)
        oracle[snr] = bandit.expected_reward(snr, fill)
    return {"random": share_of_gap(bandit, random_per_snr), "heuristic": share_of_gap(bandit, heuristic),
            "oracle greedy (true gains)": share_of_gap(bandit, oracle)}


def episodes_to(shares: dict[int, float], level: float = 0.5) -> int | None:
    """The first checkpoint (episodes) at which the share reaches ``level``, or None."""
    return next((e for e in sorted(shares) if shares[e] >= level), None)


def summarise(runs: list[dict], references: dict[float, dict[str, float]], episodes: int) -> str:
    marks = [e for e in (100, 300, 1000) if e <= episodes]
    lines = ["| variant | σ | " + " | ".join(f"share @ {e}" for e in marks) + " | episodes to 0.5 | s per run |",
             "|---|---|" + "---|" * len(marks) + "---|---|"]
    for sigma in sorted({r["sigma"] for r in runs}):
        for variant in dict.fromkeys(r["variant"] for r in runs):
            rows = [r for r in runs if r["variant"] == variant and r["sigma"] == sigma]
            if not rows:
                continue
            cells = []
            for e in marks:
                values = [r["shares"][e] for r in rows]
                spread = statistics.stdev(values) if len(values) > 1 else 0.0
                cells.append(f"{statistics.fmean(values):.2f} ± {spread:.2f}")
            reach = [episodes_to(r["shares"]) for r in rows]
            reached = [x for x in reach if x is not None]
            reach_text = (f"{statistics.fmean(reached):.0f}" if len(reached) == len(reach) else
                          f"{len(reached)} of {len(reach)} seeds" + (f" (mean {statistics.fmean(reached):.0f})"
                                                                     if reached else ""))
            wall = statistics.fmean(r["wall_s"] for r in rows)
            lines.append(f"| {variant} | {sigma:g} | " + " | ".join(cells) + f" | {reach_text} | {wall:.0f} |")
        for name, share in references[sigma].items():
            lines.append(f"| {name} | {sigma:g} | " + " | ".join(f"{share:.2f}" for _ in marks) + " | — | — |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--episodes", type=int, default=1000)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--sigmas", default="0,0.1")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--set", dest="sets", action="append", default=[], metavar="PATH=VALUE",
                        help="config override for every airllm run, e.g. --set policy.critic=mlp")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--out", help="also write every run's shares as JSON here")
    args = parser.parse_args(argv)
    import yaml

    extra = {k: yaml.safe_load(v) for k, v in (s.split("=", 1) for s in args.sets)}
    sigmas = [float(s) for s in args.sigmas.split(",")]
    jobs = [(v, s, seed, args.episodes, extra) for s in sigmas for v in args.variants.split(",")
            for seed in range(1, args.seeds + 1)]
    t0 = time.perf_counter()
    with ProcessPoolExecutor(args.workers) as pool:
        runs = list(pool.map(train_one, *zip(*jobs, strict=True)))
    references = {s: reference_shares(s) for s in sigmas}
    table = summarise(runs, references, args.episodes)
    print(table)
    print(f"\n{len(runs)} runs in {time.perf_counter() - t0:.0f} s with {args.workers} workers")
    if args.out:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                                cwd=Path(__file__).parent).stdout.strip() or None
        policy = dataclasses.asdict(config_for(VARIANTS[0], 0, extra).policy)  # the default variant's, resolved
        settings = {**vars(args), "commit": commit, "policy": policy}
        write_json_atomic(args.out, {"runs": runs, "references": references, "table": table, "settings": settings})


if __name__ == "__main__":
    main()
