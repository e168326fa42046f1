"""AirLLM allocator (paper §IV, Algorithm 1): PPO proposes a coarse action, a conditional DDIM refines it.

Letters: S state dim (5 + D), A coarse dim, D = 6L action dim, C = S + A condition dim, N buffer size.

Each decision: s = state_vector(SNR, W, H, ρ, r/r_max); a_out ~ π(·|s); x0 ~ refiner(cond = [s, a_out]) with
classifier-free guidance; ranks = clip(floor(decode(x0)), 0, r_max); the trainer projects them onto the budget.
After every step the executed (projected) ranks and the reward are stored; after every episode of
``episode_steps`` steps PPO updates on the episode (GAE) and then the refiner on the shared buffer.

The refiner's reward term (hybrid loss, paper Eq. 19) is Diffusion-QL style: a learned critic Q(s, a) fitted to
the observed −U (the task-loss part of the reward), plus the exact, differentiable −λ·η(x̂0) computed from the
continuous rank estimate, each sample at its own channel capacity. Splitting the reward this way gives η an exact
gradient instead of one the critic would have to learn; the critic only learns what is unknown: the loss.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from airlora.allocators.base import AllocationContext, Allocator, StepOutcome
from airlora.config import RunConfig
from airlora.errors import AirloraError
from airlora.policy.diffusion import Critic, DiffusionRefiner, decode_ranks, encode_ranks, make_denoiser
from airlora.policy.ppo import PPO, compute_gae
from airlora.policy.threads import single_thread
from airlora.ranks import RankMap
from airlora.state import HEAD_FEATURES, state_vector

POLICY_FILE = "policy.pt"
METRICS_FILE = "policy_metrics.csv"


class AirLLMAllocator(Allocator):
    """The hierarchical PPO → DDIM rank policy, trained online inside the fine-tuning run."""

    name = "airllm"

    def __init__(self, config: RunConfig, seed: int) -> None:
        super().__init__(config, seed)
        self.policy_cfg = config.policy
        self.variant = config.policy.variant
        self.generator = torch.Generator().manual_seed(seed)
        self.ready = False
        self.episode: list[dict[str, Any]] = []
        self.pending: dict[str, Any] | None = None
        self.metrics: list[dict[str, Any]] = []
        self.decision_s: list[float] = []

    def _build(self, ctx: AllocationContext) -> None:
        pc = self.policy_cfg
        self.keys = list(ctx.budget.keys)
        self.r_max = ctx.budget.r_max
        d = len(self.keys)
        s = HEAD_FEATURES + d
        self.uses_ppo = self.variant != "ddim"
        self.uses_refiner = self.variant != "ppo"
        ppo_cfg = pc.ppo
        if self.variant == "ppo" and ppo_cfg.coarse_dim not in (None, d):
            raise AirloraError(f"policy.ppo.coarse_dim = {ppo_cfg.coarse_dim}: the 'ppo' variant acts on the full "
                               f"rank vector, so it must be null or {d}")
        torch.manual_seed(self.seed)  # network initialisation
        self.ppo = PPO(s, d, ppo_cfg) if self.uses_ppo else None
        a = self.ppo.coarse_dim if self.ppo else 0
        self.cond_dim = s + a
        self.refiner = self.critic = None
        if self.uses_refiner:
            diffusion_cfg = pc.effective_diffusion()
            self.refiner = DiffusionRefiner(make_denoiser(diffusion_cfg, d, self.cond_dim), diffusion_cfg, d)
            self.critic = Critic(s, d, diffusion_cfg.hidden)
            self.critic_opt = torch.optim.Adam(self.critic.parameters(), lr=pc.critic_lr)
        n = pc.buffer_size
        self.buffer = {"state": torch.zeros(n, s), "coarse": torch.zeros(n, a), "action": torch.zeros(n, d),
                       "neg_loss": torch.zeros(n), "capacity": torch.zeros(n)}
        self.buffer_len = self.buffer_pos = 0
        costs = torch.tensor(ctx.budget.costs, dtype=torch.float32)  # (D,) params per unit rank
        self.bits_per_rank = costs * ctx.budget.bits_per_param  # (D,)
        self.reserved_bits = float(ctx.budget.reserved_params * ctx.budget.bits_per_param)
        self.t_max_s = ctx.budget.t_max_s
        if pc.load_path:
            self._load(Path(pc.load_path))
        self.ready = True

    def allocate(self, ctx: AllocationContext) -> RankMap:
        with single_thread():
            return self._allocate(ctx)

    def _allocate(self, ctx: AllocationContext) -> RankMap:
        if not self.ready:
            self._build(ctx)
        t0 = time.perf_counter()
        ranks_now = [ctx.ranks[k] for k in self.keys]
        state = torch.from_numpy(state_vector(ctx.snr_db, ctx.bandwidth_hz, ctx.lexical_entropy, ctx.oov_rate,
                                              ranks_now, self.r_max, ctx.progress))[None]  # (1, S)
        coarse, logprob, value = (self.ppo.act(state, self.generator) if self.ppo
                                  else (torch.zeros(1, 0), torch.zeros(1), torch.zeros(1)))
        if self.refiner is not None:
            x0 = self.refiner.sample(torch.cat([state, coarse], dim=1), self.generator)  # (1, D) in [-1, 1]
        else:
            x0 = coarse.clamp(-1.0, 1.0)
        ranks = decode_ranks(x0, self.r_max)[0].tolist()
        self.decision_s.append(time.perf_counter() - t0)
        self.pending = {"state": state[0], "coarse": coarse[0], "logprob": float(logprob[0]),
                        "value": float(value[0]), "capacity": ctx.budget.capacity_bps}
        return dict(zip(self.keys, ranks, strict=True))

    def observe(self, outcome: StepOutcome) -> None:
        if self.pending is None:  # a step the allocator did not decide (allocate_every > 1)
            return
        step = {**self.pending, "reward": outcome.reward, "neg_loss": -outcome.loss,
                "action": encode_ranks(torch.tensor([outcome.ranks[k] for k in self.keys]), self.r_max).float()}
        self.pending = None
        self.episode.append(step)
        i = self.buffer_pos
        for name in ("state", "coarse", "action"):
            self.buffer[name][i] = step[name]
        self.buffer["neg_loss"][i] = step["neg_loss"]
        self.buffer["capacity"][i] = step["capacity"]
        self.buffer_pos = (i + 1) % self.policy_cfg.buffer_size
        self.buffer_len = min(self.buffer_len + 1, self.policy_cfg.buffer_size)
        if len(self.episode) == self.policy_cfg.episode_steps:
            with single_thread():
                self._end_episode()

    def _end_episode(self) -> None:
        """Algorithm 1's learning phase: PPO on the finished episode, then the refiner on the shared buffer.

        The episode's end is terminal (Algorithm 1's episodes have a fixed length T_env), so learning runs as soon
        as its last reward is in, in ``observe``, and never delays a decision.
        """
        ep, pc = self.episode, self.policy_cfg
        self.episode = []
        rewards = torch.tensor([s["reward"] for s in ep])
        row: dict[str, Any] = {"episode": len(self.metrics), "steps": len(ep), "mean_reward": float(rewards.mean())}
        t0 = time.perf_counter()
        if self.ppo is not None:
            values = torch.tensor([s["value"] for s in ep])
            dones = torch.zeros(len(ep))
            dones[-1] = 1.0
            adv, ret = compute_gae(rewards, values, dones, 0.0, pc.ppo.gamma, pc.ppo.gae_lambda)
            stats = self.ppo.update(torch.stack([s["state"] for s in ep]), torch.stack([s["coarse"] for s in ep]),
                                    torch.tensor([s["logprob"] for s in ep]), adv, ret, values)
            row.update({f"ppo_{k}": v for k, v in stats.items()})
        if self.refiner is not None:
            row.update(self._update_refiner())
        row["update_ms"] = 1e3 * (time.perf_counter() - t0)
        row["decision_ms"] = 1e3 * float(np.mean(self.decision_s[-len(ep):]))
        self.metrics.append(row)

    def _update_refiner(self) -> dict[str, float]:
        pc = self.policy_cfg
        lam = self.config.train.reward_lambda
        sums: dict[str, float] = {}
        for _ in range(pc.refiner_updates):
            idx = torch.randint(0, self.buffer_len, (min(pc.refiner_batch, self.buffer_len),), generator=self.generator)
            b = {k: v[idx] for k, v in self.buffer.items()}
            # 1. critic Q(s, a) ≈ −U on executed actions (one-step bandit target)
            critic_loss = self.critic.reward_loss(b["state"], b["action"], b["neg_loss"])
            self.critic_opt.zero_grad(set_to_none=True)
            critic_loss.backward()
            self.critic_opt.step()

            # 2. exact −λ·η of the continuous rank estimate of x̂0, at each sample's own capacity
            def neg_lambda_eta(x0_hat: torch.Tensor, capacity: torch.Tensor = b["capacity"]) -> torch.Tensor:
                ranks = (x0_hat.clamp(-1, 1) + 1) / 2 * (self.r_max + 1)  # (B, D) before the floor
                bits = ranks @ self.bits_per_rank + self.reserved_bits  # (B,)
                return -lam * bits / (capacity * self.t_max_s)

            # 3. hybrid denoising step on the executed actions, conditioned on [s, a_out]
            cond = torch.cat([b["state"], b["coarse"]], dim=1)
            stats = self.refiner.update(b["action"], cond, self.generator, critic=self.critic, state=b["state"],
                                        reward_fn=neg_lambda_eta)
            stats["critic_loss"] = float(critic_loss.detach())
            for k, v in stats.items():
                sums[k] = sums.get(k, 0.0) + v / pc.refiner_updates
        sums["guidance_scale"] = self.refiner.config.guidance_scale
        return {f"refiner_{k}" if not k.startswith("guidance") else k: v for k, v in sums.items()}

    def save(self, out: Path) -> dict[str, Any]:
        """Write policy.pt and policy_metrics.csv; return the policy's summary fields."""
        from airlora.io import write_csv_atomic

        if not self.ready:
            return {}
        state: dict[str, Any] = {"variant": self.variant, "keys": self.keys, "r_max": self.r_max}
        if self.ppo is not None:
            state["ppo"] = self.ppo.state_dict()
        if self.refiner is not None:
            state["refiner"] = self.refiner.denoiser.state_dict()
            state["critic"] = self.critic.state_dict()
        tmp = out / f".{POLICY_FILE}.tmp"
        torch.save(state, tmp)
        tmp.replace(out / POLICY_FILE)
        columns = sorted({k for row in self.metrics for k in row}, key=lambda k: (k != "episode", k))
        write_csv_atomic(out / METRICS_FILE, self.metrics, columns)
        rewards = [row["mean_reward"] for row in self.metrics]
        quarter = max(len(rewards) // 4, 1)
        return {
            "policy_variant": self.variant,
            "policy_episodes": len(self.metrics),
            "policy_decision_ms": 1e3 * float(np.median(self.decision_s)) if self.decision_s else None,
            "episode_reward_first_quarter": float(np.mean(rewards[:quarter])) if rewards else None,
            "episode_reward_last_quarter": float(np.mean(rewards[-quarter:])) if rewards else None,
        }

    def state_dict(self) -> dict[str, Any]:
        """Networks, optimisers, the shared buffer, the episode so far, the generator and the learning log."""
        state: dict[str, Any] = {"ready": self.ready, "generator": self.generator.get_state(),
                                 "metrics": self.metrics, "decision_s": self.decision_s}
        if not self.ready:
            return state
        state |= {"episode": self.episode, "buffer": self.buffer, "buffer_len": self.buffer_len,
                  "buffer_pos": self.buffer_pos}
        if self.ppo is not None:
            state |= {"ppo": self.ppo.model.state_dict(), "ppo_opt": self.ppo.optimizer.state_dict()}
        if self.refiner is not None:
            state |= {"refiner": self.refiner.denoiser.state_dict(), "refiner_opt": self.refiner.optimizer.state_dict(),
                      "critic": self.critic.state_dict(), "critic_opt": self.critic_opt.state_dict()}
        return state

    def load_state_dict(self, state: dict[str, Any], ctx: AllocationContext, model: torch.nn.Module) -> None:
        if state["ready"]:
            self._build(ctx)
            self.episode, self.buffer = state["episode"], state["buffer"]
            self.buffer_len, self.buffer_pos = state["buffer_len"], state["buffer_pos"]
            if self.ppo is not None:
                self.ppo.model.load_state_dict(state["ppo"])
                self.ppo.optimizer.load_state_dict(state["ppo_opt"])
            if self.refiner is not None:
                self.refiner.denoiser.load_state_dict(state["refiner"])
                self.refiner.optimizer.load_state_dict(state["refiner_opt"])
                self.critic.load_state_dict(state["critic"])
                self.critic_opt.load_state_dict(state["critic_opt"])
        self.generator.set_state(state["generator"])
        self.metrics, self.decision_s = state["metrics"], state["decision_s"]

    def _load(self, path: Path) -> None:
        if not path.is_file():
            raise AirloraError(f"--policy {str(path)!r} does not exist; expected a policy.pt from an airllm run")
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)  # no pickle of arbitrary objects
        except Exception as err:  # a truncated or foreign file
            raise AirloraError(f"--policy {str(path)!r} could not be read as a policy checkpoint: {err}") from None
        if state.get("keys") != self.keys or state.get("r_max") != self.r_max or state.get("variant") != self.variant:
            raise AirloraError(
                f"--policy {str(path)!r} was trained for variant {state.get('variant')!r}, r_max {state.get('r_max')} "
                f"and {len(state.get('keys', []))} modules; this run has {self.variant!r}, r_max {self.r_max} and "
                f"{len(self.keys)} modules"
            )
        if self.ppo is not None:
            self.ppo.load_state_dict(state["ppo"])
        if self.refiner is not None:
            self.refiner.denoiser.load_state_dict(state["refiner"])
            self.critic.load_state_dict(state["critic"])
