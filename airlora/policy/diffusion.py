"""The diffusion refiner (paper §IV-B): conditional DDIM over the normalised rank vector with classifier-free guidance.

Dimension letters: B batch, D action dim (6L), C condition dim (state S + coarse action A), N reverse steps.
Ranks 0..r_max live in the normalised space [-1, 1] (`encode_ranks` / `decode_ranks`, paper Eq. 18); the
schedulers are diffusers' `DDIMScheduler` (sampling) and `DDPMScheduler` (the PPO+DDPM ablation).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import torch
from diffusers import DDIMScheduler, DDPMScheduler
from torch import Tensor, nn

from airlora.policy.config import DiffusionConfig
from airlora.policy.denoisers import Denoiser, MLPDenoiser, UNet1DDenoiser


def encode_ranks(ranks: Tensor, r_max: int) -> Tensor:
    """Ranks 0..r_max -> the centre of each rank's bin in [-1, 1], the training target x0: (B, D) -> (B, D) float."""
    return (ranks.to(torch.float32) + 0.5) / (r_max + 1) * 2 - 1


def decode_ranks(x: Tensor, r_max: int) -> Tensor:
    """Normalised actions -> integer ranks clip(floor((x + 1)/2·(r_max + 1)), 0, r_max) (paper Eq. 18): (B, D) long.

    Any input gives valid ranks: NaN decodes to 0 (send nothing) and ±inf to the ends of the range.
    """
    x = torch.nan_to_num(x.to(torch.float32), nan=-1.0, posinf=1.0, neginf=-1.0).clamp(-1.0, 1.0)
    return torch.floor((x + 1) / 2 * (r_max + 1)).long().clamp(0, r_max)


def make_denoiser(config: DiffusionConfig, action_dim: int, cond_dim: int) -> Denoiser:
    """The noise network named by `config.denoiser`, sized by the config."""
    if config.denoiser == "unet":
        return UNet1DDenoiser(action_dim, cond_dim, config.hidden, config.unet_depth, config.unet_kernel,
                              config.unet_channels, config.unet_max_channels, config.time_embed_dim)
    return MLPDenoiser(action_dim, cond_dim, config.hidden, config.mlp_blocks, config.time_embed_dim)


def scheduler_kwargs(config: DiffusionConfig) -> dict[str, Any]:
    """Arguments shared by the DDIM and DDPM schedulers of a config.

    Linear and scaled-linear betas are diffusers' 1000-step defaults scaled by 1000/T (as improved-DDPM does), so
    that T = 600, 800 or 1000 span the same noise range and x_T is close to N(0, I) for any T; unscaled, a
    100-step linear schedule would end at ᾱ_T ≈ 0.37, far from the pure noise the sampler starts from.
    `clip_sample` bounds x̂0 to [-1, 1], the support of the encoded ranks: any x̂0 outside it is a model error,
    and clipping keeps guided (w > 1) predictions from overshooting at high noise; decoding clips anyway.
    """
    T = config.train_timesteps
    kwargs: dict[str, Any] = {"num_train_timesteps": T, "beta_schedule": config.beta_schedule,
                              "prediction_type": config.prediction_type, "clip_sample": config.clip_sample,
                              "clip_sample_range": 1.0}
    if config.beta_schedule == "linear":
        kwargs.update(beta_start=1e-4 * 1000 / T, beta_end=0.02 * 1000 / T)
    elif config.beta_schedule == "scaled_linear":
        kwargs.update(beta_start=0.00085 * 1000 / T, beta_end=0.012 * 1000 / T)
    return kwargs


class DDIMCoefficients(NamedTuple):
    """Per-step numbers of a DDIM reverse step: √ᾱ_τ, √(1−ᾱ_τ), √ᾱ_prev, √(1−ᾱ_prev) as 0-dim float32 tensors.

    `ratio` is √ᾱ_prev/√ᾱ_τ, and `scalars` (√ᾱ_τ, √(1−ᾱ_τ), √(1−ᾱ_prev)) the same numbers as Python floats
    for the ops that take them as scalar arguments (`add`'s alpha, `clamp`'s bounds); a multiplier is cheaper as
    a 0-dim tensor, because a Python float factor is wrapped into a tensor at every call.
    """

    a: Tensor
    b: Tensor
    a_prev: Tensor
    b_prev: Tensor
    ratio: Tensor
    scalars: tuple[float, float, float]


