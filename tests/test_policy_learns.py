"""The policy learns: the bandit's optimum, GAE at a truncation, the refiner's conditioning, a short bandit run."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from airlora.allocators import make_allocator
from airlora.bandit import RankBandit, drive, evaluate, exponential_gains, paper_bandit, share_of_gap
from airlora.channel import Budget
from airlora.config import RunConfig, merge
from airlora.policy import hierarchical
from airlora.policy.critic import AdditiveCritic
from airlora.policy.hierarchical import RankPolicy
from airlora.policy.ppo import compute_gae

pytestmark = pytest.mark.usefixtures("one_thread")

TINY_SHAPES = {"layers.0.q": (1, 1), "layers.0.k": (2, 2), "layers.0.v": (3, 3)}  # costs 3, 5, 7
EPISODES = {"policy.refiner_batch": 32, "policy.episode_steps": 5}
"""This file's episodes, on top of the shared ``small_policy`` networks."""


def tiny_bandit(capacities: dict[float, float], weights=(0.3, 0.05, 0.2), r_max: int = 3, noise: float = 0.0,
                reward_lambda: float = 0.1) -> RankBandit:
    budgets = {snr: Budget.for_model(TINY_SHAPES, r_max, 1, capacity, 1.0) for snr, capacity in capacities.items()}
    return RankBandit(budgets, exponential_gains(np.array(weights), 1.5, r_max), noise_std=noise,
                      reward_lambda=reward_lambda, bandwidth_hz=1e6)


def test_optimum_is_the_best_feasible_rank_vector_by_brute_force():
    bandit = tiny_bandit({0.0: 20.0, 5.0: 9.0, 9.0: 100.0}, reward_lambda=0.3)
    for snr in bandit.snr_values:
        budget = bandit.budgets[snr]
        best = max(
            (bandit.expected_reward(snr, dict(zip(bandit.keys, r, strict=True))), r)
            for r in itertools.product(range(4), repeat=3)
            if budget.feasible(dict(zip(bandit.keys, r, strict=True)))
        )
        ranks, reward = bandit.optimum(snr)
        assert budget.feasible(ranks)
        assert reward == pytest.approx(best[0])
    # the three budgets bind differently: the optimum uses 3 of 20, nothing heavy at 9, everything at 100
    assert bandit.optimum(5.0)[0] != bandit.optimum(9.0)[0]


def test_bandit_rejects_gains_that_are_not_concave():
    budgets = {0.0: Budget.for_model(TINY_SHAPES, 3, 1, 20.0, 1.0)}
    with pytest.raises(Exception, match="concave"):
        RankBandit(budgets, np.array([[0, 1, 1.5, 3.0]] * 3))


def test_gae_at_a_truncation_bootstraps_with_the_next_state_hand_worked():
    # γ = λ = 0.5 (γλ = 0.25); three steps of an episode cut off (not ended) with V(s_3) = 1.
    # t=2: δ2 = 2 + 0.5·1 − 0.3 = 2.2;   Â2 = 2.2
    # t=1: δ1 = 0 + 0.5·0.3 − 0.4 = −0.25; Â1 = −0.25 + 0.25·2.2 = 0.3
    # t=0: δ0 = 1 + 0.5·0.4 − 0.5 = 0.7;  Â0 = 0.7 + 0.25·0.3 = 0.775;   returns = Â + V
    adv, ret = compute_gae([1.0, 0.0, 2.0], [0.5, 0.4, 0.3], [0, 0, 0], 1.0, gamma=0.5, gae_lambda=0.5)
    torch.testing.assert_close(adv, torch.tensor([0.775, 0.3, 2.2]))
    torch.testing.assert_close(ret, torch.tensor([1.275, 0.7, 2.5]))
    terminal, _ = compute_gae([1.0, 0.0, 2.0], [0.5, 0.4, 0.3], [0, 0, 1], 1.0, gamma=0.5, gae_lambda=0.5)
    assert terminal[2] == pytest.approx(1.7)  # what the old episode-terminal update computed instead


