"""The Gymnasium environment: passes Gymnasium's checker, keeps every step within budget, rewards as defined."""

import numpy as np
import pytest
from gymnasium.utils.env_checker import check_env

from airlora.env import RankAllocationEnv
from airlora.session import build_session
from airlora.state import state_vector


@pytest.mark.integration
def test_env_checker_passes(tiny_config):
    env = RankAllocationEnv(build_session(tiny_config), episode_steps=3)
    check_env(env, skip_render_check=True)


@pytest.mark.integration
def test_steps_stay_in_budget_and_reward_is_minus_loss_minus_lambda_eta(tiny_config):
    session = build_session(tiny_config)
    env = RankAllocationEnv(session, episode_steps=3)
    obs, _ = env.reset(seed=0)
    assert env.observation_space.contains(obs)
    truncations = 0
    for _ in range(6):
        action = np.full(env.action_space.shape, 4)  # full rank everywhere: over budget at these SNRs
        obs, reward, terminated, truncated, info = env.step(action)
        assert info["budget_ok"] and info["airtime_s"] <= tiny_config.channel.t_max_s
        assert all(0 <= r <= 4 for r in info["ranks"].values())
        assert sum(info["ranks"].values()) < 4 * len(info["ranks"])  # the projection cut something
        assert np.isclose(reward, -info["loss"] - tiny_config.train.reward_lambda * info["eta"])
        truncations += truncated
        if truncated:
            env.reset()
    assert terminated and truncations == 1  # 6 steps: one truncated episode, then the run's end


def test_state_vector_is_normalised():
    s = state_vector(-5.0, 4.69e6, 0.8, 0.1, [0, 4, 8], 8, progress=0.25)
    assert s.dtype == np.float32 and s.shape == (8,)
    assert np.all((s >= 0) & (s <= 1))
    np.testing.assert_allclose(s[4:], [0.25, 0, 0.5, 1])
    assert state_vector(-100.0, 1.0, float("nan"), 2.0, [9], 8, progress=3.0).tolist() == [0, 0, 0, 1, 1, 1]


@pytest.mark.integration
def test_an_airlora_allocator_drives_the_env_through_its_own_calls(tiny_config):
    from airlora.allocators import make_allocator
    from airlora.config import merge
    from airlora.env import drive_env

    config = merge(tiny_config, {"allocator": "airllm", "train.steps": 8, "policy.episode_steps": 3,
                                 "policy.ppo.hidden": 16, "policy.diffusion.hidden": 16,
                                 "policy.diffusion.train_timesteps": 100, "policy.diffusion.inference_steps": 10})
    env = RankAllocationEnv(build_session(config), episode_steps=3)
    env.reset(seed=0)
    allocator = make_allocator(config)
    rewards = drive_env(env, allocator, steps=7)
    assert len(rewards) == 7 and len(allocator.decision_s) == 7
    assert len(allocator.metrics) == 2  # two episodes learned, the second once step 7's decision was made
    assert allocator.policy.critic.count == 7
    recorded = allocator.policy.buffer["reward"][:7].tolist()
    np.testing.assert_allclose(recorded, rewards, rtol=1e-6)  # what the policy learned from is the env's reward
