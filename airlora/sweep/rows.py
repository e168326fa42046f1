"""One result row per run: what was varied, the run's summary numbers and its reward curve."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import numpy as np

from airlora.sweep.grid import PlannedRun

SUMMARY_KEYS = (
    "test_accuracy", "val_accuracy", "transmitted_params", "transmitted_bits", "airtime_s", "eta", "budget_ok",
    "steps_over_budget", "steps", "mean_reward", "mean_step_s", "mean_decision_s", "decision_overhead_ratio",
    "mean_apply_s", "wall_s", "ranks", "snr_db", "model", "dataset",
)
NEW_SUMMARY_KEYS = ("precisions", "on_air_bits", "delivery_overhead_bytes", "capacity_bps", "t_max_s", "head_bits",
                    "deliveries", "pretrain", "budget_front")
"""Summary keys of runs since the codecs (None in the rows of older runs, and where a run has none: deliveries with
train.deliver_every_snr, pretrain with policy.pretrain.before_run)."""


PAPER_SUFFIX = " [paper]"
"""Appended to a method trained in the ``paper`` regime (``train.regime``), so the two regimes never pool."""


def method_of(allocator: str, variant: str, regime: str = "delivery") -> str:
    """The name a table shows: the allocator, or for airllm the policy variant (paper Table III); marked when the
    run trained in the paper's per-step regime."""
    return (allocator if allocator != "airllm" else variant) + (PAPER_SUFFIX if regime == "paper" else "")


def settings_of(run: PlannedRun) -> dict[str, Any]:
    """The settings the report groups by, read from the run's full config."""
    cfg = run.config
    diffusion = cfg.policy.effective_diffusion()
    return {
        "method": method_of(cfg.allocator, cfg.policy.variant, cfg.train.regime),
        "regime": cfg.train.regime,
        "allocator": cfg.allocator,
        "variant": cfg.policy.variant if cfg.allocator == "airllm" else None,
        "seed": cfg.train.seed,
        "r_max": cfg.adapter.r_max,
        "reward_lambda": cfg.train.reward_lambda,
        "bits_per_param": cfg.channel.bits_per_param,
        "bits": ",".join(map(str, cfg.channel.bits)),
        "t_max_s": cfg.channel.t_max_s,
        "snr_setting": ("trace" if cfg.channel.snr_schedule == "trace"
                        else ",".join(f"{s:g}" for s in cfg.channel.snr_db)),
        "prediction_type": diffusion.prediction_type,
        "beta_schedule": diffusion.beta_schedule,
        "train_timesteps": diffusion.train_timesteps,
        "inference_steps": diffusion.inference_steps,
        "episode_steps": cfg.policy.episode_steps,
    }


def reward_curve(metrics: Path, window: int) -> list[float]:
    """Mean reward per window of ``window`` steps (one episode of the policy)."""
    with metrics.open(newline="") as handle:
        rewards = [float(row["reward"]) for row in csv.DictReader(handle)]
    return [float(np.mean(rewards[i:i + window])) for i in range(0, len(rewards), window)]


def finished_row(run: PlannedRun, run_dir: Path, posthoc_dir: Path | None = None) -> dict[str, Any] | None:
    """The row of a finished run, or None when the run has no summary yet; with its post-hoc exports' records (by
    name: 'int8', 'run') under ``posthoc``."""
    summary_path = run_dir / "summary.json"
    if not summary_path.is_file():
        return None
    summary = json.loads(summary_path.read_text())
    settings = settings_of(run)
    row = {"run_id": run.run_id, "status": "ok", "experiments": run.experiments, "params": run.params} | settings
    row |= {key: summary[key] for key in SUMMARY_KEYS}
    row |= {key: summary.get(key) for key in NEW_SUMMARY_KEYS}
    if posthoc_dir is not None and posthoc_dir.is_dir():
        row["posthoc"] = {p.stem: json.loads(p.read_text()) for p in sorted(posthoc_dir.glob("*.json"))}
    row["reward_curve"] = reward_curve(run_dir / "metrics.csv", settings["episode_steps"])
    return row


def failed_row(run: PlannedRun, error: str) -> dict[str, Any]:
    """The row of a run that crashed: its settings and the error, no numbers."""
    return {"run_id": run.run_id, "status": "failed", "experiments": run.experiments, "params": run.params,
            "error": error} | settings_of(run)
