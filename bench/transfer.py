"""Transfer: a policy trained under one channel, used without retraining on channels it never saw.

    python bench/transfer.py [--episodes 1000] [--seeds 3] [--workers 2] [--out docs/results/paper-cpu-v2/transfer.json]

The setting is configs/paper-cpu-v2.yaml's (all-MiniLM-L6-v2 + the tweets, r_max 8, T_max 0.2 s, fp32/fp16/int8/int4
chosen with the ranks, Rayleigh, SNR drawn from −5, 0, 5, 10, 15 dB, the scale-matched bandwidth W). Its loss is the
surrogate the sweep's policies pretrain on (airlora.surrogate: rank gains calibrated once from the model's gradient
spectra, σ = 0.1 noise), so every score is exact: the share of the uniform → optimum reward gap a policy's delivery
decision closes on a condition, averaged over its SNRs (0 = uniform, 1 = optimum, < 0 worse than uniform).

For each seed: the default policy (ppo+ddim-mlp) trained for --episodes on the source channel, then scored without
retraining on every condition; and on each unseen condition, the same policy trained there from scratch for the
same episodes (retrained). The channel heuristic (budget-proportional floor, then cheapest-first: the surrogate has
no gradients to give it) is the rule to beat. Unseen conditions: SNRs outside the training set, the SNRs a user
walking away sees (log-distance path loss), half the bandwidth, and Rician (K = 3) instead of Rayleigh fading.
Another model size is not a transfer the policy can make: its action has one entry per adapted module.
"""

from __future__ import annotations

import argparse
import math
import statistics
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as `python bench/x.py` from a checkout


from airlora.allocators import make_allocator  # noqa: E402
from airlora.bandit import RankBandit, drive, evaluate, share_of_gap  # noqa: E402
from airlora.config import RunConfig, merge  # noqa: E402
from airlora.io import write_json_atomic  # noqa: E402

SOURCE = "source (Rayleigh, −5…15 dB, W)"
WALK = [round(20.0 - 30.0 * math.log10(d / 20.0), 1) for d in (20, 35, 60, 110, 200)]  # 20 dB at 20 m, exponent 3
CONDITIONS = {
    SOURCE: {},
    "SNRs outside the set (−10, −7.5, 17.5, 20 dB)": {"channel.snr_db": [-10.0, -7.5, 17.5, 20.0]},
    f"a user walking away, 20 → 200 m ({', '.join(f'{s:g}' for s in WALK)} dB)": {"channel.snr_db": WALK},
    "half the bandwidth (W/2)": {"channel.bandwidth_hz": "half"},
    "Rician fading (K = 3)": {"channel.fading": "rician", "channel.rician_k": 3.0},
}


def base_config() -> RunConfig:
    """paper-cpu-v2's run settings (its base section) with the default policy."""
    import yaml

    from airlora.config import flatten

    sweep = yaml.safe_load((Path(__file__).resolve().parents[1] / "configs" / "paper-cpu-v2.yaml").read_text())
    over = {k: v for k, v in flatten(sweep["base"]).items() if not k.startswith("policy.pretrain")}
    return merge(RunConfig(), {**over, "allocator": "airllm", "train.progress": False})


def bandits(episodes: int) -> tuple[dict[str, RankBandit], dict]:
    """Each condition's surrogate bandit, all with the gains calibrated once on the source session."""
    from airlora.session import build_session
    from airlora.surrogate import calibrated_gains, gradient_spectra, surrogate_bandit

    config = base_config()
    settings = config.policy.pretrain
    source = build_session(config)
    spectra = gradient_spectra(source, settings.probe_batches)
    keys = list(source.budget(source.snr.values[0]).keys)
    gains = calibrated_gains(spectra, keys, settings.loss_gap)
    out = {}
    for name, over in CONDITIONS.items():
        if over.get("channel.bandwidth_hz") == "half":
            over = {"channel.bandwidth_hz": source.bandwidth_hz / 2}
        session = source if not over else build_session(merge(config, {**over, "data.max_train_examples": 64,
                                                                         "data.val_size": 16, "data.test_size": 16}))
        out[name] = surrogate_bandit(session, gains, settings.noise_std)
    info = {"bandwidth_hz": source.bandwidth_hz, "loss_gap": settings.loss_gap, "noise_std": settings.noise_std,
            "episodes": episodes, "episode_steps": config.policy.episode_steps}
    return out, info


