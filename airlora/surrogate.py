"""Experience off the real run: a loss surrogate calibrated from the model, and the policy pretrained on it.

Letters: M modules, R = r_max.

A real run gives the policy 20–40 episodes; the paper trains 1,000. ``pretrain`` calibrates, in seconds, how much
each module's rank is worth from the model itself, then trains the policy for thousands of episodes on a rank
bandit (``airlora.bandit``) built from that calibration and the run's own budgets, and saves a policy.pt that
``airlora run --policy`` continues to train online.

Calibration: on a few probe batches, the gradient G_m = ∂U/∂W_m of every adapted base weight, and its singular
values σ_{m,1} ≥ σ_{m,2} ≥ …. A rank-r update of W_m can follow at most the top r singular directions of G_m, and
a gradient step along them lowers the loss at the rate Σ_{i≤r} σ_{m,i}² (first order), so module m at rank r is
credited gain_m(r) = loss_gap · Σ_{i≤r} σ_{m,i}² / Σ_{m'} Σ_{i≤R} σ_{m',i}²: concave in r, uneven over modules,
summing to ``loss_gap`` with every module at r_max. ``loss_gap`` (the loss between no adapter and the full one
at the end of a run) sets the surrogate's scale against λ·η; the policy's critic corrects it online.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from airlora.allocators import make_allocator
from airlora.bandit import RankBandit, drive, share_of_gap
from airlora.config import RunConfig, merge
from airlora.errors import AirloraError
from airlora.policy.threads import single_thread
from airlora.session import Session, resolved_config


def gradient_spectra(session: Session, probe_batches: int) -> dict[str, np.ndarray]:
    """Squared singular values of ∂U/∂W of every adapted base weight over ``probe_batches`` training batches.

    Returns key -> (R,) float64, the top r_max values, largest first. The model is left as it was (no gradients,
    base weights frozen, its train/eval mode).
    """
    model, adapters = session.model, session.adapters
    was_training = model.training
    model.eval()  # no dropout: the calibration is a property of the weights, repeatable
    bases = {key: m.base.weight for key, m in adapters.modules.items()}
    for weight in bases.values():
        weight.requires_grad_(True)
    try:
        for step in range(probe_batches):
            batch = session.train_batches.batch(step).to(session.device)
            with session.autocast():
                loss = model(**batch.inputs, labels=batch.labels).loss / probe_batches
            loss.backward()
        out = {}
        with single_thread():  # torch's CPU SVD on two threads took 3.8 s for a 1536×384 matrix here, on one 17 ms
            for key, weight in bases.items():
                sigma = torch.linalg.svdvals(weight.grad.detach().float().cpu())[: adapters.r_max]
                out[key] = np.pad(sigma.double().numpy() ** 2, (0, adapters.r_max - sigma.numel()))
    finally:
        for weight in bases.values():
            weight.requires_grad_(False)
            weight.grad = None
        model.zero_grad(set_to_none=True)
        model.train(was_training)
    return out


def calibrated_gains(spectra: dict[str, np.ndarray], keys: list[str], loss_gap: float) -> np.ndarray:
    """gain_m(r) = loss_gap·Σ_{i≤r} σ²_{m,i} / Σ_all σ², for r = 0..R: (M, R + 1), rows in ``keys`` order."""
    energy = np.stack([spectra[k] for k in keys])  # (M, R)
    cumulative = np.concatenate([np.zeros((len(keys), 1)), np.cumsum(energy, axis=1)], axis=1)
    total = cumulative[:, -1].sum()
    return loss_gap * cumulative / total if total > 0 else cumulative


def surrogate_bandit(session: Session, gains: np.ndarray, noise_std: float) -> RankBandit:
    """The rank bandit of the calibrated gains under the run's own budgets (each SNR of its schedule) and λ."""
    budgets = {float(s): session.budget(float(s)) for s in sorted(set(session.snr.values))}
    return RankBandit(budgets, gains, noise_std=noise_std, reward_lambda=session.config.train.reward_lambda,
                      bandwidth_hz=session.bandwidth_hz)


