"""Typed configuration of the hierarchical policy: the PPO coarse agent and the diffusion refiner (paper Table II)."""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from typing import Literal

from airlora.validation import _check, _finite, _one_of

DenoiserKind = Literal["mlp", "unet"]
BetaSchedule = Literal["linear", "squaredcos_cap_v2", "scaled_linear"]
PredictionType = Literal["epsilon", "v_prediction", "sample"]
Sampler = Literal["ddim", "ddpm"]


@dataclass
class PPOConfig:
    """The coarse agent: a Gaussian actor-critic trained with clipped PPO and GAE (paper §IV-A, Eq. 12)."""

    hidden: int = 256
    """Width of every hidden layer of the actor and the critic (paper: 256)."""
    layers: int = 2
    """Hidden layers of the actor and of the critic (paper: 2)."""
    gamma: float = 0.95
    """Discount factor γ (paper: 0.95)."""
    gae_lambda: float = 0.95
    """GAE parameter (the paper's ζ; paper: 0.95)."""
    clip_coef: float = 0.2
    """PPO ratio clip ε (paper: 0.2); also the clip range of the value loss when clip_value_loss is on."""
    lr: float = 1e-4
    """Adam learning rate of actor and critic (paper: 1e-4)."""
    value_coef: float = 0.5
    """Weight of the value loss in the total PPO loss."""
    entropy_coef: float = 0.0
    """Weight of the entropy bonus (mean over action entries) in the total PPO loss. 0, as CleanRL's continuous
    PPO: with 0.01 on a bonus summed over 36 entries the std grew (1.00 -> 1.27) instead of narrowing."""
    update_epochs: int = 10
    """Passes over the collected batch per update."""
    minibatch_size: int = 64
    """Transitions per gradient step; a smaller batch is used whole."""
    max_grad_norm: float = 0.5
    """Global gradient-norm clip per step."""
    clip_value_loss: bool = False
    """Clip the value update around the old value estimate by clip_coef. Off: CleanRL clips value steps of
    normalised returns; on raw rewards near −0.5 a 0.2 clip kept the value function from fitting (explained
    variance ~0)."""
    normalize_advantages: bool = True
    """Standardise advantages within each minibatch."""
    target_kl: float | None = 0.02
    """Stop an update's epochs early once the approximate KL to the rollout's policy passes this (CleanRL's
    target_kl); None runs every epoch. Ten epochs on a 15-step episode moved the policy by KL ≈ 0.13 per update
    (clip fraction 0.55), far past the trust region PPO's clip assumes."""
    coarse_dim: int | None = None
    """Size A of the coarse action a_out; None means the full action dim D = 6L (the official code uses 16)."""
    init_log_std: float = -1.2
    """Initial log standard deviation of the Gaussian over the coarse action: e^-1.2 = 0.3 on [-1, 1], about 1.4
    rank bins at r_max 8 (std 1 spread the actions over the whole range and past its ends)."""

    def __post_init__(self) -> None:
        _check(self.hidden >= 1, "ppo.hidden", "an integer >= 1", self.hidden)
        _check(self.layers >= 1, "ppo.layers", "an integer >= 1", self.layers)
        _check(_finite(self.gamma) and 0 <= self.gamma <= 1, "ppo.gamma", "a number in [0, 1]", self.gamma)
        _check(_finite(self.gae_lambda) and 0 <= self.gae_lambda <= 1, "ppo.gae_lambda", "a number in [0, 1]",
               self.gae_lambda)
        _check(_finite(self.clip_coef) and self.clip_coef > 0, "ppo.clip_coef", "a positive number", self.clip_coef)
        _check(_finite(self.lr) and self.lr > 0, "ppo.lr", "a positive number", self.lr)
        _check(_finite(self.value_coef) and self.value_coef >= 0, "ppo.value_coef", "a number >= 0", self.value_coef)
        _check(_finite(self.entropy_coef) and self.entropy_coef >= 0, "ppo.entropy_coef", "a number >= 0",
               self.entropy_coef)
        _check(self.update_epochs >= 1, "ppo.update_epochs", "an integer >= 1", self.update_epochs)
        _check(self.minibatch_size >= 1, "ppo.minibatch_size", "an integer >= 1", self.minibatch_size)
        _check(_finite(self.max_grad_norm) and self.max_grad_norm > 0, "ppo.max_grad_norm", "a positive number",
               self.max_grad_norm)
        _check(self.target_kl is None or (_finite(self.target_kl) and self.target_kl > 0), "ppo.target_kl",
               "null or a positive number", self.target_kl)
        _check(self.coarse_dim is None or self.coarse_dim >= 1, "ppo.coarse_dim", "null or an integer >= 1",
               self.coarse_dim)
        _check(_finite(self.init_log_std) and -20 <= self.init_log_std <= 2, "ppo.init_log_std",
               "a number in [-20, 2]", self.init_log_std)