def test_policy_learns_after_the_next_decision_and_bootstraps_with_its_value(monkeypatch, small_policy):
    seen = []

    def spy(rewards, values, dones, last_value, gamma, gae_lambda):
        seen.append((len(rewards), float(torch.as_tensor(dones).sum()), last_value))
        return compute_gae(rewards, values, dones, last_value, gamma, gae_lambda)

    monkeypatch.setattr(hierarchical, "compute_gae", spy)
    config = merge(RunConfig(), {"allocator": "airllm", "policy.variant": "ppo", **small_policy, **EPISODES})
    bandit = tiny_bandit({0.0: 20.0})
    allocator = make_allocator(config)
    drive(bandit, allocator, episodes=1, episode_steps=5, seed=0)  # exactly one episode: its next state never came
    assert seen == []
    allocator.allocate(evaluate_context(bandit, step=5))
    value_of_next = allocator.pending["value"]
    allocator.observe(outcome_for(bandit, allocator, step=5))
    assert seen == [(5, 0.0, value_of_next)]  # no terminal flag; V(s_T) of the decision that came next


def evaluate_context(bandit, step):
    from airlora.allocators.base import AllocationContext

    return AllocationContext(step, 0.0, bandit.budgets[0.0], 0.7, 0.05, dict.fromkeys(bandit.keys, 1), 1e6, 0.5)


def outcome_for(bandit, allocator, step):
    from airlora.allocators.base import StepOutcome

    ranks = dict.fromkeys(bandit.keys, 1)
    return StepOutcome(step, 0.5, -0.5, 0.1, ranks, None)


def test_refiner_alone_gives_different_ranks_for_two_snrs_after_training(small_policy):
    # Low SNR fits two triplets of the cheapest module, high SNR everything: the executed ranks differ by condition,
    # and a refiner that collapsed onto its pooled past actions (or onto x_T) gives the same ranks at both (as this
    # one does untrained: total rank 2 at both SNRs with lr 1e-9). The refiner alone decides: no PPO, no choice.
    config = merge(RunConfig(), {"allocator": "airllm", "policy.variant": "ddim", "policy.candidates": 1,
                                 "policy.deliver_candidates": 1,
                                 "policy.action_steps": 0, "policy.diffusion.lr": 3e-3, "policy.refiner_updates": 16,
                                 "train.seed": 3, **small_policy, **EPISODES})
    bandit = tiny_bandit({-5.0: 6.0, 15.0: 1000.0}, weights=(0.3, 0.3, 0.3), reward_lambda=0.0)
    allocator = make_allocator(config)
    drive(bandit, allocator, episodes=80, episode_steps=5, seed=0)
    after = evaluate_ranks(bandit, allocator)
    assert sum(after[15.0].values()) >= sum(after[-5.0].values()) + 3, after


def evaluate_ranks(bandit, allocator):
    from airlora.allocators.base import AllocationContext

    out = {}
    for snr in bandit.snr_values:
        ctx = AllocationContext(0, snr, bandit.budgets[snr], 0.75, 0.05, dict.fromkeys(bandit.keys, 1), 1e6, 1.0)
        out[snr] = bandit.execute(snr, allocator.deliver(ctx))[0]
    return out


def test_short_bandit_run_default_policy_beats_uniform():
    config = merge(RunConfig(), {"allocator": "airllm", "train.seed": 1})
    bandit = paper_bandit(config, noise_std=0.0)  # MiniLM's 36 modules, the default run's budgets
    allocator = make_allocator(config)
    result = drive(bandit, allocator, episodes=60, episode_steps=15, seed=1, evaluate_at=(60,))
    share = share_of_gap(bandit, result.evaluations[60])
    assert share > 0.15, share  # 0 is uniform; random ranks score about −2.3 on this bandit
    random_share = share_of_gap(bandit, evaluate(bandit, make_allocator(merge(config, {"allocator": "random"})), 0,
                                                 1, dict.fromkeys(bandit.keys, 8)))
    assert random_share < 0


def test_additive_critic_recovers_importances_and_knows_where_it_has_no_data():
    gen = np.random.default_rng(0)
    amplitude = np.array([0.4, 0.1, 0.25, 0.02])
    critic = AdditiveCritic(head_dim=1, modules=4, r_max=8)
    ranks = gen.integers(0, 5, size=(600, 4)).astype(float)  # ranks above 4 are never seen
    y = -(amplitude * np.exp(-ranks / 2)).sum(1) + 0.01 * gen.standard_normal(600)
    critic.update(torch.zeros(600, 1), torch.from_numpy(ranks), torch.from_numpy(y))
    critic.solve()
    values = critic.module_values()  # (M, G)
    recovered = values[:, 4] - values[:, 0]
    assert np.corrcoef(recovered, amplitude * (1 - np.exp(-2)))[0, 1] > 0.98
    seen, unseen = torch.full((1, 4), 2.0), torch.full((1, 4), 8.0)
    spread = [float(critic.estimate(torch.zeros(1, 1), r, 1.0) - critic.estimate(torch.zeros(1, 1), r))
              for r in (seen, unseen)]
    assert spread[1] > 2 * spread[0], spread