def train_and_score(train_on: str, score_on: list[str], seed: int, all_bandits: dict[str, RankBandit],
                    episodes: int) -> dict:
    """Train the default policy on one condition's bandit; its share of the gap on each condition of ``score_on``."""
    import torch

    torch.set_num_threads(1)
    config = merge(base_config(), {"train.seed": seed})
    allocator = make_allocator(config)
    t0 = time.perf_counter()
    drive(all_bandits[train_on], allocator, episodes, config.policy.episode_steps, seed)
    total = episodes * config.policy.episode_steps
    shares = {}
    for name in score_on:
        bandit = all_bandits[name]
        shares[name] = share_of_gap(bandit, evaluate(bandit, allocator, total, total,
                                                     dict.fromkeys(bandit.keys, bandit.r_max)))
    return {"trained_on": train_on, "seed": seed, "shares": shares, "wall_s": time.perf_counter() - t0}


def heuristic_share(bandit: RankBandit) -> float:
    """The channel heuristic's share of the gap on ``bandit`` (it does not learn: no training)."""
    config = merge(base_config(), {"allocator": "heuristic"})
    return share_of_gap(bandit, evaluate(bandit, make_allocator(config), 0, 1, dict.fromkeys(bandit.keys,
                                                                                               bandit.r_max)))


def _mean_ci(values: list[float]) -> str:
    """'mean ± 95 % half-width' over seeds (a share is nan where the condition's optimum is uniform itself)."""
    from scipy import stats

    if len(values) < 2:
        return f"{values[0]:.2f}"
    half = stats.t.ppf(0.975, len(values) - 1) * statistics.stdev(values) / math.sqrt(len(values))
    return f"{statistics.fmean(values):.2f} ± {half:.2f}"


def table(runs: list[dict], heuristic: dict[str, float]) -> str:
    """Markdown: per condition, the source policy's share, the retrained one's, their paired gap, the heuristic's."""
    lines = ["| condition | source policy, no retraining | retrained there | gap (retrained − source) | heuristic |",
             "|---|---|---|---|---|"]
    source_runs = [r for r in runs if r["trained_on"] == SOURCE]
    for name in CONDITIONS:
        transferred = [r["shares"][name] for r in sorted(source_runs, key=lambda r: r["seed"])]
        retrained = [r["shares"][name] for r in sorted(runs, key=lambda r: r["seed"])
                     if r["trained_on"] == name]
        gap = [a - b for a, b in zip(retrained, transferred, strict=True)] if name != SOURCE else []
        lines.append(f"| {name} | {_mean_ci(transferred)} | {_mean_ci(retrained) if name != SOURCE else '(same)'} | "
                     f"{_mean_ci(gap) if gap else '–'} | {heuristic[name]:.2f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--episodes", type=int, default=1000)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--out", help="write the runs, the table and the settings as JSON here")
    args = parser.parse_args(argv)
    t0 = time.perf_counter()
    all_bandits, info = bandits(args.episodes)
    names = list(CONDITIONS)
    jobs = [(SOURCE, names, seed) for seed in range(args.seeds)]
    jobs += [(name, [name], seed) for name in names[1:] for seed in range(args.seeds)]
    with ProcessPoolExecutor(args.workers) as pool:
        runs = list(pool.map(train_and_score, *zip(*jobs, strict=True), [all_bandits] * len(jobs),
                             [args.episodes] * len(jobs)))
    heuristic = {name: heuristic_share(b) for name, b in all_bandits.items()}
    text = table(runs, heuristic)
    wall = time.perf_counter() - t0
    print(text)
    print(f"\nshare of the uniform → optimum gap closed, mean ± 95 % CI over {args.seeds} seeds; "
          f"{len(runs)} trainings of {args.episodes} episodes in {wall:.0f} s with {args.workers} workers")
    if args.out:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                                cwd=Path(__file__).parent).stdout.strip() or None
        optimum = {name: {str(s): b.optimum(s)[1] for s in b.snr_values} for name, b in all_bandits.items()}
        write_json_atomic(args.out, {"runs": runs, "heuristic": heuristic, "table": text, "wall_s": wall,
                                     "optimum_reward": optimum, "settings": {**vars(args), **info,
                                                                             "commit": commit}})


if __name__ == "__main__":
    main()