@dataclass
class DiffusionConfig:
    """The conditional diffusion refiner f_ψ with classifier-free guidance (paper §IV-B, Eqs. 13-19)."""

    denoiser: DenoiserKind = "mlp"
    """Noise network: 'mlp' (residual MLP) or 'unet' (1-D U-Net over the action vector)."""
    hidden: int = 256
    """Width of the MLP denoiser and of the time and condition embeddings (paper: 256)."""
    mlp_blocks: int = 1
    """Residual blocks of the MLP denoiser. 1 (not the paper's 2): a 50-step guided decision then takes 3.7 ms
    instead of 5.4 on one core here, which keeps it under 1 % of a training step; the toy targets of the tests are
    met at the same tolerances."""
    unet_depth: int = 6
    """Down/up levels of the U-Net (paper: 6); capped at ceil(log2 D) so short action vectors still work."""
    unet_kernel: int = 3
    """Convolution kernel size of the U-Net, odd (paper: 3)."""
    unet_channels: int = 32
    """Channels of the U-Net's first level; doubled per level up to unet_max_channels."""
    unet_max_channels: int = 128
    """Most channels of any U-Net level (the paper's doubling per level would reach 1024 at depth 6)."""
    time_embed_dim: int = 128
    """Size of the sinusoidal timestep embedding e_τ (paper Eq. 15)."""
    train_timesteps: int = 1000
    """Diffusion steps T of the training schedule (paper: 600, 800 or 1000)."""
    inference_steps: int = 30
    """Reverse steps T_diff at sampling time (paper: 30, 50 or 100). 30: a decision (8 candidates, half the chain
    from the coarse action) takes ~2.2 ms on one core here instead of ~3.4 ms at 16 candidates and 50 steps, and
    the bandit measured no loss from it."""
    beta_schedule: BetaSchedule = "linear"
    """Noise schedule; 'linear' and 'scaled_linear' betas are scaled by 1000/T so every T spans the same noise range."""
    prediction_type: PredictionType = "epsilon"
    """What f_ψ predicts: the noise ('epsilon'), the velocity ('v_prediction') or x0 ('sample') (paper Table V)."""
    sampler: Sampler = "ddim"
    """Reverse process: deterministic 'ddim' (eta 0, paper Eq. 17) or stochastic 'ddpm' (the PPO+DDPM ablation)."""
    clip_sample: bool = True
    """Clip the predicted x̂0 to the normalised action range [-1, 1] at every reverse step."""
    cond_drop_prob: float = 0.1
    """Probability of replacing the condition by the learned null condition in training (classifier-free guidance)."""
    start_strength: float = 0.5
    """Share of the reverse chain run when refining a coarse action: the action is noised to that level and
    denoised from there (SDEdit), so the refined ranks stay near PPO's proposal and PPO's action reaches the
    reward. 1 starts from pure noise, as the paper (the refiner then learned to ignore the coarse action: its
    output followed x_T, variance from the coarse action 2.08 -> 0.05). Variants without a coarse action always
    start from noise."""
    guidance_scale: float = 1.5
    """w in guided = uncond + w·(cond − uncond): 1 is plain conditional, 0 unconditional, > 1 sharpens the condition."""
    lr: float = 5e-5
    """AdamW learning rate of the denoiser (paper: 5e-5)."""
    kappa: float = 0.1
    """κ in the hybrid loss L = E||ε̃ − ε||² − κ·E[R̂] (paper Eq. 19; paper: 0.1)."""
    max_grad_norm: float = 1.0
    """Global gradient-norm clip of each denoiser update."""

    def __post_init__(self) -> None:
        _check(self.denoiser in typing.get_args(DenoiserKind), "diffusion.denoiser", _one_of(DenoiserKind),
               self.denoiser)
        _check(self.hidden >= 8, "diffusion.hidden", "an integer >= 8", self.hidden)
        _check(self.mlp_blocks >= 1, "diffusion.mlp_blocks", "an integer >= 1", self.mlp_blocks)
        _check(1 <= self.unet_depth <= 12, "diffusion.unet_depth", "an integer in [1, 12]", self.unet_depth)
        _check(self.unet_kernel >= 1 and self.unet_kernel % 2 == 1, "diffusion.unet_kernel", "an odd integer >= 1",
               self.unet_kernel)
        _check(self.unet_max_channels >= 1, "diffusion.unet_max_channels", "an integer >= 1",
               self.unet_max_channels)
        _check(1 <= self.unet_channels <= self.unet_max_channels, "diffusion.unet_channels",
               f"an integer in [1, unet_max_channels={self.unet_max_channels}]", self.unet_channels)
        _check(self.time_embed_dim >= 2 and self.time_embed_dim % 2 == 0, "diffusion.time_embed_dim",
               "an even integer >= 2", self.time_embed_dim)
        # Below 50 steps the scaled linear betas exceed 0.4 and the chain is too coarse to be a diffusion.
        _check(50 <= self.train_timesteps <= 100_000, "diffusion.train_timesteps", "an integer in [50, 100000]",
               self.train_timesteps)
        _check(1 <= self.inference_steps <= self.train_timesteps, "diffusion.inference_steps",
               f"an integer in [1, train_timesteps={self.train_timesteps}]", self.inference_steps)
        _check(self.beta_schedule in typing.get_args(BetaSchedule), "diffusion.beta_schedule",
               _one_of(BetaSchedule), self.beta_schedule)
        _check(self.prediction_type in typing.get_args(PredictionType), "diffusion.prediction_type",
               _one_of(PredictionType), self.prediction_type)
        _check(self.sampler in typing.get_args(Sampler), "diffusion.sampler", _one_of(Sampler), self.sampler)
        _check(_finite(self.cond_drop_prob) and 0 <= self.cond_drop_prob < 1, "diffusion.cond_drop_prob",
               "a number in [0, 1)", self.cond_drop_prob)
        _check(_finite(self.start_strength) and 0 < self.start_strength <= 1, "diffusion.start_strength",
               "a number in (0, 1]", self.start_strength)
        _check(_finite(self.guidance_scale) and self.guidance_scale >= 0, "diffusion.guidance_scale",
               "a number >= 0", self.guidance_scale)
        _check(self.guidance_scale == 1 or self.cond_drop_prob > 0, "diffusion.guidance_scale",
               "1 when cond_drop_prob is 0 (the unconditional branch is never trained)", self.guidance_scale)
        _check(_finite(self.lr) and self.lr > 0, "diffusion.lr", "a positive number", self.lr)
        _check(_finite(self.kappa) and self.kappa >= 0, "diffusion.kappa", "a number >= 0", self.kappa)
        _check(_finite(self.max_grad_norm) and self.max_grad_norm > 0, "diffusion.max_grad_norm",
               "a positive number", self.max_grad_norm)