def test_critic_plus_exact_eta_is_the_callers_reward_whatever_it_is(small_policy):
    # The caller's reward is −2·η (not −U − λη): the critic learns R + λη, so critic − λη tracks the caller's R.
    config = merge(RunConfig(), {"allocator": "airllm", "policy.variant": "ddim", **small_policy, **EPISODES})
    bandit = tiny_bandit({0.0: 30.0})
    budget = bandit.budgets[0.0]
    allocator = make_allocator(config)
    gen = np.random.default_rng(0)
    from airlora.allocators.base import StepOutcome

    for step in range(120):
        allocator.allocate(evaluate_context(bandit, step))
        ranks = budget.project(dict(zip(bandit.keys, map(int, gen.integers(0, 4, 3)), strict=True)))
        eta = budget.eta(ranks)
        allocator.observe(StepOutcome(step, 0.0, -2.0 * eta, eta, ranks, None))
    policy = allocator.policy
    policy.critic.solve()
    state = allocator._state(evaluate_context(bandit, 120))[None]
    for r in ([0, 0, 0], [3, 1, 0], [1, 1, 2]):
        ranks = torch.tensor([r], dtype=torch.float32)
        eta = budget.eta(dict(zip(bandit.keys, r, strict=True)))
        assert float(policy.score(state, ranks, torch.tensor([30.0]), 0.0)) == pytest.approx(-2.0 * eta, abs=0.02)


def test_delivery_is_deterministic_and_changes_nothing_learned(small_policy):
    config = merge(RunConfig(), {"allocator": "airllm", **small_policy, **EPISODES})
    bandit = tiny_bandit({0.0: 20.0, 9.0: 100.0})
    a, b = make_allocator(config), make_allocator(config)
    drive(bandit, a, episodes=3, episode_steps=5, seed=0)
    drive(bandit, b, episodes=3, episode_steps=5, seed=0)
    first = evaluate_ranks(bandit, a)
    assert evaluate_ranks(bandit, a) == first  # the same decision every time
    ctx = evaluate_context(bandit, 15)
    assert a.allocate(ctx) == b.allocate(ctx)  # b never delivered: a's delivery left its training state alone


def test_saved_policy_rebuilds_without_a_run_with_the_same_weights_and_decisions(tmp_path, small_policy):
    config = merge(RunConfig(), {"allocator": "airllm", **small_policy, **EPISODES})
    bandit = tiny_bandit({0.0: 20.0, 9.0: 100.0})
    allocator = make_allocator(config)
    drive(bandit, allocator, episodes=4, episode_steps=5, seed=0)
    allocator.save(tmp_path)
    state = hierarchical.load_policy_file(tmp_path / "policy.pt")
    loaded = RankPolicy.from_state(state)
    original = allocator.policy
    for name, tensor in original.refiner.denoiser.state_dict().items():
        torch.testing.assert_close(loaded.refiner.denoiser.state_dict()[name], tensor)
    torch.testing.assert_close(loaded.ppo.model.actor_mean[0].weight, original.ppo.model.actor_mean[0].weight)
    torch.testing.assert_close(loaded.critic.weights, original.critic.weights)
    obs = allocator._state(evaluate_context(bandit, 20))
    assert loaded.act(obs, 20.0, explore=False)[0] == original.act(obs, 20.0, explore=False)[0]


def test_a_saved_policy_keeps_the_pricing_of_several_precisions(small_policy):
    # with several allowed precisions the geometry prices ranks at the lowest one too (bits_low); a policy rebuilt
    # from its file must decide on the same budget, not on the highest precision alone
    config = merge(RunConfig(), {"allocator": "airllm", **small_policy, **EPISODES}).policy
    keys = ["layers.0.q", "layers.0.k"]
    geometry = hierarchical.Geometry(torch.tensor([800.0, 1600.0]), 1000.0, 1.0, 8, torch.tensor([100.0, 200.0]))
    policy = RankPolicy(keys, geometry, config, 0.1, 0)
    loaded = RankPolicy.from_state(policy.policy_state())
    assert torch.equal(loaded.geometry.bits_low, geometry.bits_low)
    assert torch.equal(loaded.geometry.bits_per_rank, geometry.bits_per_rank) and loaded.geometry.r_max == 8
    ranks, capacity = torch.tensor([[8.0, 8.0]]), torch.tensor([3000.0])
    assert torch.equal(loaded.geometry.executed(ranks, capacity), geometry.executed(ranks, capacity))
