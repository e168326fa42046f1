"""Diffusion refiner: fast DDIM path vs diffusers, toy targets, guidance, the reward term, rank codec, U-Net."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from airlora.errors import AirloraError
from airlora.policy.config import DiffusionConfig
from airlora.policy.critic import MLPCritic
from airlora.policy.denoisers import Denoiser, MLPDenoiser, UNet1DDenoiser
from airlora.policy.diffusion import (
    DiffusionRefiner,
    ddim_coefficients,
    ddim_step,
    decode_ranks,
    encode_ranks,
    make_denoiser,
    scheduler_kwargs,
)

PREDICTIONS = ["epsilon", "v_prediction", "sample"]
SCHEDULES = ["linear", "squaredcos_cap_v2", "scaled_linear"]


pytestmark = pytest.mark.usefixtures("one_thread")


def make_refiner(action_dim: int, cond_dim: int, seed: int = 0, **overrides) -> DiffusionRefiner:
    settings_ = {"hidden": 64, "time_embed_dim": 32, "train_timesteps": 100, "inference_steps": 20, "lr": 3e-3,
                 "guidance_scale": 1.0, "start_strength": 1.0, **overrides}
    config = DiffusionConfig(**settings_)
    torch.manual_seed(seed)
    return DiffusionRefiner(make_denoiser(config, action_dim, cond_dim), config, action_dim)


def train(refiner: DiffusionRefiner, data, steps: int, seed: int = 0, **loss_kwargs) -> None:
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x0, cond = data(gen)
        refiner.update(x0, cond, gen, **loss_kwargs)


# Three conditions (one-hot) with one exact target each, D = 8.
TARGETS = torch.tensor([[0.5, 0.5, 0.5, 0.5, -0.5, -0.5, -0.5, -0.5], [-0.6] * 8, [0.3, -0.3] * 4])
CONDS = torch.eye(3)


def three_targets(gen: torch.Generator, batch: int = 96) -> tuple[torch.Tensor, torch.Tensor]:
    idx = torch.randint(0, 3, (batch,), generator=gen)
    return TARGETS[idx], CONDS[idx]


@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("prediction", PREDICTIONS)
@pytest.mark.parametrize("clip", [True, False])
def test_fast_ddim_step_matches_diffusers(prediction, schedule, clip):
    config = DiffusionConfig(beta_schedule=schedule, prediction_type=prediction, clip_sample=clip)
    scheduler = DDIMScheduler(**scheduler_kwargs(config))
    gen = torch.Generator().manual_seed(0)
    for steps in (50, 30):
        timesteps, table = ddim_coefficients(scheduler, steps)
        scheduler.set_timesteps(steps)
        assert torch.equal(timesteps, scheduler.timesteps)
        for t, coefficients in zip(timesteps, table, strict=True):
            out, x = torch.randn(4, 36, generator=gen), torch.randn(4, 36, generator=gen)
            expected = scheduler.step(out, t, x).prev_sample
            got = ddim_step(out.clone(), x.clone(), coefficients, prediction, clip)
            torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("prediction", PREDICTIONS)
def test_sample_matches_a_reference_loop_over_diffusers_step(prediction):
    refiner = make_refiner(8, 3, prediction_type=prediction)
    cond, w = torch.randn(3, 3), 2.0
    got = refiner.sample(cond, torch.Generator().manual_seed(5), guidance_scale=w)
    # reference: separate conditional and null passes, guidance, DDIMScheduler.step
    gen = torch.Generator().manual_seed(5)
    x = torch.randn((3, 8), generator=gen)
    scheduler = DDIMScheduler(**scheduler_kwargs(refiner.config))
    scheduler.set_timesteps(20)
    keep, drop = torch.zeros(3, dtype=torch.bool), torch.ones(3, dtype=torch.bool)
    with torch.no_grad():
        for t in scheduler.timesteps:
            tt = t.repeat(3)
            out_cond, out_null = refiner.denoiser(x, tt, cond, keep), refiner.denoiser(x, tt, cond, drop)
            x = scheduler.step(out_null + w * (out_cond - out_null), t, x).prev_sample
    torch.testing.assert_close(got, x.clamp(-1, 1), atol=1e-4, rtol=1e-4)
    assert not got.requires_grad


@pytest.mark.parametrize(("w", "branches"), [(1.5, 2), (1.0, 1), (0.0, 1)])
def test_sample_makes_one_network_call_per_step(w, branches):
    refiner = make_refiner(8, 3)
    calls = []
    inner = refiner.denoiser.guided_fn

    def counting_fn(t_embs, c_emb, weights):
        fn = inner(t_embs, c_emb, weights)

        def guided(i, x):
            calls.append(c_emb.shape[0])
            return fn(i, x)

        return guided

    refiner.denoiser.guided_fn = counting_fn
    action = refiner.sample(torch.randn(4, 3), torch.Generator().manual_seed(0), guidance_scale=w, steps=7)
    assert calls == [branches] * 7
    # the action is an ordinary tensor: a critic can be trained on it
    critic = MLPCritic(3, 8, hidden=8, members=2)
    critic.fit(torch.zeros(4, 3), action, torch.zeros(4))
    assert critic.members[0][0].weight.grad is not None


@pytest.mark.parametrize("blocks", [1, 2])
@pytest.mark.parametrize("weights", [[1.0], [1.5, -0.5], [3.0, -2.0]])
def test_mlp_fused_guidance_matches_separate_branches(weights, blocks):
    torch.manual_seed(0)
    denoiser = MLPDenoiser(8, 5, hidden=32, blocks=blocks, time_embed_dim=16)
    for p in denoiser.parameters():  # away from the initialisation, so every weight and bias matters
        p.data.add_(0.3 * torch.randn_like(p))
    k, batch = len(weights), 3
    cond = torch.randn(batch, 5)
    null = torch.tensor([False, True][:k]).repeat_interleave(batch)
    c_emb = denoiser.embed_cond(cond.repeat(k, 1), null).reshape(k, batch, -1)
    t_embs = denoiser.embed_time(torch.tensor([90, 40, 0]))
    fused = denoiser.guided_fn(t_embs, c_emb, weights)
    for i, t in enumerate([90, 40, 0]):
        x = torch.randn(batch, 8)
        branches = [denoiser(x, torch.full((batch,), t), cond, torch.full((batch,), bool(j))) for j in range(k)]
        expected = sum(w * out for w, out in zip(weights, branches, strict=True))
        torch.testing.assert_close(fused(i, x), expected, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(Denoiser.guided_fn(denoiser, t_embs, c_emb, weights)(i, x), expected,
                                   atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("denoiser", ["mlp", "unet"])
def test_sampler_cache_follows_every_weight_change(denoiser):
    refiner, other = make_refiner(8, 3, denoiser=denoiser, guidance_scale=1.5), make_refiner(8, 3, seed=1,
                                                                                          denoiser=denoiser)
    cond = torch.randn(2, 3)

    def sample(r):
        return r.sample(cond, torch.Generator().manual_seed(4))

    first = sample(refiner)
    assert torch.equal(sample(refiner), first)  # served from the cache, same result
    refiner.denoiser.load_state_dict(other.denoiser.state_dict())
    assert torch.equal(sample(refiner), sample(make_refiner(8, 3, seed=1, denoiser=denoiser,
                                                            guidance_scale=1.5)))
    before = sample(refiner)
    train(refiner, three_targets, steps=1)  # one optimiser step
    fresh = make_refiner(8, 3, denoiser=denoiser, guidance_scale=1.5)
    fresh.denoiser.load_state_dict(refiner.denoiser.state_dict())
    after = sample(refiner)
    assert not torch.equal(after, before)
    torch.testing.assert_close(after, sample(fresh), atol=0, rtol=0)


def test_guidance_weights_must_sum_to_one():
    denoiser = MLPDenoiser(8, 5, hidden=32, time_embed_dim=16)
    c_emb = torch.zeros(2, 1, 32)
    with pytest.raises(ValueError, match="summing to 1"):
        denoiser.guided_fn(denoiser.embed_time(torch.tensor([3])), c_emb, [1.5, 0.5])


@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("prediction", PREDICTIONS)
def test_refiner_reproduces_conditional_targets(prediction, schedule):
    refiner = make_refiner(8, 3, prediction_type=prediction, beta_schedule=schedule)
    train(refiner, three_targets, steps=300)
    samples = refiner.sample(CONDS.repeat_interleave(8, 0), torch.Generator().manual_seed(1))
    error = (samples - TARGETS.repeat_interleave(8, 0)).abs().mean().item()
    assert error < 0.1, error  # the targets are 0.6 to 1.2 apart per entry


@pytest.mark.parametrize("denoiser", ["mlp", "unet"])
def test_ddpm_sampler_and_unet_reproduce_targets(denoiser):
    overrides = {"sampler": "ddpm"} if denoiser == "mlp" else {"denoiser": "unet", "unet_depth": 2, "hidden": 32,
                                                               "unet_channels": 16, "unet_max_channels": 32}
    refiner = make_refiner(8, 3, **overrides)
    train(refiner, three_targets, steps=300)
    samples = refiner.sample(CONDS.repeat_interleave(8, 0), torch.Generator().manual_seed(1))
    error = (samples - TARGETS.repeat_interleave(8, 0)).abs().mean().item()
    assert error < 0.1, error


def test_guidance_scale_moves_samples_along_the_condition():
    # Two overlapping Gaussian conditionals N(±0.15·1, 0.3²) in D = 4; the unconditional is their mixture (mean 0).
    mean = torch.full((4,), 0.15)

    def data(gen):
        sign = torch.randint(0, 2, (128,), generator=gen)
        x0 = (2 * sign[:, None] - 1) * mean + 0.3 * torch.randn(128, 4, generator=gen)
        return x0, torch.nn.functional.one_hot(sign, 2).float()

    refiner = make_refiner(4, 2, cond_drop_prob=0.3)
    train(refiner, data, steps=400)
    cond = torch.tensor([[0.0, 1.0]]).repeat(800, 1)  # the +0.15 component
    direction = mean / mean.norm()

    def projection(w):
        return (refiner.sample(cond, torch.Generator().manual_seed(2), guidance_scale=w) @ direction).mean().item()

    p0, p1, p3 = projection(0.0), projection(1.0), projection(3.0)
    # Gaussian fixed points of the guided score: 0 at w=0 (the mixture), 0.3 at w=1, ≈0.45 at w=3
    assert abs(p0) < 0.1, p0
    assert p1 > p0 + 0.1, (p0, p1)
    assert p3 > p1 + 0.1, (p1, p3)


def two_gaussians(gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    sign = torch.randint(0, 2, (128,), generator=gen)
    x0 = (2 * sign[:, None] - 1) * 0.2 + 0.2 * torch.randn(128, 4, generator=gen)
    return x0, torch.nn.functional.one_hot(sign, 2).float()


@pytest.mark.parametrize("prediction", PREDICTIONS)
def test_kappa_moves_samples_toward_higher_reward(prediction):
    cond = torch.eye(2).repeat(200, 1)
    means = []
    for kappa in (0.0, 1.0):
        refiner = make_refiner(4, 2, prediction_type=prediction)
        train(refiner, two_gaussians, steps=200, reward_fn=lambda x0: -x0.mean(-1), kappa=kappa)
        means.append(refiner.sample(cond, torch.Generator().manual_seed(3)).mean().item())
    assert means[1] < means[0] - 0.05, means


def test_critic_term_pulls_samples_toward_the_critics_optimum():
    def critic(a):  # a differentiable stand-in for a fitted Q(s, a), best at a = 0.5
        return -((a - 0.5) ** 2).sum(-1)

    cond = torch.eye(2).repeat(200, 1)
    distances = []
    for kappa in (0.0, 1.0):
        refiner = make_refiner(4, 2)
        train(refiner, two_gaussians, steps=150, reward_fn=critic, kappa=kappa)
        distances.append((refiner.sample(cond, torch.Generator().manual_seed(3)) - 0.5).abs().mean().item())
    assert distances[1] < distances[0] - 0.05, distances


def test_loss_metrics_and_pure_denoising_without_reward():
    refiner = make_refiner(8, 3)
    x0, cond = three_targets(torch.Generator().manual_seed(0))
    loss, metrics = refiner.loss(x0, cond, torch.Generator().manual_seed(1))
    assert set(metrics) == {"denoise_loss", "loss"} and metrics["loss"] == pytest.approx(metrics["denoise_loss"])
    loss, metrics = refiner.loss(x0, cond, torch.Generator().manual_seed(1), reward_fn=lambda x: -x.mean(-1))
    assert "reward_term" in metrics and metrics["loss"] != pytest.approx(metrics["denoise_loss"])
    loss.backward()
    assert all(p.grad is not None for p in refiner.denoiser.cond_mlp.parameters())


def test_row_weights_make_the_refiner_reproduce_the_weighted_rows():
    # Two actions under one condition; weights favour the second 9:1, so samples land near it.
    a, b = torch.full((4,), -0.5), torch.full((4,), 0.5)

    def data(gen):
        pick = torch.randint(0, 2, (128,), generator=gen)
        return torch.where(pick[:, None] == 1, b, a), torch.ones(128, 1)

    def weighted(refiner, steps, gen):
        for _ in range(steps):
            x0, cond = data(gen)
            weights = torch.where((x0[:, 0] > 0), 9.0, 1.0)
            refiner.update(x0, cond, gen, weights=weights)

    refiner = make_refiner(4, 1)
    weighted(refiner, 300, torch.Generator().manual_seed(0))
    samples = refiner.sample(torch.ones(400, 1), torch.Generator().manual_seed(1))
    share_b = (samples.mean(-1) > 0).float().mean().item()
    assert share_b > 0.75, share_b  # unweighted it would be ~0.5


def test_refining_from_a_start_keeps_it_and_needs_the_levels_it_runs():
    # Trained on actions spread over [-1, 1] with no condition signal, samples refined from a start follow the
    # start (correlated with it), samples from pure noise do not: the coarse action reaches the result.
    def data(gen):
        return torch.rand(128, 6, generator=gen) * 1.6 - 0.8, torch.zeros(128, 1)

    refiner = make_refiner(6, 1, start_strength=0.2)
    assert refiner.max_train_timestep() < refiner.config.train_timesteps // 2
    train(refiner, data, steps=200)
    start = torch.rand(64, 6, generator=torch.Generator().manual_seed(5)) * 1.6 - 0.8
    refined = refiner.sample(torch.zeros(64, 1), torch.Generator().manual_seed(2), start=start)
    free = refiner.sample(torch.zeros(64, 1), torch.Generator().manual_seed(2))
    def correlation(x):
        return torch.corrcoef(torch.stack([x.flatten(), start.flatten()]))[0, 1].item()

    assert correlation(refined) > 0.5 and abs(correlation(free)) < 0.15, (correlation(refined), correlation(free))
    assert make_refiner(6, 1).max_train_timestep() == 99  # strength 1 trains every level


@settings(max_examples=200, deadline=None)
@given(arrays(np.float64, st.integers(1, 40), elements=st.floats(allow_nan=True, allow_infinity=True)),
       st.integers(1, 512))
def test_decode_ranks_always_gives_valid_integer_ranks(x, r_max):
    ranks = decode_ranks(torch.from_numpy(x)[None], r_max)
    assert ranks.dtype == torch.long and ranks.shape == (1, len(x))
    assert bool(((ranks >= 0) & (ranks <= r_max)).all())


@settings(max_examples=100, deadline=None)
@given(st.integers(1, 256), st.lists(st.integers(0, 10**6), min_size=1, max_size=60))
def test_encode_decode_round_trip(r_max, raw):
    ranks = torch.tensor([v % (r_max + 1) for v in raw])[None]
    encoded = encode_ranks(ranks, r_max)
    assert bool(((encoded > -1) & (encoded < 1)).all())
    assert torch.equal(decode_ranks(encoded, r_max), ranks)


def test_decode_ranks_ends_and_monotone():
    x = torch.linspace(-1.5, 1.5, 1001)[None]
    ranks = decode_ranks(x, 8)
    assert ranks[0, 0] == 0 and ranks[0, -1] == 8
    assert bool((ranks.diff() >= 0).all()) and set(ranks.unique().tolist()) == set(range(9))
    assert decode_ranks(torch.tensor([[float("nan")]]), 8).item() == 0


@pytest.mark.parametrize(("action_dim", "levels"), [(1, 1), (36, 6), (144, 6)])
def test_unet_shapes_gradients_and_broadcast(action_dim, levels):
    torch.manual_seed(0)
    net = UNet1DDenoiser(action_dim, cond_dim=5, hidden=32, depth=6, kernel=3, channels=8, time_embed_dim=16)
    assert net.levels == levels and net.padded_dim % 2 ** levels == 0 and net.padded_dim >= action_dim
    x = torch.randn(3, action_dim, requires_grad=True)
    t, cond = torch.tensor([0, 50, 99]), torch.randn(3, 5)
    out = net(x, t, cond, torch.tensor([False, True, False]))
    assert out.shape == (3, action_dim)
    out.pow(2).mean().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    missing = [n for n, p in net.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not missing
    assert net.in_conv.weight.grad.abs().sum() > 0 and net.mid.conv.weight.grad.abs().sum() > 0
    assert_branches_broadcast(net, action_dim)


def test_mlp_denoiser_branches_broadcast():
    torch.manual_seed(0)
    assert_branches_broadcast(MLPDenoiser(36, cond_dim=5, hidden=32, blocks=2, time_embed_dim=16), 36)


def assert_branches_broadcast(net, action_dim):
    # denoise(x (B, D), t_emb (E,), c_emb (K, B, E)) equals the stacked (K·B) computation
    with torch.no_grad():
        x, cond = torch.randn(2, action_dim), torch.randn(2, 5)
        t_emb = net.embed_time(torch.tensor([7]))[0]
        null_mask = torch.tensor([False, False, True, True])
        c_emb = net.embed_cond(cond.repeat(2, 1), null_mask).reshape(2, 2, -1)
        branched = net.denoise(x, t_emb, c_emb)
        stacked = net(x.repeat(2, 1), torch.tensor([7] * 4), cond.repeat(2, 1), null_mask)
    torch.testing.assert_close(branched, stacked.reshape(2, 2, action_dim), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(("field", "value"), [("beta_schedule", "cosine"), ("prediction_type", "x0"),
                                              ("sampler", "dpm"), ("denoiser", "transformer"), ("unet_kernel", 4),
                                              ("train_timesteps", 10), ("inference_steps", 2000),
                                              ("cond_drop_prob", 1.0), ("kappa", -0.1)])
def test_config_rejects_bad_values(field, value):
    with pytest.raises(AirloraError, match=f"diffusion.{field}"):
        DiffusionConfig(**{field: value})


def test_config_names_allowed_values_and_guidance_needs_dropout():
    with pytest.raises(AirloraError, match="'linear', 'squaredcos_cap_v2', 'scaled_linear'"):
        DiffusionConfig(beta_schedule="cosine")
    with pytest.raises(AirloraError, match="diffusion.guidance_scale"):
        DiffusionConfig(cond_drop_prob=0.0, guidance_scale=2.0)
    DiffusionConfig(cond_drop_prob=0.0, guidance_scale=1.0)