def pretrain(session: Session, out: Path, progress: bool = True) -> dict[str, Any]:
    """Calibrate the surrogate on ``session``'s model, train its airllm allocator on it, save policy.pt and a
    calibration.json into ``out``; returns the calibration record (also what calibration.json holds)."""
    from airlora.io import write_json_atomic

    cfg = session.config
    settings = cfg.policy.pretrain
    t0 = time.perf_counter()
    spectra = gradient_spectra(session, settings.probe_batches)
    keys = list(session.budget(session.snr.values[0]).keys)
    gains = calibrated_gains(spectra, keys, settings.loss_gap)
    calibration_s = time.perf_counter() - t0
    bandit = surrogate_bandit(session, gains, settings.noise_std)
    allocator = session.allocator
    marks = tuple(e for e in (10, 30, 100, 300, 1000, 3000, 10000) if e <= settings.episodes) + (settings.episodes,)
    t1 = time.perf_counter()
    result = drive(bandit, allocator, settings.episodes, cfg.policy.episode_steps, cfg.train.seed, marks, progress)
    pretrain_s = time.perf_counter() - t1
    allocator.save(out)
    record = {
        "keys": keys,
        "importance": {k: float(gains[m, -1]) for m, k in enumerate(keys)},
        "gains": {k: gains[m].tolist() for m, k in enumerate(keys)},
        "loss_gap": settings.loss_gap, "probe_batches": settings.probe_batches, "noise_std": settings.noise_std,
        "episodes": settings.episodes, "snr_db": list(bandit.snr_values),
        "optimum_ranks": {str(s): bandit.optimum(s)[0] for s in bandit.snr_values},
        "share_of_gap_on_surrogate": {str(e): share_of_gap(bandit, per) for e, per in result.evaluations.items()},
        "calibration_s": calibration_s, "pretrain_s": pretrain_s,
    }
    write_json_atomic(out / "calibration.json", record)
    return record


PRETRAINED_DIR = "pretrained-policy"
"""The folder of a run (policy.pretrain.before_run) that holds the policy it pretrained before training."""


def pretrain_before_run(session: Session, out: Path, resume: bool) -> tuple[Session, dict[str, Any]]:
    """policy.pretrain.before_run: pretrain ``session``'s airllm policy into ``out``/pretrained-policy/ and return
    the session with a fresh allocator started from it (as ``--policy`` would), and what the run's summary keeps.

    A resumed run reuses a finished pretraining (its calibration.json is written last; the resume has checked that
    the settings are the run's); a new run, or a pretraining killed part-way, starts from an empty folder, so a
    policy left by another run in the same folder is never taken for this one's.
    """
    folder = out / PRETRAINED_DIR
    record_path = folder / "calibration.json"
    if not (resume and record_path.is_file()):
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        pretrain(session, folder, progress=session.config.train.progress)
    record = json.loads(record_path.read_text())
    config = merge(session.config, {"policy.load_path": str(folder / "policy.pt")})
    kept = {key: record[key] for key in ("episodes", "calibration_s", "pretrain_s", "loss_gap", "noise_std",
                                         "share_of_gap_on_surrogate")}
    return dataclasses.replace(session, config=config, allocator=make_allocator(config)), kept


POLICY_FILES = ("policy.pt", "policy_metrics.csv", "calibration.json", "config.json")
"""What `airlora pretrain-policy` writes into its folder."""


def pretrain_policy(config: RunConfig, out: Path, overwrite: bool = False) -> dict[str, Any]:
    """`airlora pretrain-policy`: build the run's session, pretrain its airllm policy, write it into ``out``.

    The folder gets policy.pt, policy_metrics.csv, calibration.json and the resolved config.json; an existing
    policy there is replaced only with ``overwrite``, and a rejected input leaves no folder behind.
    """
    from airlora.io import write_json_atomic
    from airlora.session import build_session

    out = Path(out)
    if out.exists() and not out.is_dir():
        raise AirloraError(f"--out {str(out)!r} is a file; expected a folder for the policy")
    if (out / "policy.pt").exists() and not overwrite:
        raise AirloraError(f"--out {str(out)!r} already holds a policy.pt; choose another folder or --overwrite")
    if config.allocator != "airllm":
        raise AirloraError(f"pretrain-policy trains the airllm allocator's policy; allocator is {config.allocator!r}")
    session = build_session(config)
    out.mkdir(parents=True, exist_ok=True)
    for name in POLICY_FILES:
        (out / name).unlink(missing_ok=True)
    write_json_atomic(out / "config.json", resolved_config(session))
    return pretrain(session, out, progress=config.train.progress)