def ddim_coefficients(scheduler: DDIMScheduler, steps: int) -> tuple[Tensor, list[DDIMCoefficients]]:
    """The timesteps of `scheduler.set_timesteps(steps)` and the coefficients of each eta = 0 step.

    `DDIMScheduler.step` costs tens of microseconds of Python and tensor indexing per call, as much as the network
    itself at this size, so the sampler applies the update with numbers read once from the scheduler's own
    `timesteps` and `alphas_cumprod`, with its rules prev = τ − T // N and ᾱ_prev = final_alpha_cumprod below 0.
    """
    scheduler.set_timesteps(steps)
    alphas, stride = scheduler.alphas_cumprod, scheduler.config.num_train_timesteps // steps
    table = []
    for t in scheduler.timesteps.tolist():
        ab = alphas[t]
        ab_prev = alphas[t - stride] if t - stride >= 0 else scheduler.final_alpha_cumprod.to(alphas.dtype)
        a, b, a_prev, b_prev = ab.sqrt(), (1 - ab).sqrt(), ab_prev.sqrt(), (1 - ab_prev).sqrt()
        table.append(DDIMCoefficients(a, b, a_prev, b_prev, a_prev / a, (a.item(), b.item(), b_prev.item())))
    return scheduler.timesteps.clone(), table


def ddim_step(model_output: Tensor, sample: Tensor, coefficients: DDIMCoefficients, prediction_type: str,
              clip_sample: bool) -> Tensor:
    """x_{τ−1} = √ᾱ_prev·x̂0 + √(1−ᾱ_prev)·ε̂ (paper Eq. 17 with σ = 0), as `DDIMScheduler.step` with eta 0."""
    a, b, a_prev, b_prev, ratio, (a_f, b_f, b_prev_f) = coefficients
    if prediction_type == "epsilon":  # the default, in four ops: with y = a·x̂0 = x − b·ε,
        # clipping x̂0 to [−1, 1] is clipping y to [−a, a], and a_prev·x̂0 + b_prev·ε = (a_prev/a)·y + b_prev·ε
        y = torch.add(sample, model_output, alpha=-b_f)
        if clip_sample:
            y = y.clamp_(-a_f, a_f)
        return y.mul_(ratio).add_(model_output, alpha=b_prev_f)
    # addcmul(u, v, c, value=s) = u + s·c·v saves an op per product; at this size ops, not flops, cost time.
    # 1. predicted x̂0 and ε̂ from the network output (ε, v or x0); ε̂ from the unclipped x̂0, as diffusers does
    if prediction_type == "v_prediction":
        x0_hat = torch.addcmul(a * sample, model_output, b, value=-1)  # a·x − b·v
        eps_hat = torch.addcmul(a * model_output, sample, b)  # a·v + b·x
    else:
        x0_hat, eps_hat = model_output, torch.addcmul(sample, model_output, a, value=-1).div_(b)  # (x − a·x0)/b
    # 2. clip x̂0 to the action range (clip_sample)
    if clip_sample:
        x0_hat = x0_hat.clamp(-1.0, 1.0)
    # 3. deterministic DDIM update: a_prev·x̂0 + b_prev·ε̂
    return torch.addcmul(a_prev * x0_hat, eps_hat, b_prev)