@dataclass
class PretrainConfig:
    """`airlora pretrain-policy`: the policy trained on a loss surrogate calibrated from the model (surrogate.py)."""

    episodes: int = 1000
    """Episodes on the surrogate (the paper trains 1,000; a CPU run has 20–40)."""
    probe_batches: int = 4
    """Training batches whose loss gradient calibrates each module's importance and rank curve."""
    loss_gap: float = 0.25
    """Surrogate loss between no adapter and every module at r_max; sets the rank's worth against λ·η. The default
    is measured on the default model and data: mean training loss of steps 200-299 of a 300-step uniform run at
    15 dB, 0.506 with rank 0 (head only; --t-max-s 0.0001) against 0.255 with rank 8 (test accuracy 0.777 vs
    0.897)."""
    noise_std: float = 0.1
    """σ of the surrogate's loss noise (a real run's batch-to-batch noise is ~0.1)."""
    before_run: bool = False
    """`airlora run` with the airllm allocator first pretrains its own policy on the surrogate (into the run's
    pretrained-policy/ folder, with the run's seed) and trains on from it, as if started with --policy. A sweep
    uses it so every seed pretrains its own policy; ignored when policy.load_path is set. The summary's wall_s
    includes the pretraining; its ``pretrain`` entry has the calibration and pretraining times."""

    def __post_init__(self) -> None:
        _check(self.episodes >= 1, "policy.pretrain.episodes", "an integer >= 1", self.episodes)
        _check(self.probe_batches >= 1, "policy.pretrain.probe_batches", "an integer >= 1", self.probe_batches)
        _check(_finite(self.loss_gap) and self.loss_gap > 0, "policy.pretrain.loss_gap", "a positive number",
               self.loss_gap)
        _check(_finite(self.noise_std) and self.noise_std >= 0, "policy.pretrain.noise_std", "a number >= 0",
               self.noise_std)


