"""The rank-allocation MDP (paper §III-C) as a Gymnasium environment around a live fine-tuning session.

Letters: D = 6L action dimension (one rank per adapted module), S = 5 + D state dimension.

State s = {SNR, W, H, ρ, progress, r / r_max}, all in [0, 1]; action = the rank vector in {0..r_max}^D; one step =
project the ranks onto the airtime budget, apply them, run one training batch, reward R = −U − λ·η.
An episode is ``episode_steps`` steps (15 in the paper) of the same ongoing fine-tuning run: ``reset()``
starts a new episode and keeps training the same model. ``reset(seed=s)`` restarts the run itself (adapter
and head values, optimiser, data and SNR stream back to step 0, torch's RNG for dropout seeded with s), so a
seeded reset followed by the same actions gives the same trajectory, as Gymnasium's checker requires.
Any Gymnasium agent (e.g. SB3's PPO) can drive it; airlora's own AirLLM allocator uses the same ``state_vector``.
"""

from __future__ import annotations

from typing import Any

import gymnasium as gym
import numpy as np
import torch
from gymnasium import spaces

from airlora.allocators.base import AllocationContext, Allocator, StepOutcome, split_decision
from airlora.finetuner import FineTuner
from airlora.session import Session
from airlora.state import HEAD_FEATURES, state_of
from airlora.trainer import context


class RankAllocationEnv(gym.Env):
    """Each step trains the session's model for one batch with the ranks the agent chose (projected)."""

    metadata = {"render_modes": []}

    def __init__(self, session: Session, episode_steps: int = 15) -> None:
        super().__init__()
        self.session = session
        self.keys = list(session.module_map.names)
        self.r_max = session.config.adapter.r_max
        self.episode_steps = episode_steps
        self.action_space = spaces.MultiDiscrete(np.full(len(self.keys), self.r_max + 1))
        self.observation_space = spaces.Box(0.0, 1.0, shape=(HEAD_FEATURES + len(self.keys),), dtype=np.float32)
        self.tuner = FineTuner(session)
        self._start = (session.adapters.state(), {k: p.detach().clone() for k, p in session.head.items()})
        self.global_step = 0
        self.episode_step = 0
        session.model.train()

    def _restart(self, seed: int) -> None:
        """Back to the run's first step: initial adapter and head values, a fresh optimiser, seeded dropout."""
        adapter_state, head_state = self._start
        self.session.adapters.load_state(adapter_state)
        with torch.no_grad():
            for name, p in self.session.head.items():
                p.copy_(head_state[name])
        self.tuner = FineTuner(self.session)
        self.global_step = 0
        torch.manual_seed(seed)

    def _observation(self) -> np.ndarray:
        return state_of(self.context(), self.keys)

    def context(self) -> AllocationContext:
        """What an airlora ``Allocator`` sees before the next step: the same context the trainer builds."""
        return context(self.session, self.global_step, self.session.adapters.ranks())

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None):
        """Start a new episode; with a ``seed``, restart the fine-tuning run itself (see the module docstring)."""
        super().reset(seed=seed)
        if seed is not None:
            self._restart(seed)
        self.episode_step = 0
        return self._observation(), {"global_step": self.global_step}

    def step(self, action: np.ndarray):
        """Apply the (projected) ranks, train one batch, return (obs, reward, terminated, truncated, info)."""
        s, cfg = self.session, self.session.config
        snr_db = s.snr.snr_db(self.global_step)
        budget = s.budget(snr_db)
        # the agent chooses ranks; precisions are the budget's highest, lowered by the projection where it must
        ranks, precisions = budget.project_joint(np.asarray(action, dtype=np.float64))
        self.tuner.apply(ranks, precisions)
        loss = self.tuner.step(s.train_batches.batch(self.global_step))
        self.tuner.zero_grad()
        eta = budget.eta(ranks, precisions)
        reward = -loss - cfg.train.reward_lambda * eta
        self.global_step += 1
        self.episode_step += 1
        terminated = self.global_step >= cfg.train.steps
        truncated = self.episode_step >= self.episode_steps and not terminated
        info = {"loss": loss, "eta": eta, "snr_db": snr_db, "airtime_s": budget.airtime_s(ranks, precisions),
                "budget_ok": budget.feasible(ranks, precisions), "ranks": ranks, "precisions": precisions}
        return self._observation(), float(reward), terminated, truncated, info


def drive_env(env: RankAllocationEnv, allocator: Allocator, steps: int) -> list[float]:
    """Run an airlora allocator as the agent of ``env`` for ``steps`` steps through its own calls: ``allocate`` on
    the env's context, ``env.step`` with the proposed ranks, ``observe`` with the step's outcome. Returns the rewards.

    So the trainer, this environment and the bandit (``airlora.bandit.drive``) drive an allocator the same way. The
    env picks precisions by its projection; ``outcome.model`` is the env's model, gradients dropped already.
    """
    rewards = []
    for _ in range(steps):
        ctx = env.context()
        ranks, _ = split_decision(allocator.allocate(ctx))
        _, reward, terminated, truncated, info = env.step(np.array([ranks[k] for k in env.keys]))
        allocator.observe(StepOutcome(ctx.step, info["loss"], reward, info["eta"], info["ranks"], env.session.model,
                                      info["precisions"]))
        rewards.append(reward)
        if terminated:
            break
        if truncated:
            env.reset()
    return rewards
