"""The critic of the hierarchical policy: what a rank vector is worth in a state, with how sure it is.

Letters: B batch, M modules (D = M action entries), H state head features (SNR, W, H, ρ, progress), G rank knots
per module, F = 1 + H + M·G features.

It predicts y = R + λ·η, the part of the reward that the exact, differentiable −λ·η term does not cover (for the
trainer's reward that is −U, the task loss), so critic + (−λ·η) is the caller's own reward whatever it is.

The default, ``AdditiveCritic``, is a Bayesian linear model that is additive over modules, each module's value
its importance times one shared, learned curve of the rank:
    y ≈ b + cᵀs_head + Σ_m a_m·shape(r_m),   shape piecewise linear over G knots, shape(0) = 0.
Why this form: the loss change caused by the ranks is to first order a sum over modules (U(W0 + Σ_m ΔW_m) ≈
U(W0) + Σ_m ⟨∇_m U, ΔW_m⟩); the channel enters the reward only through η, which is exact; an SVD adapter keeps
its largest-|λ| triplets, so every module's returns diminish with the rank in a similar way while modules differ
in how much they matter. With one noisy scalar per step (a real run's batch-loss noise σ ≈ 0.1 against rank
effects of a few thousandths per module) the number of weights decides how soon the critic is right: M + G
here, against M·G for a free curve per module and tens of thousands for an MLP on concat[s, a]
(bench/policy_bandit.py measures the MLP). The amplitudes have a closed-form Gaussian posterior; its standard
deviation says where the critic has no data, so the refiner and the delivery use mean − β·std (the critic is
not trusted outside its data) and exploration mean + β·std.

``MLPCritic`` (policy.critic = 'mlp') is the generic alternative: an ensemble of SiLU MLPs on concat[s, a],
fitted by SGD, with the ensemble's spread as its uncertainty.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

MAX_KNOTS = 17
"""Most knots per module: ranks 0..r_max when r_max ≤ 16, else 17 evenly spaced ranks (keeps F small for r_max 128)."""


class AdditiveCritic:
    """Bayesian linear critic additive over modules, g_m(r) = a_m·shape(r) (see the module docstring).

    ``update`` accumulates the sufficient statistics of the full piecewise-linear model (one weight per module and
    knot); ``solve`` fits the factorised model on them by alternating least squares: with the shape fixed, the
    amplitudes a (and the state terms) are a ridge regression with a closed-form Gaussian posterior; with the
    amplitudes fixed, the shared shape is one, under a curvature prior (second differences) over its knots. The
    posterior of the amplitude step gives the uncertainty. ``estimate`` is linear in the features, so it works on
    any (continuous) ranks and its gradient reaches them.
    """

    def __init__(self, head_dim: int, modules: int, r_max: int, smoothness: float = 10.0, ridge: float = 1e-2,
                 memory_steps: int | None = None) -> None:
        self.head_dim, self.modules, self.r_max = head_dim, modules, r_max
        self.knots = torch.linspace(0, r_max, min(r_max + 1, MAX_KNOTS), dtype=torch.float64)  # (G,)
        self.dim = 1 + head_dim + modules * self.knots.numel()
        self.smoothness, self.ridge = smoothness, ridge
        self.forget = 1.0 if memory_steps is None else 1.0 - 1.0 / memory_steps
        self.gram = torch.zeros(self.dim, self.dim, dtype=torch.float64)  # ZᵀZ of the full features
        self.moment = torch.zeros(self.dim, dtype=torch.float64)  # Zᵀy
        self.sum_y = self.sum_y2 = self.count = 0.0
        self.shape = self.knots / r_max  # (G,) shared shape, 0 at rank 0, max 1; starts linear
        self.weights = torch.zeros(self.dim, dtype=torch.float64)  # posterior mean in the full feature space
        self.cov = torch.zeros(self.dim, self.dim, dtype=torch.float64)  # posterior covariance / noise variance
        self.noise_var = 1.0
        self._sampler: tuple[Tensor, Tensor, Tensor] | None = None

    def features(self, state_head: Tensor, ranks: Tensor) -> Tensor:
        """φ(s, r): (B, H), (B, M) continuous ranks in [0, r_max] -> (B, F); differentiable in ``ranks``."""
        r = ranks.to(self.knots.dtype).clamp(0, self.r_max)
        width = self.knots[1] - self.knots[0]
        hat = (1 - (r[..., None] - self.knots).abs() / width).clamp_min(0)  # (B, M, G) hat weights, sum 1
        ones = torch.ones(r.shape[0], 1, dtype=r.dtype)
        return torch.cat([ones, state_head.to(r.dtype), hat.reshape(r.shape[0], -1)], dim=1)

    def update(self, state_head: Tensor, ranks: Tensor, target: Tensor) -> None:
        """Add observations (B, H), (B, M) executed ranks, (B,) targets y to the sufficient statistics."""
        phi = self.features(state_head, ranks)
        y = target.to(phi.dtype).reshape(-1)
        decay = self.forget ** phi.shape[0]
        self.gram.mul_(decay).add_(phi.T @ phi)
        self.moment.mul_(decay).add_(phi.T @ y)
        self.sum_y = decay * self.sum_y + float(y.sum())
        self.sum_y2 = decay * self.sum_y2 + float((y * y).sum())
        self.count = decay * self.count + phi.shape[0]

    def _lift(self, per_module: Tensor) -> Tensor:
        """The map from (bias, head, one value per module) to the full features, for g_m = per-module · shape:
        (M, G) blocks -> (F, 1 + H + M)."""
        lead, g = 1 + self.head_dim, self.knots.numel()
        lift = torch.zeros(self.dim, lead + self.modules, dtype=torch.float64)
        lift[:lead, :lead] = torch.eye(lead, dtype=torch.float64)
        for m in range(self.modules):
            lift[lead + m * g: lead + (m + 1) * g, lead + m] = per_module[m]
        return lift

    def solve(self, sweeps: int = 8) -> None:
        """Fit amplitudes and shape by alternating ridge regressions on the statistics; posterior of the amplitudes."""
        lead, g = 1 + self.head_dim, self.knots.numel()
        eye = torch.eye(lead + self.modules, dtype=torch.float64)
        second = torch.diff(torch.eye(g, dtype=torch.float64), n=2, dim=0)  # (G−2, G)
        shape_prior = self.smoothness * second.T @ second + self.ridge * torch.eye(g, dtype=torch.float64)
        shape_prior[0, 0] = 1e12  # shape(0) = 0: a module at rank 0 adds nothing; the constant is the bias's
        shape = self.shape.clone()
        for _ in range(sweeps):
            # 1. amplitudes (and bias, state terms) given the shape
            lift = self._lift(shape.expand(self.modules, g))
            precision = lift.T @ self.gram @ lift + self.ridge * eye
            coef = torch.linalg.solve(precision, lift.T @ self.moment)
            amplitude = coef[lead:]
            # 2. the shared shape given the amplitudes: features Σ_m a_m·hat_m,k
            to_shape = torch.zeros(self.dim, lead + g, dtype=torch.float64)
            to_shape[:lead, :lead] = torch.eye(lead, dtype=torch.float64)
            for m in range(self.modules):
                to_shape[lead + m * g: lead + (m + 1) * g, lead:] = amplitude[m] * torch.eye(g, dtype=torch.float64)
            p2 = to_shape.T @ self.gram @ to_shape
            p2[lead:, lead:] += shape_prior
            p2[:lead, :lead] += self.ridge * torch.eye(lead, dtype=torch.float64)
            new_shape = torch.linalg.solve(p2, to_shape.T @ self.moment)[lead:]
            top = float(new_shape.abs().max())
            if not top > 1e-12:
                break
            shape = new_shape / top
        self.shape = shape
        lift = self._lift(shape.expand(self.modules, g))
        precision = lift.T @ self.gram @ lift + self.ridge * eye
        chol = torch.linalg.cholesky(precision)
        coef = torch.cholesky_solve((lift.T @ self.moment)[:, None], chol)[:, 0]
        self.weights = lift @ coef
        coef_cov = torch.cholesky_inverse(chol)
        self.cov = lift @ coef_cov @ lift.T
        self._sampler = (lift, coef, torch.linalg.cholesky(coef_cov + 1e-12 * eye))  # for ``sample_weights``
        if self.count > 1:
            # residual variance Σ(y − φw)²/n from the statistics alone: yᵀy − 2wᵀZᵀy + wᵀZᵀZw
            w = self.weights
            sse = self.sum_y2 - 2 * float(w @ self.moment) + float(w @ self.gram @ w)
            self.noise_var = max(sse / self.count, 1e-8)

    def sample_weights(self, generator: torch.Generator) -> Tensor:
        """One draw of the weights from the posterior (Thompson sampling): (F,) in the full feature space."""
        if self._sampler is None:
            return self.weights
        lift, coef, chol = self._sampler
        z = torch.randn(coef.shape, generator=generator, dtype=coef.dtype)
        return lift @ (coef + self.noise_var ** 0.5 * (chol @ z))

    def estimate(self, state_head: Tensor, ranks: Tensor, beta: float = 0.0, weights: Tensor | None = None) -> Tensor:
        """mean + β·std of the critic's y at (s, r): (B, H), (B, M) -> (B,) float32; β < 0 is pessimistic.

        ``weights`` (a ``sample_weights`` draw) replaces the posterior mean."""
        phi = self.features(state_head, ranks)
        mean = phi @ (self.weights if weights is None else weights)
        if beta == 0:
            return mean.float()
        var = ((phi @ self.cov) * phi).sum(-1).clamp_min(0) * self.noise_var
        return (mean + beta * var.sqrt()).float()

    def module_values(self, beta: float = 0.0, weights: Tensor | None = None) -> np.ndarray:
        """Each module's value a_m·shape + β·std(a_m)·|shape| at every knot: (M, G), the separable part of
        ``estimate`` (cross-module covariance left out), for optimising ranks against it quickly."""
        lead, g = 1 + self.head_dim, self.knots.numel()
        amplitude = (self.weights if weights is None else weights)[lead:].reshape(self.modules, g)  # a_m·shape_k
        if beta == 0:
            return amplitude.numpy()
        blocks = torch.arange(lead, self.dim).reshape(self.modules, g)
        var = self.cov[blocks, blocks].clamp_min(0) * self.noise_var  # (M, G) = shape_k²·var(a_m)
        return (amplitude + beta * var.sqrt()).numpy()

    def state_dict(self) -> dict[str, Any]:
        """Sufficient statistics and the solved posterior, as tensors and floats."""
        return {"gram": self.gram, "moment": self.moment, "sum_y": self.sum_y, "sum_y2": self.sum_y2,
                "count": self.count, "shape": self.shape, "weights": self.weights, "cov": self.cov,
                "noise_var": self.noise_var, "sampler": list(self._sampler) if self._sampler is not None else None}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore ``state_dict()``."""
        self.gram, self.moment = state["gram"].clone(), state["moment"].clone()
        self.sum_y, self.sum_y2, self.count = state["sum_y"], state["sum_y2"], state["count"]
        self.shape, self.weights, self.cov = state["shape"].clone(), state["weights"].clone(), state["cov"].clone()
        self.noise_var = state["noise_var"]
        sampler = state.get("sampler")
        self._sampler = tuple(t.clone() for t in sampler) if sampler is not None else None

    def discount(self, steps: float) -> None:
        """Keep what was learned but weigh it as ``steps`` observations, so new data can move it (a pretrained
        critic entering a real run)."""
        if self.count > steps > 0:
            factor = steps / self.count
            self.gram.mul_(factor)
            self.moment.mul_(factor)
            self.sum_y, self.sum_y2, self.count = factor * self.sum_y, factor * self.sum_y2, steps
            self.solve()


