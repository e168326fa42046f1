"""The hierarchical rank policy without a run around it: PPO proposes, the refiner refines, the critic chooses.

Letters: S state dim (H + D), H = HEAD_FEATURES, A coarse-action dim, D = 6L action dim, K candidates, N buffer.

One decision (paper §IV, Algorithm 1, with the fixes measured on bench/policy_bandit.py):
1. a_out ~ π(·|s) from PPO (its mean at delivery);
2. K refined actions x ~ refiner(cond = [s, a_out], start = a_out) in one batched reverse chain (SDEdit: the chain
   starts from a_out noised part-way, so the refined ranks stay near PPO's proposal);
3. each scored by the critic: Q(s, r̃) + b·std − λ·η(r̃), with r̃ the ranks the budget lets through;
4. the best candidate decoded into ranks; the caller projects them onto the budget exactly.
Learning, once per episode of ``episode_steps`` steps:
- the critic on every executed transition, target y = R + λ·η (the part of the caller's reward that the exact
  −λ·η term does not cover), so critic − λ·η is the caller's own reward whatever it is;
- PPO on the episode with GAE, bootstrapped with V(s_T) of the next decision's state: the episode's end is a
  truncation, not a terminal state (fine-tuning goes on), so learning waits for that next state;
- the refiner on minibatches of the shared buffer with the hybrid loss: denoising of the executed actions, minus
  κ·R̂(x̂0), R̂ = (critic mean − std − λ·η) of the ranks x̂0 would execute, over one scale (the spread of the
  observed rewards), so neither term is rescaled silently and the critic is not trusted where it has no data.

The 'ppo' variant is PPO alone with a categorical head per module; 'ddim' is the refiner alone, on the state.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from airlora.errors import AirloraError
from airlora.policy.config import PolicyConfig
from airlora.policy.critic import AdditiveCritic, MLPCritic
from airlora.policy.diffusion import DiffusionRefiner, decode_ranks, encode_ranks, make_denoiser
from airlora.policy.ppo import PPO, compute_gae
from airlora.state import HEAD_FEATURES

POLICY_FORMAT = "airlora-policy/2"


@dataclass(frozen=True)
class Geometry:
    """The budget as the policy sees it: on-air bits per unit rank of each module, what is always sent, T_max.

    The policy chooses ranks; with several allowed precisions the trainer's joint projection picks them (the highest
    at which the ranks fit, lowered module by module where they do not; ``Budget.project_joint``), so a rank vector
    executes at ``bits_high`` per unit rank while it fits there and fills the budget at lower precisions while it
    fits at ``bits_low``; beyond that its ranks are cut. With one precision the two are the same.
    """

    bits_per_rank: Tensor
    """(D,) float32: on-air bits per unit rank at the highest allowed precision."""
    reserved_bits: float
    """Bits always sent (the task head and the delivery's overhead reserve)."""
    t_max_s: float
    r_max: int
    bits_low: Tensor | None = None
    """(D,) float32: the same at the lowest allowed precision; None means one precision."""

    def executed(self, ranks: Tensor, capacity: Tensor) -> Tensor:
        """The ranks the budget lets through, differentiable: scaled down to fit at the lowest precision when they do
        not (the rank stage of the projection): (B, D) continuous ranks, (B,) capacity bit/s -> (B, D)."""
        low = self.bits_per_rank if self.bits_low is None else self.bits_low
        ranks = ranks.to(low.dtype)
        bits = ranks @ low  # (B,)
        scale = (self._room(capacity) / bits.clamp_min(1e-9)).clamp(max=1.0)
        return ranks * scale[:, None]

    def eta(self, ranks: Tensor, capacity: Tensor) -> Tensor:
        """η = bits / (C·T_max) of (B, D) executed ranks at (B,) capacities -> (B,): at the highest precision while
        they fit there, else the budget filled (the projection lowers precisions until they fit)."""
        used = torch.minimum(ranks.to(self.bits_per_rank.dtype) @ self.bits_per_rank, self._room(capacity))
        return (used + self.reserved_bits) / (capacity.to(used.dtype) * self.t_max_s)

    def _room(self, capacity: Tensor) -> Tensor:
        return (capacity.to(self.bits_per_rank.dtype) * self.t_max_s - self.reserved_bits).clamp_min(0)


def continuous_ranks(x: Tensor, r_max: int) -> Tensor:
    """The normalised action as a continuous rank in [0, r_max], equal to r at the centre of r's bin: (B, D)."""
    return ((x + 1) / 2 * (r_max + 1) - 0.5).clamp(0, r_max)


class RankPolicy:
    """PPO → refiner → critic over the rank vector of D modules (see the module docstring)."""

    def __init__(self, keys: list[str], geometry: Geometry, config: PolicyConfig, reward_lambda: float,
                 seed: int) -> None:
        self.keys, self.geometry, self.config = list(keys), geometry, config
        self.reward_lambda, self.seed, self.r_max = reward_lambda, seed, geometry.r_max
        self.variant = config.variant
        d = len(self.keys)
        s = HEAD_FEATURES + d
        torch.manual_seed(seed)  # network initialisation
        self.ppo = None
        if self.variant == "ppo":
            if config.ppo.coarse_dim not in (None, d):
                raise AirloraError(f"policy.ppo.coarse_dim = {config.ppo.coarse_dim}: the 'ppo' variant acts on the "
                                   f"full rank vector, so it must be null or {d}")
            self.ppo = PPO(s, d, config.ppo, categories=self.r_max + 1)
        elif self.variant != "ddim":
            self.ppo = PPO(s, d, config.ppo)
        a = self.ppo.coarse_dim if self.ppo else 0
        self.refiner = None
        if self.variant != "ppo":
            diffusion = config.effective_diffusion()
            if a not in (0, d) and diffusion.start_strength < 1:
                raise AirloraError(f"policy.ppo.coarse_dim = {a}: refining from the coarse action (diffusion."
                                   f"start_strength {diffusion.start_strength} < 1) needs it in the action space, "
                                   f"so coarse_dim must be null or {d}; or set start_strength 1")
            self.refiner = DiffusionRefiner(make_denoiser(diffusion, d, s + a), diffusion, d)
        self.critic: AdditiveCritic | MLPCritic | None = None
        if self.refiner is not None:
            self.critic = (MLPCritic(s, d, diffusion.hidden, lr=config.critic_lr) if config.critic == "mlp" else
                           AdditiveCritic(HEAD_FEATURES, d, self.r_max, config.critic_smoothness, config.critic_ridge,
                                          config.critic_memory_steps))
        n = config.buffer_size
        self.buffer = {"state": torch.zeros(n, s), "coarse": torch.zeros(n, a), "action": torch.zeros(n, d),
                       "target": torch.zeros(n), "reward": torch.zeros(n), "capacity": torch.zeros(n)}
        self.buffer_len = self.buffer_pos = 0
        self.episode: list[dict[str, Any]] = []
        self.generator = torch.Generator().manual_seed(seed)

    # ----- deciding ---------------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def priced_at(self, geometry: Geometry) -> Iterator[None]:
        """Decide with the ranks priced by ``geometry`` (a precision chosen before the ranks:
        ``airlora.policy.precision``); learning and policy.pt keep the policy's own pricing."""
        saved, self.geometry = self.geometry, geometry
        try:
            yield
        finally:
            self.geometry = saved

    def act(self, state: Tensor, capacity_bps: float, explore: bool = True) -> tuple[list[int], dict[str, Any]]:
        """Ranks for state (S,) at this capacity, and what ``record`` needs later; ``explore`` False is the
        deterministic delivery decision (PPO's mean or mode, a fixed noise seed, pessimistic critic)."""
        cfg = self.config
        generator = self.generator if explore else torch.Generator().manual_seed(self.seed + 7919)
        obs = state[None]  # (1, S)
        coarse, logprob, value = torch.zeros(1, 0), torch.zeros(1), torch.zeros(1)
        if self.ppo is not None:
            coarse, logprob, value = self.ppo.act(obs, generator, deterministic=not explore)
        if self.refiner is None:  # PPO alone: its categorical choice is the rank vector
            ranks = coarse[0].long()
        else:
            k = cfg.candidates if explore else cfg.deliver_candidates
            cond = torch.cat([obs, coarse], dim=1).expand(k, -1)  # (K, C)
            start = coarse.expand(k, -1) if coarse.shape[1] == len(self.keys) else None
            x = self.refiner.sample(cond, generator, start=start)  # (K, D)
            ranks_k = decode_ranks(x, self.r_max)  # (K, D)
            beta = cfg.explore_bonus if explore else -cfg.deliver_pessimism
            weights = None
            if explore and cfg.exploration == "thompson" and isinstance(self.critic, AdditiveCritic):
                weights, beta = self.critic.sample_weights(generator), 0.0  # act as if one posterior draw were true
            score = self.score(obs.expand(k, -1), ranks_k.float(), torch.full((k,), capacity_bps), beta, weights)
            ranks = ranks_k[int(score.argmax())]
            if isinstance(self.critic, AdditiveCritic) and cfg.action_steps:
                ranks = self._improve(ranks, capacity_bps, beta, weights)
        record = {"state": state, "coarse": coarse[0], "logprob": float(logprob[0]), "value": float(value[0]),
                  "capacity": capacity_bps}
        return ranks.tolist(), record

    def _improve(self, ranks: Tensor, capacity_bps: float, beta: float, weights: Tensor | None = None) -> Tensor:
        """The chosen candidate moved uphill on the critic's estimate (DIPO's action gradient), in rank units.

        J(r) = Σ_m v_m(r̃_m) − λ·η(r̃) with v_m the additive critic's per-module values (``module_values``) and r̃
        the ranks the budget lets through (``Geometry.executed``). ``action_steps`` steps of ``action_step_size``
        ranks on the entry of largest gradient, each kept only if J of the rounded ranks improves (the step
        halves otherwise), so the result is never worse by J than the candidate. The gradient is written out
        (J is piecewise linear in r̃): autograd costs ~1 ms a step here, this ~20 µs. (D,) -> (D,) integer ranks.
        """
        cfg, g = self.config, self.geometry
        values = self.critic.module_values(beta, weights)  # (M, G)
        width = float(self.critic.knots[1] - self.critic.knots[0])
        bits = g.bits_per_rank.double().numpy()  # at the highest precision
        low = bits if g.bits_low is None else g.bits_low.double().numpy()  # at the lowest
        room = max(capacity_bps * g.t_max_s - g.reserved_bits, 0.0)
        per_bit = self.reward_lambda / (capacity_bps * g.t_max_s)
        rows = np.arange(values.shape[0])
        top_knot = values.shape[1] - 1

        def objective(r: np.ndarray) -> tuple[float, np.ndarray]:
            used = float(r @ low)
            scale = min(1.0, room / used) if used > 0 else 1.0
            e = r * scale  # executed ranks (Geometry.executed)
            pos = e / width
            k = np.minimum(np.floor(pos).astype(np.int64), top_knot - 1)
            frac = pos - k
            slope = (values[rows, k + 1] - values[rows, k]) / width  # (M,)
            high = float(e @ bits)
            fits_high = high <= room  # η of Geometry.eta: at the highest precision, or the budget filled
            total = float(np.sum(values[rows, k] + frac * width * slope)) - per_bit * (high if fits_high else room)
            grad_e = slope - per_bit * bits if fits_high else slope
            if scale < 1:  # e = r·room/(r·low): ∂e_i/∂r_j = scale·(δ_ij − r_i·low_j/(r·low))
                grad_e = scale * (grad_e - low * float(grad_e @ r) / used)
            return total, grad_e

        current = ranks.double().numpy()
        best = np.round(current)
        best_score, _ = objective(best)
        step = cfg.action_step_size
        for _ in range(cfg.action_steps):
            _, grad = objective(current)
            top = float(np.abs(grad).max())
            if not top > 0:
                break
            trial = np.clip(current + step * grad / top, 0, self.r_max)
            trial_score, _ = objective(np.round(trial))
            if trial_score > best_score:
                current, best, best_score = trial, np.round(trial), trial_score
            else:
                step /= 2
        return torch.from_numpy(best).long()

    def score(self, state: Tensor, ranks: Tensor, capacity: Tensor, beta: float,
              weights: Tensor | None = None) -> Tensor:
        """Estimated reward critic(s, r̃) + β·std − λ·η(r̃) of (B, D) ranks, r̃ what the budget lets through: (B,).

        ``weights``: a posterior draw of the additive critic to score with instead of its mean."""
        executed = self.geometry.executed(ranks, capacity)
        if isinstance(self.critic, AdditiveCritic):
            value = self.critic.estimate(state[:, :HEAD_FEATURES], executed, beta, weights)
        else:
            value = self.critic.estimate(state, encode_ranks(executed, self.r_max), beta)
        return value - self.reward_lambda * self.geometry.eta(executed, capacity)

    # ----- learning ---------------------------------------------------------------------------------------------
    def record(self, decision: dict[str, Any], ranks: list[int], reward: float, eta: float) -> dict[str, float] | None:
        """Store the executed ``ranks`` and the reward of the step ``decision`` made; learn when an episode is
        complete and the next state is known. Returns the learning metrics when it learned."""
        step = {**decision, "reward": reward, "action": encode_ranks(torch.tensor(ranks), self.r_max).float(),
                "target": reward + self.reward_lambda * eta}
        i = self.buffer_pos
        for name in ("state", "coarse", "action", "target", "reward", "capacity"):
            self.buffer[name][i] = step[name] if isinstance(step[name], Tensor) else torch.tensor(step[name])
        self.buffer_pos = (i + 1) % self.config.buffer_size
        self.buffer_len = min(self.buffer_len + 1, self.config.buffer_size)
        if isinstance(self.critic, AdditiveCritic):
            self.critic.update(step["state"][None, :HEAD_FEATURES], torch.tensor(ranks, dtype=torch.float64)[None],
                               torch.tensor([step["target"]]))
        self.episode.append(step)
        if len(self.episode) <= self.config.episode_steps:
            return None
        # the first step of the next episode is in: its value bootstraps the finished episode (truncation)
        finished, self.episode = self.episode[:-1], self.episode[-1:]
        return self.learn(finished, last_value=float(self.episode[0]["value"]))

    def learn(self, episode: list[dict[str, Any]], last_value: float) -> dict[str, float]:
        """Algorithm 1's learning phase on a finished episode: critic, PPO (GAE), then the refiner."""
        pc = self.config
        rewards = torch.tensor([s["reward"] for s in episode])
        row: dict[str, float] = {"steps": len(episode), "mean_reward": float(rewards.mean())}
        if self.critic is not None:
            row.update(self._fit_critic())
        if self.ppo is not None:
            values = torch.tensor([s["value"] for s in episode])
            adv, ret = compute_gae(rewards, values, torch.zeros(len(episode)), last_value, pc.ppo.gamma,
                                   pc.ppo.gae_lambda)
            stats = self.ppo.update(torch.stack([s["state"] for s in episode]),
                                    torch.stack([s["coarse"] for s in episode]),
                                    torch.tensor([s["logprob"] for s in episode]), adv, ret, values, self.generator)
            row.update({f"ppo_{k}": v for k, v in stats.items()})
        if self.refiner is not None:
            row.update(self._update_refiner())
        return row

    def _fit_critic(self) -> dict[str, float]:
        if isinstance(self.critic, AdditiveCritic):
            self.critic.solve()
            return {"critic_noise_std": self.critic.noise_var ** 0.5}
        losses = []
        for _ in range(self.config.critic_updates):
            b = self._minibatch()
            losses.append(self.critic.fit(b["state"], b["action"], b["target"], self.generator))
        return {"critic_loss": sum(losses) / len(losses)}

    def _minibatch(self) -> dict[str, Tensor]:
        size = min(self.config.refiner_batch, self.buffer_len)
        idx = torch.randint(0, self.buffer_len, (size,), generator=self.generator)
        return {k: v[idx] for k, v in self.buffer.items()}

    def _update_refiner(self) -> dict[str, float]:
        pc = self.config
        scale = float(self.buffer["reward"][: self.buffer_len].std()) if self.buffer_len > 1 else 1.0
        scale = max(scale, 1e-3)
        sums: dict[str, float] = {}
        for _ in range(pc.refiner_updates):
            b = self._minibatch()

            def estimated_reward(x0_hat: Tensor, b: dict[str, Tensor] = b) -> Tensor:
                ranks = continuous_ranks(x0_hat.clamp(-1, 1), self.r_max)
                return self.score(b["state"], ranks, b["capacity"], -pc.deliver_pessimism) / scale

            cond = torch.cat([b["state"], b["coarse"]], dim=1)
            stats = self.refiner.update(b["action"], cond, self.generator, reward_fn=estimated_reward)
            for k, v in stats.items():
                sums[k] = sums.get(k, 0.0) + v / pc.refiner_updates
        if isinstance(self.critic, MLPCritic):
            self.critic.zero_grad(set_to_none=True)  # the reward term's gradient must not reach the critic's fit
        return {f"refiner_{k}": v for k, v in sums.items()} | {"guidance_scale": self.refiner.config.guidance_scale}

    # ----- saving ---------------------------------------------------------------------------------------------
    def policy_state(self) -> dict[str, Any]:
        """What policy.pt holds: enough to rebuild the policy without a run (``from_state``)."""
        state: dict[str, Any] = {
            "format": POLICY_FORMAT, "variant": self.variant, "keys": self.keys, "r_max": self.r_max,
            "config": dataclasses.asdict(self.config), "reward_lambda": self.reward_lambda, "seed": self.seed,
            "geometry": dataclasses.asdict(self.geometry),  # bits_low too: the joint pricing of several precisions
        }
        if self.ppo is not None:
            state["ppo"] = self.ppo.state_dict()
        if self.refiner is not None:
            state["refiner"] = self.refiner.denoiser.state_dict()
            state["critic"] = self.critic.state_dict()
        return state

    def load_policy(self, state: dict[str, Any], source: str) -> None:
        """Take the networks and critic of a ``policy_state()`` trained elsewhere; the buffer starts empty."""
        if state.get("format") != POLICY_FORMAT:
            raise AirloraError(f"{source} is not an {POLICY_FORMAT} file (format {state.get('format')!r}); "
                               "make it with this version's `airlora pretrain-policy` or an airllm run")
        if state["keys"] != self.keys or state["r_max"] != self.r_max or state["variant"] != self.variant:
            raise AirloraError(
                f"{source} was trained for variant {state['variant']!r}, r_max {state['r_max']} and "
                f"{len(state['keys'])} modules; this run has {self.variant!r}, r_max {self.r_max} and "
                f"{len(self.keys)} modules")
        try:
            if self.ppo is not None:
                self.ppo.load_state_dict(state["ppo"])
            if self.refiner is not None:
                self.refiner.denoiser.load_state_dict(state["refiner"])
                self.critic.load_state_dict(state["critic"])
        except (RuntimeError, KeyError) as err:
            raise AirloraError(f"{source} does not fit this run's policy networks (its policy.* sizes differ): "
                               f"{str(err).splitlines()[0]}") from None
        if isinstance(self.critic, AdditiveCritic):
            self.critic.discount(self.config.prior_steps)

    @classmethod
    def from_state(cls, state: dict[str, Any], source: str = "policy") -> RankPolicy:
        """Rebuild a saved policy on its own (no run, no model): to inspect it, or to act on a bandit."""
        from airlora.config import from_dict

        geometry = Geometry(**{"r_max": state["r_max"], **state["geometry"]})  # files before bits_low: one precision
        policy = cls(state["keys"], geometry, from_dict(PolicyConfig, state["config"], "policy."),
                     state["reward_lambda"], state["seed"])
        policy.load_policy(state, source)
        return policy

    def state_dict(self) -> dict[str, Any]:
        """Everything, for a checkpoint of a run: networks, optimisers, critic, buffer, episode, generator."""
        state = {"buffer": self.buffer, "buffer_len": self.buffer_len, "buffer_pos": self.buffer_pos,
                 "episode": self.episode, "generator": self.generator.get_state()}
        if self.ppo is not None:
            state["ppo"] = self.ppo.state_dict()
        if self.refiner is not None:
            state |= {"refiner": self.refiner.denoiser.state_dict(),
                      "refiner_opt": self.refiner.optimizer.state_dict(), "critic": self.critic.state_dict()}
            if isinstance(self.critic, MLPCritic):
                state["critic_opt"] = self.critic.optimizer.state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore ``state_dict()``."""
        self.buffer, self.buffer_len, self.buffer_pos = state["buffer"], state["buffer_len"], state["buffer_pos"]
        self.episode = state["episode"]
        self.generator.set_state(state["generator"])
        if self.ppo is not None:
            self.ppo.load_state_dict(state["ppo"])
        if self.refiner is not None:
            self.refiner.denoiser.load_state_dict(state["refiner"])
            self.refiner.optimizer.load_state_dict(state["refiner_opt"])
            self.critic.load_state_dict(state["critic"])
            if isinstance(self.critic, MLPCritic):
                self.critic.optimizer.load_state_dict(state["critic_opt"])


def load_policy_file(path: Path) -> dict[str, Any]:
    """A policy.pt, read with weights_only (no pickle of arbitrary objects); clear errors for bad files."""
    if not path.is_file():
        raise AirloraError(f"--policy {str(path)!r} does not exist; expected a policy.pt from an airllm run or "
                           "`airlora pretrain-policy`")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # a truncated or foreign file
        raise AirloraError(f"--policy {str(path)!r} could not be read as a policy file: {err}") from None