PolicyVariant = Literal["ppo", "ddim", "ppo+ddpm", "ppo+ddim-mlp", "ppo+ddim-unet"]
CriticKind = Literal["additive", "mlp"]


@dataclass
class PolicyConfig:
    """The `airllm` allocator: which parts of the hierarchy run (paper Table III) and how they are trained."""

    variant: PolicyVariant = "ppo+ddim-mlp"
    """'ppo' (PPO alone, a categorical head per module), 'ddim' (refiner alone, on the state), 'ppo+ddpm',
    'ppo+ddim-mlp' or 'ppo+ddim-unet'."""
    episode_steps: int = 15
    """Environment steps per episode T_env (paper: 15); PPO and the refiner learn once per episode."""
    refiner_updates: int = 8
    """Gradient steps of the refiner per episode, on minibatches of the shared buffer."""
    refiner_batch: int = 64
    """Transitions per refiner minibatch."""
    buffer_size: int = 4096
    """Capacity of the shared buffer {s, a_out, ã, R} (oldest overwritten first)."""
    critic: CriticKind = "additive"
    """The critic of (state, ranks): 'additive' (Bayesian linear, additive over modules, closed-form posterior) or
    'mlp' (an ensemble of MLPs fitted by SGD); see airlora.policy.critic for why additive is the default."""
    critic_lr: float = 1e-3
    """Adam learning rate of the 'mlp' critic."""
    critic_updates: int = 8
    """Gradient steps of the 'mlp' critic per episode (the additive critic is solved exactly instead)."""
    critic_smoothness: float = 10.0
    """Additive critic: prior precision of the second differences of the shared rank curve, in units of one
    observation (the curve bends only where the data make it)."""
    critic_ridge: float = 1e-2
    """Additive critic: prior precision of each weight, in units of one observation."""
    critic_memory_steps: int | None = None
    """Additive critic: forget old observations with this time constant (in steps); None keeps them all."""
    candidates: int = 8
    """Refined actions sampled per decision (one batched reverse chain); the one the critic scores best is taken.
    Diffusion policies choose among samples by a critic this way (IDQL, Diffusion-QL's evaluation). On the bandit
    at σ = 0.1 (3 seeds, 30 reverse steps) 8 closed 0.46 of the gap by 300 episodes and 0.67 by 1,000, 4 closed
    0.21 and 0.68; 16 (50 steps) 0.33 and 0.57."""
    exploration: Literal["ucb", "thompson"] = "thompson"
    """How training decisions explore through the critic: 'thompson' scores by one draw from the additive critic's
    posterior per decision, 'ucb' by mean + explore_bonus·std (the 'mlp' critic always uses 'ucb'). On the bandit
    at σ = 0.1 (3 seeds, 1,000 episodes) Thompson closed 0.57 ± 0.03 of the gap, UCB 0.49 ± 0.16."""
    explore_bonus: float = 0.5
    """While training, candidates are scored by critic mean + explore_bonus·std (optimism where it knows little)."""
    action_steps: int = 10
    """Gradient steps that move the chosen candidate uphill on the critic's estimate before it is executed (DIPO's
    action gradient); each step is kept only if the estimate improves. 0 executes the candidate as sampled."""
    action_step_size: float = 1.0
    """Largest change of any module's rank in the first action-gradient step (halved after a step that fails)."""
    deliver_candidates: int = 64
    """Candidates of the deterministic delivery decision (fixed noise seed, PPO's mean action)."""
    deliver_pessimism: float = 1.0
    """At delivery, candidates are scored by critic mean − deliver_pessimism·std (no trust outside its data)."""
    prior_steps: int = 500
    """A policy loaded with --policy keeps its critic's knowledge weighted as this many observations, so the
    run's own rewards can correct what was learned elsewhere (e.g. on a calibrated surrogate)."""
    load_path: str | None = None
    """A policy.pt (from an airllm run or `airlora pretrain-policy`) to start from (set by --policy)."""
    ppo: PPOConfig = field(default_factory=PPOConfig)
    """The PPO coarse agent."""
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    """The diffusion refiner; the variant overrides its denoiser and sampler."""
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    """`airlora pretrain-policy`: calibration and surrogate training."""

    def __post_init__(self) -> None:
        _check(self.variant in typing.get_args(PolicyVariant), "policy.variant", _one_of(PolicyVariant), self.variant)
        _check(self.episode_steps >= 2, "policy.episode_steps", "an integer >= 2", self.episode_steps)
        _check(self.refiner_updates >= 1, "policy.refiner_updates", "an integer >= 1", self.refiner_updates)
        _check(self.refiner_batch >= 1, "policy.refiner_batch", "an integer >= 1", self.refiner_batch)
        _check(self.buffer_size >= self.episode_steps, "policy.buffer_size",
               f"an integer >= episode_steps={self.episode_steps}", self.buffer_size)
        _check(self.critic in typing.get_args(CriticKind), "policy.critic", _one_of(CriticKind), self.critic)
        _check(_finite(self.critic_lr) and self.critic_lr > 0, "policy.critic_lr", "a positive number", self.critic_lr)
        _check(self.critic_updates >= 1, "policy.critic_updates", "an integer >= 1", self.critic_updates)
        _check(_finite(self.critic_smoothness) and self.critic_smoothness >= 0, "policy.critic_smoothness",
               "a number >= 0", self.critic_smoothness)
        _check(_finite(self.critic_ridge) and self.critic_ridge > 0, "policy.critic_ridge", "a positive number",
               self.critic_ridge)
        _check(self.critic_memory_steps is None or self.critic_memory_steps >= 2, "policy.critic_memory_steps",
               "null or an integer >= 2", self.critic_memory_steps)
        _check(1 <= self.candidates <= 1024, "policy.candidates", "an integer in [1, 1024]", self.candidates)
        _check(self.exploration in ("ucb", "thompson"), "policy.exploration", "'ucb' or 'thompson'", self.exploration)
        _check(_finite(self.explore_bonus) and self.explore_bonus >= 0, "policy.explore_bonus", "a number >= 0",
               self.explore_bonus)
        _check(0 <= self.action_steps <= 1000, "policy.action_steps", "an integer in [0, 1000]", self.action_steps)
        _check(_finite(self.action_step_size) and self.action_step_size > 0, "policy.action_step_size",
               "a positive number", self.action_step_size)
        _check(1 <= self.deliver_candidates <= 4096, "policy.deliver_candidates", "an integer in [1, 4096]",
               self.deliver_candidates)
        _check(_finite(self.deliver_pessimism) and self.deliver_pessimism >= 0, "policy.deliver_pessimism",
               "a number >= 0", self.deliver_pessimism)
        _check(self.prior_steps >= 1, "policy.prior_steps", "an integer >= 1", self.prior_steps)

    def effective_diffusion(self) -> DiffusionConfig:
        """The diffusion config with the variant's denoiser and sampler applied."""
        changes = {"ppo+ddpm": {"sampler": "ddpm"}, "ppo+ddim-mlp": {"denoiser": "mlp", "sampler": "ddim"},
                   "ppo+ddim-unet": {"denoiser": "unet", "sampler": "ddim"}}.get(self.variant, {})
        return dataclasses.replace(self.diffusion, **changes)
