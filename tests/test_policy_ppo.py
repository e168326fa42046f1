"""PPO coarse agent: GAE against hand-worked numbers, the Gaussian policy, learning on a continuous bandit."""

from __future__ import annotations

import io
import math

import numpy as np
import pytest
import torch

from airlora.errors import AirloraError
from airlora.policy.config import PPOConfig
from airlora.policy.ppo import PPO, compute_gae

pytestmark = pytest.mark.usefixtures("one_thread")


def test_gae_hand_worked_with_a_done_in_the_middle():
    # γ = 0.5, λ = 0.5 (γλ = 0.25); the episode ends with step 1, so step 1 bootstraps nothing
    # and step 2 starts a new episode that is cut off after step 3 with V(s_4) = last_value = 4.
    rewards = [1.0, 2.0, 3.0, 4.0]
    values = [0.5, 1.0, 1.5, 2.0]
    dones = [0, 1, 0, 0]
    # t=3: δ3 = 4 + 0.5·4 − 2 = 4;                      Â3 = 4
    # t=2: δ2 = 3 + 0.5·2 − 1.5 = 2.5;                  Â2 = 2.5 + 0.25·4 = 3.5
    # t=1: done, δ1 = 2 − 1 = 1;                        Â1 = 1 (nothing from t=2 flows back)
    # t=0: δ0 = 1 + 0.5·1 − 0.5 = 1;                    Â0 = 1 + 0.25·1 = 1.25
    # returns = Â + V = [1.75, 2.0, 5.0, 6.0]
    adv, ret = compute_gae(rewards, values, dones, 4.0, gamma=0.5, gae_lambda=0.5)
    torch.testing.assert_close(adv, torch.tensor([1.25, 1.0, 3.5, 4.0]))
    torch.testing.assert_close(ret, torch.tensor([1.75, 2.0, 5.0, 6.0]))


def test_gae_paper_coefficients_three_steps():
    # γ = ζ = 0.95 (paper), γζ = 0.9025; all rewards 1, values 0, terminal after the last step.
    # Â2 = 1; Â1 = 1 + 0.9025·1 = 1.9025; Â0 = 1 + 0.9025·1.9025 = 2.71700625
    adv, ret = compute_gae(np.ones(3), np.zeros(3), np.array([0, 0, 1]), 123.0, gamma=0.95, gae_lambda=0.95)
    torch.testing.assert_close(adv, torch.tensor([2.71700625, 1.9025, 1.0], dtype=torch.float64))
    torch.testing.assert_close(ret, adv)  # values are zero


def test_gae_lambda_zero_is_one_step_td_and_columns_are_independent():
    gen = torch.Generator().manual_seed(0)
    rewards, values = torch.randn(5, 3, generator=gen), torch.randn(5, 3, generator=gen)
    dones = (torch.rand(5, 3, generator=gen) < 0.3).float()
    last = torch.randn(3, generator=gen)
    adv, _ = compute_gae(rewards, values, dones, last, gamma=0.9, gae_lambda=0.0)
    next_values = torch.cat([values[1:], last[None]])
    torch.testing.assert_close(adv, rewards + 0.9 * next_values * (1 - dones) - values)
    adv_all, _ = compute_gae(rewards, values, dones, last, gamma=0.9, gae_lambda=0.8)
    for n in range(3):
        adv_n, _ = compute_gae(rewards[:, n], values[:, n], dones[:, n], last[n], gamma=0.9, gae_lambda=0.8)
        torch.testing.assert_close(adv_all[:, n], adv_n)


def test_act_shapes_logprob_and_coarse_dim():
    ppo = PPO(state_dim=5, action_dim=36, config=PPOConfig(hidden=32, coarse_dim=16, init_log_std=-1.0))
    obs = torch.randn(4, 5)
    action, logprob, value = ppo.act(obs, torch.Generator().manual_seed(1))
    assert action.shape == (4, 16) and logprob.shape == (4,) and value.shape == (4,)
    assert not action.requires_grad
    # the returned log-probability is that of the action under the policy's Normal distribution
    mean = ppo.model.actor_mean(obs).detach()
    expected = torch.distributions.Normal(mean, math.exp(-1.0)).log_prob(action).sum(-1)
    torch.testing.assert_close(logprob, expected)
    new_logprob, entropy = ppo.model.log_prob(obs, action)
    torch.testing.assert_close(new_logprob.detach(), expected)
    # the entropy is per action entry (a mean over them), so a bonus means the same for any number of modules
    torch.testing.assert_close(entropy.detach(), torch.distributions.Normal(mean, math.exp(-1.0)).entropy().mean(-1))
    torch.testing.assert_close(ppo.evaluate(obs), value)
    # the same generator seed gives the same action
    again, _, _ = ppo.act(obs, torch.Generator().manual_seed(1))
    torch.testing.assert_close(action, again)