class DiffusionRefiner(nn.Module):
    """Refines (state, coarse action) into a rank vector: f_ψ plus schedulers, with `loss`, `update` and `sample`.

    The condition is concat[state, coarse_action] (B, C), built by the caller; the refiner owns an AdamW optimiser
    over the denoiser (lr `config.lr`) for `update`.
    """

    def __init__(self, denoiser: Denoiser, config: DiffusionConfig | None = None, action_dim: int | None = None):
        super().__init__()
        self.config = config or DiffusionConfig()
        self.denoiser = denoiser
        self.action_dim = action_dim if action_dim is not None else denoiser.action_dim
        if self.action_dim != denoiser.action_dim:
            raise ValueError(f"action_dim {self.action_dim} differs from the denoiser's {denoiser.action_dim}")
        kwargs = scheduler_kwargs(self.config)
        self.ddim = DDIMScheduler(**kwargs)
        self.ddpm = DDPMScheduler(**kwargs)
        self.register_buffer("alphas_cumprod", self.ddim.alphas_cumprod.clone(), persistent=False)  # (T,) ᾱ_τ
        self.optimizer = torch.optim.AdamW(self.denoiser.parameters(), lr=self.config.lr)
        self._ddim_tables: dict[int, tuple[Tensor, list[DDIMCoefficients]]] = {}  # steps -> schedule, cached

    encode_ranks = staticmethod(encode_ranks)
    decode_ranks = staticmethod(decode_ranks)

    def start_index(self, steps: int | None = None) -> int:
        """Index of the first reverse step run when sampling starts from a given action (``config.start_strength``)."""
        steps = self.config.inference_steps if steps is None else steps
        return steps - max(1, round(steps * self.config.start_strength))

    def max_train_timestep(self) -> int:
        """Largest noise level the sampler ever starts from, so the only levels worth training (inclusive)."""
        cfg = self.config
        if cfg.start_strength >= 1:
            return cfg.train_timesteps - 1
        steps = cfg.inference_steps
        if cfg.sampler == "ddpm":
            self.ddpm.set_timesteps(steps)
            return int(self.ddpm.timesteps[self.start_index(steps)])
        return int(self._ddim_table(steps)[0][self.start_index(steps)])

    def loss(self, x0: Tensor, cond: Tensor, generator: torch.Generator | None = None,
             reward_fn: Callable[[Tensor], Tensor] | None = None, kappa: float | None = None,
             weights: Tensor | None = None) -> tuple[Tensor, dict[str, float]]:
        """Hybrid loss L = E_w||f_ψ − target||² − κ·E[R̂(x̂0)] (paper Eq. 19); returns (loss, metrics).

        x0 (B, D) in [-1, 1]; cond (B, C); weights (B,) ≥ 0 per row of the denoising term (advantage weights; None
        is uniform). The paper's R_t has no gradient in ψ, so R̂ acts on ψ as in Diffusion-QL, on the one-step x̂0
        of each noised sample (the "action approximation" of Efficient Diffusion Policies) instead of a full
        reverse chain. ``reward_fn(x̂0)`` (B,) is the whole differentiable reward estimate, already in one unit
        (the caller normalises its critic and its exact terms together); rows are weighted by ᾱ_τ. Noise levels are
        drawn up to ``max_train_timestep()``, the levels the sampler uses. Without reward_fn, or κ = 0, the loss is
        pure denoising.
        """
        cfg = self.config
        kappa = cfg.kappa if kappa is None else kappa
        batch = x0.shape[0]
        # 1. τ ~ U{0..τ_max}, ε ~ N(0, I), x_τ = √ᾱ_τ·x0 + √(1−ᾱ_τ)·ε (paper Eq. 14)
        t = torch.randint(0, self.max_train_timestep() + 1, (batch,), generator=generator)
        noise = torch.randn(x0.shape, generator=generator, dtype=x0.dtype)
        x_t = self.ddim.add_noise(x0, noise, t)
        # 2. classifier-free guidance: drop the condition of a random share of rows to the null embedding
        null_mask = torch.rand(batch, generator=generator) < cfg.cond_drop_prob
        pred = self.denoiser(x_t, t, cond, null_mask)  # (B, D)
        # 3. regression target of the prediction type (ε, v = √ᾱ·ε − √(1−ᾱ)·x0, or x0)
        if cfg.prediction_type == "epsilon":
            target = noise
        elif cfg.prediction_type == "v_prediction":
            target = self.ddim.get_velocity(x0, noise, t)
        else:
            target = x0
        per_row = (pred - target).pow(2).mean(-1)  # (B,)
        row_weights = torch.ones(batch) if weights is None else weights.reshape(batch).to(per_row.dtype)
        denoise_loss = (row_weights * per_row).sum() / row_weights.sum().clamp_min(1e-8)
        metrics = {"denoise_loss": float(per_row.detach().mean())}
        loss = denoise_loss
        if kappa > 0 and reward_fn is not None:
            # 4. predicted clean action x̂0 from the prediction (Eq. 14 inverted; the paper's Eq. 16 step)
            alpha_bar = self.alphas_cumprod[t].to(x0.dtype)  # (B,)
            a, b = alpha_bar.sqrt()[:, None], (1 - alpha_bar).sqrt()[:, None]
            if cfg.prediction_type == "epsilon":
                x0_hat = (x_t - b * pred) / a
            elif cfg.prediction_type == "v_prediction":
                x0_hat = a * x_t - b * pred
            else:
                x0_hat = pred
            # 5. rows are weighted by ᾱ_τ = SNR/(1+SNR): x̂0 is a poor estimate of the action at high noise, and
            #    the weight cancels the 1/√ᾱ_τ blow-up of the ε-parameterisation's x̂0 and gradient there
            weight = alpha_bar / alpha_bar.sum()  # (B,)
            reward = reward_fn(x0_hat).reshape(batch)
            reward_term = (weight * reward).sum()
            loss = loss - kappa * reward_term
            metrics["reward_term"] = reward_term.item()
        metrics["loss"] = loss.item()
        return loss, metrics

    def update(self, x0: Tensor, cond: Tensor, generator: torch.Generator | None = None,
               reward_fn: Callable[[Tensor], Tensor] | None = None, kappa: float | None = None,
               weights: Tensor | None = None) -> dict[str, float]:
        """One AdamW step of the denoiser on `loss` (Algorithm 1, lines 18-20); nothing else is updated."""
        loss, metrics = self.loss(x0, cond, generator, reward_fn, kappa, weights)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        metrics["grad_norm"] = nn.utils.clip_grad_norm_(self.denoiser.parameters(), self.config.max_grad_norm).item()
        self.optimizer.step()
        return metrics

    def sample(self, cond: Tensor, generator: torch.Generator | None = None, guidance_scale: float | None = None,
               steps: int | None = None, start: Tensor | None = None) -> Tensor:
        """Refined actions in [-1, 1]: (B, C) -> (B, D), guided = uncond + w·(cond − uncond) at every step.

        With ``start`` (B, D), the coarse action to refine (SDEdit, Meng et al. 2022): it is noised to the level of
        reverse step ``start_index`` (``config.start_strength`` of the chain) and only the rest of the chain runs,
        so the result stays near it and cannot ignore it. Without it, or at strength 1, x_T ~ N(0, I) (the paper).
        w = 1 runs the conditional branch only, w = 0 the unconditional one; otherwise both branches go through
        the network in one batched call per step. Noise comes from `generator`. Runs without autograd.
        """
        cfg = self.config
        w = cfg.guidance_scale if guidance_scale is None else float(guidance_scale)
        steps = cfg.inference_steps if steps is None else steps
        if not 1 <= steps <= cfg.train_timesteps:
            raise ValueError(f"steps must be in [1, {cfg.train_timesteps}], got {steps}")
        with torch.inference_mode():
            x = self._reverse_process(cond, generator, w, steps, start)
        # An inference tensor cannot be saved for backward; the caller may train a critic on this action.
        return x.clone()

    def _ddim_table(self, steps: int) -> tuple[Tensor, list[DDIMCoefficients]]:
        if steps not in self._ddim_tables:
            self._ddim_tables[steps] = ddim_coefficients(self.ddim, steps)
        return self._ddim_tables[steps]

    def _reverse_process(self, cond: Tensor, generator: torch.Generator | None, w: float, steps: int,
                         start: Tensor | None) -> Tensor:
        cfg = self.config
        batch = cond.shape[0]
        # 1. x_T ~ N(0, I), or the coarse action noised to the first level the chain runs from
        x = torch.randn((batch, self.action_dim), generator=generator, dtype=cond.dtype)  # (B, D)
        first = 0 if start is None or cfg.start_strength >= 1 else self.start_index(steps)
        # 2. condition embeddings once per decision: branch 0 conditional, branch 1 null (K, B, E)
        null_branches = [False] if w == 1 else [True] if w == 0 else [False, True]
        k = len(null_branches)
        null_mask = torch.tensor(null_branches).repeat_interleave(batch)  # (K·B,)
        c_emb = self.denoiser.embed_cond(cond.repeat(k, 1), null_mask).reshape(k, batch, -1)
        if cfg.sampler == "ddpm":
            self.ddpm.set_timesteps(steps)
            timesteps = self.ddpm.timesteps
        else:
            timesteps, table = self._ddim_table(steps)
        if first > 0:
            t0 = timesteps[first:first + 1]
            x = self.ddim.add_noise(start.to(x.dtype).clamp(-1.0, 1.0), x, t0.expand(batch))
        # 3. the guided network uncond + w·(cond − uncond) = w·cond + (1 − w)·null, both branches in one call
        weights = [1.0] if k == 1 else [w, 1.0 - w]
        t_embs = self.denoiser.cached(("embed_time", cfg.sampler, steps), lambda: self.denoiser.embed_time(timesteps))
        guided = self.denoiser.guided_fn(t_embs, c_emb, weights)
        for i in range(first, len(timesteps)):
            out = guided(i, x)  # (B, D)
            # 4. reverse step (paper Eq. 17)
            if cfg.sampler == "ddpm":
                x = self.ddpm.step(out, timesteps[i], x, generator=generator).prev_sample
            else:
                x = ddim_step(out, x, table[i], cfg.prediction_type, cfg.clip_sample)
        return x.clamp(-1.0, 1.0)