class MLPCritic(nn.Module):
    """An ensemble of SiLU MLPs Q_k(s, x) fitted by SGD to y; the spread across members is the uncertainty.

    x is the action in the refiner's normalised space [-1, 1] (``encode_ranks`` of the executed ranks).
    """

    def __init__(self, state_dim: int, action_dim: int, hidden: int = 256, members: int = 5, lr: float = 1e-3):
        super().__init__()
        self.members = nn.ModuleList(
            nn.Sequential(nn.Linear(state_dim + action_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU(),
                          nn.Linear(hidden, 1)) for _ in range(members))
        self.optimizer = torch.optim.Adam(self.parameters(), lr=lr)

    def forward(self, state: Tensor, action: Tensor) -> Tensor:
        """(B, S), (B, D) -> (K, B)."""
        inputs = torch.cat([state, action], dim=-1)
        return torch.stack([member(inputs).squeeze(-1) for member in self.members])

    def estimate(self, state: Tensor, action: Tensor, beta: float = 0.0) -> Tensor:
        """mean + β·std over the members: (B, S), (B, D) -> (B,)."""
        q = self(state, action)
        return q.mean(0) + beta * q.std(0) if beta else q.mean(0)

    def fit(self, state: Tensor, action: Tensor, target: Tensor, generator: torch.Generator | None = None) -> float:
        """One SGD step, each member on its own bootstrap resample of the batch; returns the mean squared error."""
        batch = state.shape[0]
        loss = torch.zeros(())
        for member in self.members:
            idx = torch.randint(0, batch, (batch,), generator=generator)
            pred = member(torch.cat([state[idx], action[idx]], dim=-1)).squeeze(-1)
            loss = loss + F.mse_loss(pred, target[idx].to(pred.dtype))
        self.optimizer.zero_grad(set_to_none=True)
        (loss / len(self.members)).backward()
        self.optimizer.step()
        return float(loss.detach()) / len(self.members)
