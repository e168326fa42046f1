"""The coarse agent (paper §IV-A, Eq. 12): a Gaussian actor-critic MLP trained with clipped PPO and GAE.

In the hierarchy the actor outputs a continuous coarse latent a_out (the paper drops PPO's softmax over ranks)
and the diffusion refiner turns it into ranks; the PPO-only baseline keeps the softmax, one categorical head over
0..r_max per module. Dimension letters: B batch, T rollout steps, N parallel rollouts, S state dim,
A coarse-action dim.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from airlora.policy.config import PPOConfig

_LOG_SQRT_2PI = 0.5 * math.log(2 * math.pi)


def compute_gae(
    rewards: Tensor | np.ndarray,
    values: Tensor | np.ndarray,
    dones: Tensor | np.ndarray,
    last_value: Tensor | np.ndarray | float,
    gamma: float,
    gae_lambda: float,
) -> tuple[Tensor, Tensor]:
    """Generalised advantage estimates and their returns (Schulman et al. 2016) over one rollout.

    rewards, values, dones: (T,) or (T, N); last_value: () or (N,), the value V(s_T) of the state after the last
    step. dones[t] = 1 means the episode ended with transition t: nothing after it is bootstrapped into t.
    Returns (advantages, returns), both shaped like rewards, with returns = advantages + values.
    """
    rewards = torch.as_tensor(rewards)
    if not rewards.is_floating_point():
        rewards = rewards.to(torch.get_default_dtype())
    values = torch.as_tensor(values, dtype=rewards.dtype)
    live = 1.0 - torch.as_tensor(dones, dtype=rewards.dtype)  # (T, ...) 1 while the episode goes on
    next_value = torch.as_tensor(last_value, dtype=rewards.dtype).expand_as(values[0])
    if rewards.shape != values.shape or live.shape != values.shape:
        raise ValueError(f"rewards {tuple(rewards.shape)}, values {tuple(values.shape)} and dones "
                         f"{tuple(live.shape)} must have the same shape")
    advantages = torch.zeros_like(rewards)
    running = torch.zeros_like(next_value)
    for t in reversed(range(rewards.shape[0])):
        # 1. TD error δ_t = r_t + γ·V(s_{t+1})·(1 − done_t) − V(s_t)
        delta = rewards[t] + gamma * next_value * live[t] - values[t]
        # 2. Â_t = δ_t + γ·λ·(1 − done_t)·Â_{t+1}
        running = delta + gamma * gae_lambda * live[t] * running
        advantages[t] = running
        next_value = values[t]
    return advantages, advantages + values


def _layer(n_in: int, n_out: int, std: float = math.sqrt(2)) -> nn.Linear:
    # Orthogonal weights with gain sqrt(2) for hidden layers and zero biases, as in CleanRL's layer_init.
    layer = nn.Linear(n_in, n_out)
    nn.init.orthogonal_(layer.weight, std)
    nn.init.zeros_(layer.bias)
    return layer


def _mlp(n_in: int, hidden: int, layers: int, n_out: int, out_std: float) -> nn.Sequential:
    mods: list[nn.Module] = []
    for i in range(layers):
        mods += [_layer(n_in if i == 0 else hidden, hidden), nn.Tanh()]
    mods.append(_layer(hidden, n_out, std=out_std))
    return nn.Sequential(*mods)


class ActorCritic(nn.Module):
    """Separate Tanh MLPs for the policy and for V(s).

    Gaussian (``categories`` None): the actor gives the mean of a_out, with a state-independent log-std.
    Categorical (``categories`` = n): the actor gives n logits per action entry, each entry drawn from its own
    softmax (the paper's PPO baseline picks each module's rank from 0..r_max this way).
    """

    def __init__(self, state_dim: int, action_dim: int, hidden: int = 256, layers: int = 2,
                 init_log_std: float = 0.0, categories: int | None = None) -> None:
        super().__init__()
        self.action_dim, self.categories = action_dim, categories
        # Small last-layer gains: the actor starts near a zero mean (or uniform logits), the critic near zero values
        # (CleanRL).
        self.actor_mean = _mlp(state_dim, hidden, layers, action_dim * (categories or 1), out_std=0.01)
        self.critic = _mlp(state_dim, hidden, layers, 1, out_std=1.0)
        self.log_std = nn.Parameter(torch.full((action_dim,), float(init_log_std)), requires_grad=categories is None)

    def value(self, obs: Tensor) -> Tensor:
        """V(s): (B, S) -> (B,)."""
        return self.critic(obs).squeeze(-1)

    def logits(self, obs: Tensor) -> Tensor:
        """Categorical logits: (B, S) -> (B, A, n)."""
        return self.actor_mean(obs).reshape(obs.shape[0], self.action_dim, self.categories)

    def log_prob(self, obs: Tensor, actions: Tensor) -> tuple[Tensor, Tensor]:
        """log π(a|s) and the entropy of π(·|s) per action entry (mean over A): (B, S), (B, A) -> (B,), (B,).

        The entropy is a mean over the entries, not a sum, so the bonus means the same for 6 or 144 modules.
        """
        if self.categories is not None:
            log_p = torch.log_softmax(self.logits(obs), dim=-1)  # (B, A, n)
            chosen = log_p.gather(-1, actions.long()[..., None]).squeeze(-1)  # (B, A)
            entropy = -(log_p.exp() * log_p).sum(-1).mean(-1)
            return chosen.sum(-1), entropy
        mean = self.actor_mean(obs)  # (B, A)
        z = (actions - mean) * torch.exp(-self.log_std)
        log_prob = (-0.5 * z.pow(2) - self.log_std - _LOG_SQRT_2PI).sum(-1)
        entropy = (self.log_std + 0.5 + _LOG_SQRT_2PI).mean().expand(obs.shape[0])
        return log_prob, entropy


class PPO:
    """Clipped-surrogate PPO on a diagonal Gaussian over the coarse action; owns its Adam optimiser.

    Call `act` to collect a rollout, `compute_gae` on it, then `update` once per rollout (Algorithm 1, lines 15-16).
    """

    def __init__(self, state_dim: int, action_dim: int, config: PPOConfig | None = None,
                 categories: int | None = None) -> None:
        self.config = config or PPOConfig()
        self.categories = categories
        self.state_dim = state_dim
        self.coarse_dim = self.config.coarse_dim or action_dim  # A: config.coarse_dim, or the full action dim D
        self.model = ActorCritic(state_dim, self.coarse_dim, self.config.hidden, self.config.layers,
                                 self.config.init_log_std, categories)
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=self.config.lr, eps=1e-5)

    @torch.no_grad()
    def act(self, obs: Tensor, generator: torch.Generator | None = None,
            deterministic: bool = False) -> tuple[Tensor, Tensor, Tensor]:
        """a ~ π(·|s), or its mean or mode when ``deterministic``: (B, S) -> action (B, A), logprob (B,), value (B,).

        Categorical actions are the chosen category of each entry, as floats.
        """
        if self.categories is not None:
            log_p = torch.log_softmax(self.model.logits(obs), dim=-1)  # (B, A, n)
            if deterministic:
                action = log_p.argmax(-1)
            else:
                flat = torch.multinomial(log_p.exp().reshape(-1, self.categories), 1, generator=generator)
                action = flat.reshape(log_p.shape[:-1])
            logprob = log_p.gather(-1, action[..., None]).squeeze(-1).sum(-1)
            return action.to(obs.dtype), logprob, self.model.value(obs)
        mean = self.model.actor_mean(obs)  # (B, A)
        std = self.model.log_std.exp()
        noise = torch.zeros_like(mean) if deterministic else torch.randn(mean.shape, generator=generator,
                                                                         dtype=mean.dtype)
        coarse_action = mean + std * noise
        logprob = (-0.5 * noise.pow(2) - self.model.log_std - _LOG_SQRT_2PI).sum(-1)
        return coarse_action, logprob, self.model.value(obs)

    @torch.no_grad()
    def evaluate(self, obs: Tensor) -> Tensor:
        """V(s) for bootstrapping: (B, S) -> (B,)."""
        return self.model.value(obs)

    def update(self, obs: Tensor, actions: Tensor, logprobs: Tensor, advantages: Tensor, returns: Tensor,
               values: Tensor, generator: torch.Generator | None = None) -> dict[str, float]:
        """Epochs × minibatches of clipped PPO on one rollout; returns mean losses and diagnostics.

        obs (B, S); actions (B, A) as sampled by `act`; logprobs, advantages, returns, values (B,) from the rollout.
        """
        cfg = self.config
        obs, actions = obs.detach(), actions.detach()
        logprobs, advantages, returns, values = (x.detach().reshape(-1) for x in (logprobs, advantages, returns,
                                                                                   values))
        batch = obs.shape[0]
        minibatch = min(cfg.minibatch_size, batch)
        sums = dict.fromkeys(("policy_loss", "value_loss", "entropy", "approx_kl", "clipfrac"), 0.0)
        n = 0
        for _ in range(cfg.update_epochs):
            if cfg.target_kl is not None and n and sums["approx_kl"] / n > cfg.target_kl:
                break  # the policy has moved as far as one update should (CleanRL's target_kl)
            order = torch.randperm(batch, generator=generator)
            for start in range(0, batch, minibatch):
                idx = order[start:start + minibatch]
                new_logprob, entropy = self.model.log_prob(obs[idx], actions[idx])
                new_value = self.model.value(obs[idx])
                log_ratio = new_logprob - logprobs[idx]
                ratio = log_ratio.exp()
                # 1. clipped surrogate on (normalised) advantages (paper Eq. 12)
                adv = advantages[idx]
                if cfg.normalize_advantages and adv.numel() > 1:
                    adv = (adv - adv.mean()) / (adv.std() + 1e-8)
                clipped = ratio.clamp(1 - cfg.clip_coef, 1 + cfg.clip_coef)
                policy_loss = torch.max(-adv * ratio, -adv * clipped).mean()
                # 2. value loss, optionally clipped around the rollout's value estimate
                if cfg.clip_value_loss:
                    v_clipped = values[idx] + (new_value - values[idx]).clamp(-cfg.clip_coef, cfg.clip_coef)
                    value_loss = 0.5 * torch.max((new_value - returns[idx]) ** 2,
                                                 (v_clipped - returns[idx]) ** 2).mean()
                else:
                    value_loss = 0.5 * ((new_value - returns[idx]) ** 2).mean()
                # 3. total loss with entropy bonus; clipped gradient step
                loss = policy_loss + cfg.value_coef * value_loss - cfg.entropy_coef * entropy.mean()
                self.optimizer.zero_grad(set_to_none=True)
                loss.backward()
                nn.utils.clip_grad_norm_(self.model.parameters(), cfg.max_grad_norm)
                self.optimizer.step()
                with torch.no_grad():
                    sums["policy_loss"] += policy_loss.item()
                    sums["value_loss"] += value_loss.item()
                    sums["entropy"] += entropy.mean().item()
                    sums["approx_kl"] += ((ratio - 1) - log_ratio).mean().item()  # k3 estimator, as CleanRL
                    sums["clipfrac"] += ((ratio - 1).abs() > cfg.clip_coef).float().mean().item()
                n += 1
        metrics = {k: v / n for k, v in sums.items()}
        var = returns.var().item() if batch > 1 else float("nan")
        metrics["explained_variance"] = float("nan") if not var > 0 else 1 - (returns - values).var().item() / var
        return metrics

    def state_dict(self) -> dict[str, Any]:
        """Model and optimiser state, for checkpoints."""
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what `state_dict` saved."""
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