def test_ppo_learns_a_continuous_bandit():
    torch.manual_seed(0)
    target = torch.tensor([0.6, -0.4, 0.3])
    ppo = PPO(state_dim=2, action_dim=3, config=PPOConfig(hidden=32, lr=3e-3, update_epochs=4, minibatch_size=32,
                                                          init_log_std=-0.5))
    gen = torch.Generator().manual_seed(0)
    obs = torch.ones(64, 2)
    start = (ppo.model.actor_mean(obs[:1]).detach()[0] - target).norm().item()
    for _ in range(80):
        action, logprob, value = ppo.act(obs, gen)
        reward = -((action - target) ** 2).sum(-1)
        # one-step episodes: every transition is terminal, so Â = R − V
        adv, ret = compute_gae(reward[:, None], value[:, None], torch.ones(64, 1), torch.zeros(1), 0.95, 0.95)
        metrics = ppo.update(obs, action, logprob, adv[:, 0], ret[:, 0], value, generator=gen)
    end = (ppo.model.actor_mean(obs[:1]).detach()[0] - target).norm().item()
    assert end < 0.2 * start, (start, end)
    assert set(metrics) >= {"policy_loss", "value_loss", "entropy", "approx_kl", "clipfrac"}
    assert all(math.isfinite(v) for k, v in metrics.items() if k != "explained_variance")


def test_categorical_heads_logprob_mode_and_learning():
    torch.manual_seed(0)
    ppo = PPO(state_dim=2, action_dim=3, config=PPOConfig(hidden=32, lr=3e-3, update_epochs=4, minibatch_size=64,
                                                          target_kl=None), categories=5)
    obs = torch.ones(64, 2)
    gen = torch.Generator().manual_seed(0)
    action, logprob, _ = ppo.act(obs, gen)
    assert action.dtype == torch.float32 and set(action.unique().tolist()) <= {0, 1, 2, 3, 4}
    dist = torch.distributions.Categorical(logits=ppo.model.logits(obs).detach())
    torch.testing.assert_close(logprob, dist.log_prob(action.long()).sum(-1))
    new_logprob, entropy = ppo.model.log_prob(obs, action)
    torch.testing.assert_close(new_logprob.detach(), logprob)
    torch.testing.assert_close(entropy.detach(), dist.entropy().mean(-1))
    target = torch.tensor([4.0, 0.0, 2.0])  # the best category of each entry
    for _ in range(60):
        action, logprob, value = ppo.act(obs, gen)
        reward = -(action - target).abs().sum(-1)
        adv, ret = compute_gae(reward[:, None], value[:, None], torch.ones(64, 1), torch.zeros(1), 0.0, 0.0)
        ppo.update(obs, action, logprob, adv[:, 0], ret[:, 0], value, generator=gen)
    mode, _, _ = ppo.act(obs[:1], deterministic=True)
    assert mode[0].tolist() == target.tolist()


def test_target_kl_stops_the_epochs_early():
    torch.manual_seed(0)
    obs, gen = torch.randn(32, 2), torch.Generator().manual_seed(0)
    steps = {}
    for target_kl in (None, 1e-6):
        ppo = PPO(2, 3, PPOConfig(hidden=16, lr=1e-2, update_epochs=10, minibatch_size=32, target_kl=target_kl))
        calls = []
        original = ppo.optimizer.step
        ppo.optimizer.step = lambda *a, calls=calls, original=original, **k: (calls.append(1), original(*a, **k))[1]
        action, logprob, value = ppo.act(obs, gen)
        reward = -(action**2).sum(-1)
        ppo.update(obs, action, logprob, reward - value, reward, value, generator=gen)
        steps[target_kl] = len(calls)
    assert steps[None] == 10 and steps[1e-6] < 10, steps


def test_a_trained_agent_restored_into_another_continues_exactly_as_the_original():
    """A checkpoint must carry the Adam moments too: after the round trip one more update is the original's to the
    bit, while the same weights with a fresh optimiser take a different step."""
    obs = torch.randn(32, 3, generator=torch.Generator().manual_seed(0))

    def update(ppo, seed):
        gen = torch.Generator().manual_seed(seed)
        action, logprob, value = ppo.act(obs, gen)
        reward = -(action**2).sum(-1)
        ppo.update(obs, action, logprob, reward - value, reward, value, generator=gen)

    torch.manual_seed(1)
    a = PPO(3, 4, PPOConfig(hidden=16, lr=1e-2))
    for seed in range(3):
        update(a, seed)
    torch.manual_seed(2)  # other initial weights, so a round trip that dropped anything shows
    b, weights_only = PPO(3, 4, PPOConfig(hidden=16, lr=1e-2)), PPO(3, 4, PPOConfig(hidden=16, lr=1e-2))
    # through bytes, as a checkpoint goes (in process, torch's optimiser load would share a's moment tensors)
    buffer = io.BytesIO()
    torch.save(a.state_dict(), buffer)
    buffer.seek(0)
    b.load_state_dict(torch.load(buffer, weights_only=True))
    weights_only.model.load_state_dict(a.model.state_dict())
    torch.testing.assert_close(b.model.actor_mean(obs), a.model.actor_mean(obs), rtol=0, atol=0)
    for ppo in (a, b, weights_only):
        update(ppo, 9)
    for (name, p), q in zip(a.model.named_parameters(), b.model.parameters(), strict=True):
        assert torch.equal(p, q), name
    assert any(not torch.equal(p, r) for p, r in zip(a.model.parameters(), weights_only.model.parameters(),
                                                     strict=True))


@pytest.mark.parametrize(("field", "value"), [("gamma", 1.5), ("clip_coef", 0.0), ("coarse_dim", 0),
                                              ("update_epochs", 0), ("lr", float("nan"))])
def test_config_rejects_bad_values(field, value):
    with pytest.raises(AirloraError, match=f"ppo.{field}"):
        PPOConfig(**{field: value})
