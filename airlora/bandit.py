"""The rank bandit: a rank-allocation problem whose optimum is known, for showing that a policy learns.

Letters: M modules (6L), R = r_max, K SNR values of the channel.

Loss U(r) = u0 + Σ_m (gain_m(R) − gain_m(r_m)) + σ·ε with a concave, increasing gain table gain (M, R + 1),
reward R = −U − λ·η(r) on the *executed* ranks (the proposal projected onto the real ``Budget`` of the step's
SNR, as the trainer does). The known-optimum problem (docs/policy.md) is gain_m(r) = w_m·(1 − exp(−r/τ)):
then U = u0 + Σ w_m·exp(−r_m/τ) + σ·ε. A surrogate calibrated from a real model (``airlora.surrogate``) is the
same class with a measured table. Because U and η are sums over modules, the best feasible rank vector of each
SNR is a knapsack, solved exactly by dynamic programming (``optimum``).

One step of the bandit = one step of the trainer: the allocator is driven through the same ``allocate`` /
``observe`` calls with an ``AllocationContext`` and a ``StepOutcome`` (no model: ``outcome.model`` is None).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from airlora.allocators.base import AllocationContext, Allocator, Decision, PrecisionMap, StepOutcome, split_decision
from airlora.channel import Budget
from airlora.config import RunConfig
from airlora.errors import AirloraError
from airlora.ranks import RankMap

_DP_MAX_UNITS = 20_000_000
"""Largest knapsack capacity (in gcd-of-cost units) ``optimum`` solves exactly; bigger problems are refused."""


def exponential_gains(weights: np.ndarray, tau: float, r_max: int) -> np.ndarray:
    """gain_m(r) = w_m·(1 − exp(−r/τ)) for r = 0..r_max: (M,) -> (M, R + 1)."""
    r = np.arange(r_max + 1, dtype=np.float64)
    return np.asarray(weights, dtype=np.float64)[:, None] * (1.0 - np.exp(-r / tau))[None, :]


@dataclass
class RankBandit:
    """Contextual bandit over rank vectors with the real budget of each SNR (see the module docstring)."""

    budgets: dict[float, Budget]
    """The budget of each SNR value (dB) the channel can be in; all over the same modules and r_max."""
    gains: np.ndarray
    """(M, R + 1) loss reduction of each module at each rank, 0 at rank 0, non-decreasing and concave in r."""
    u0: float = 0.3
    """Loss with every module at r_max."""
    noise_std: float = 0.0
    """σ of the Gaussian noise on each observed loss (a real run's batch-to-batch noise is ~0.1)."""
    reward_lambda: float = 0.1
    """λ in R = −U − λ·η."""
    bandwidth_hz: float = 4.69e6
    """W, shown to the allocator in its state (it does not change the budgets, which are given)."""
    entropy_range: tuple[float, float] = (0.6, 0.9)
    """The batch's lexical entropy is drawn uniformly from this range (it does not change the loss)."""
    oov_range: tuple[float, float] = (0.0, 0.1)
    """The batch's OOV rate is drawn uniformly from this range (it does not change the loss)."""
    _optima: dict[float, tuple[RankMap, float]] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        if not self.budgets:
            raise AirloraError("bandit budgets is empty; expected one Budget per SNR value")
        first = next(iter(self.budgets.values()))
        self.keys, self.r_max = first.keys, first.r_max
        if any(b.keys != self.keys or b.r_max != self.r_max for b in self.budgets.values()):
            raise AirloraError("bandit budgets must share their modules and r_max")
        self.gains = np.asarray(self.gains, dtype=np.float64)
        if self.gains.shape != (len(self.keys), self.r_max + 1):
            raise AirloraError(f"bandit gains has shape {self.gains.shape}; expected ({len(self.keys)}, "
                               f"{self.r_max + 1}), one row per module over ranks 0..r_max")
        steps = np.diff(self.gains, axis=1)
        if np.any(self.gains[:, 0] != 0) or np.any(steps < -1e-12) or np.any(np.diff(steps, axis=1) > 1e-12):
            raise AirloraError("bandit gains must start at 0 and be non-decreasing and concave in the rank")
        self.snr_values = tuple(sorted(self.budgets))

    # ----- the reward -----------------------------------------------------------------------------------------
    def expected_loss(self, ranks: RankMap) -> float:
        """U(r) without noise."""
        r = np.array([ranks[k] for k in self.keys])
        return self.u0 + float(np.sum(self.gains[:, -1] - self.gains[np.arange(len(self.keys)), r]))

    def expected_reward(self, snr_db: float, ranks: RankMap, precisions: PrecisionMap | None = None) -> float:
        """E[R] = −U − λ·η of ranks (and precisions; None: the highest) executed as given (project them first)."""
        return -self.expected_loss(ranks) - self.reward_lambda * self.budgets[snr_db].eta(ranks, precisions)

    def execute(self, snr_db: float, decision: Decision) -> tuple[RankMap, PrecisionMap]:
        """What the trainer would train and deliver: the decision projected onto the SNR's budget (jointly: with
        several allowed precisions the projection lowers precision before it cuts ranks). U ignores precision."""
        ranks, precisions = split_decision(decision)
        return self.budgets[snr_db].project_joint(ranks, precisions)

    # ----- reference allocations ------------------------------------------------------------------------------
    def uniform(self, snr_db: float) -> RankMap:
        """The largest common rank that fits."""
        return dict.fromkeys(self.keys, self.budgets[snr_db].max_uniform_rank())

    def optimum(self, snr_db: float) -> tuple[RankMap, float]:
        """The feasible rank vector of highest expected reward at ``snr_db`` and that reward (exact, cached).

        value_m(r) = gain_m(r) − λ·r·u_m·/(C·T_max), u_m the on-air bits per unit rank, is separable, and
        feasibility is Σ r_m·u_m ≤ room, so this is a bounded knapsack: dynamic programming over the used bits in
        units of gcd(u). With several allowed precisions every module is taken at the lowest (U ignores precision),
        an upper bound on what the projection's choice of precisions can reach.
        """
        if snr_db in self._optima:
            return self._optima[snr_db]
        budget = self.budgets[snr_db]
        costs = budget.unit_bits[:, 0]  # U ignores precision, so every module is cheapest at the lowest
        per_bit = self.reward_lambda / (budget.capacity_bps * budget.t_max_s)
        r = np.arange(self.r_max + 1)
        value = self.gains - per_bit * r[None, :] * costs[:, None]  # (M, R + 1)
        room = budget.room_bits(dict.fromkeys(self.keys, 0), self._lowest)
        if room < 0:
            best = np.zeros(len(self.keys), dtype=np.int64)
        elif int(costs.sum()) * self.r_max <= room:  # everything fits: each module on its own
            best = np.argmax(value, axis=1)
        else:
            best = _knapsack(value, costs, room)
        ranks = {k: int(v) for k, v in zip(self.keys, best, strict=True)}
        self._optima[snr_db] = (ranks, self.expected_reward(snr_db, ranks, self._lowest))
        return self._optima[snr_db]

    @property
    def _lowest(self) -> PrecisionMap:
        first = next(iter(self.budgets.values()))
        return dict.fromkeys(self.keys, first.allowed_bits[0])

    def uniform_reward(self, snr_db: float) -> float:
        """E[R] of the uniform allocation, executed (at the highest precision, lowered where it must be)."""
        return self.expected_reward(snr_db, *self.execute(snr_db, self.uniform(snr_db)))


def _knapsack(value: np.ndarray, costs: np.ndarray, room: int) -> np.ndarray:
    """argmax Σ value[m, r_m] s.t. Σ r_m·costs[m] ≤ room, r_m in 0..R: (M, R + 1), (M,) -> (M,) int64."""
    unit = int(np.gcd.reduce(costs))
    cap, c = room // unit, costs // unit
    if cap > _DP_MAX_UNITS:
        raise AirloraError(f"bandit optimum: a knapsack of {cap:,} units is too large to solve exactly here")
    modules, options = value.shape
    best = np.zeros(cap + 1)  # best value using at most w units
    choice = np.zeros((modules, cap + 1), dtype=np.int8)
    for m in range(modules):
        candidates = np.full((options, cap + 1), -np.inf)
        for r in range(options):
            shift = r * int(c[m])
            if shift <= cap:
                candidates[r, shift:] = best[: cap + 1 - shift] + value[m, r]
        choice[m] = np.argmax(candidates, axis=0)
        best = candidates[choice[m], np.arange(cap + 1)]
    out, w = np.zeros(modules, dtype=np.int64), cap
    for m in reversed(range(modules)):
        out[m] = choice[m, w]
        w -= out[m] * int(c[m])
    return out


@dataclass
class Drive:
    """The outcome of ``drive``: per-step records and the evaluation-mode checkpoints."""

    rewards: list[float]
    """Observed (noisy) reward of each step."""
    expected: list[float]
    """E[R] of each step's executed ranks."""
    evaluations: dict[int, dict[float, float]]
    """Episodes trained -> {SNR: E[R] of the allocator's evaluation-mode decision at that SNR}."""


def drive(bandit: RankBandit, allocator: Allocator, episodes: int, episode_steps: int, seed: int,
          evaluate_at: tuple[int, ...] = (), progress: bool = False) -> Drive:
    """Train ``allocator`` on ``bandit`` for ``episodes`` × ``episode_steps`` steps through allocate/observe.

    Each step: an SNR drawn uniformly from the bandit's values, a context, the allocator's proposal, projected,
    a noisy loss, ``observe``. After the episode counts in ``evaluate_at``, the allocator's evaluation-mode
    decision (``Allocator.deliver``) is scored noise-free at every SNR (with the state's current ranks).
    """
    rng = np.random.default_rng(seed)
    total = episodes * episode_steps
    ranks = dict.fromkeys(bandit.keys, bandit.r_max)
    rewards, expected, evaluations = [], [], {}
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=total, desc=f"bandit {allocator.name}", dynamic_ncols=True)
    for step in range(total):
        snr_db = bandit.snr_values[int(rng.integers(len(bandit.snr_values)))]
        ctx = _context(bandit, step, total, snr_db, ranks, rng)
        ranks, precisions = bandit.execute(snr_db, allocator.allocate(ctx))
        loss = bandit.expected_loss(ranks)
        eta = bandit.budgets[snr_db].eta(ranks, precisions)
        noisy_loss = loss + bandit.noise_std * float(rng.standard_normal())
        reward = -noisy_loss - bandit.reward_lambda * eta
        allocator.observe(StepOutcome(step, noisy_loss, reward, eta, ranks, None, precisions))
        rewards.append(reward)
        expected.append(-loss - bandit.reward_lambda * eta)
        if (step + 1) % episode_steps == 0 and (step + 1) // episode_steps in evaluate_at:
            evaluations[(step + 1) // episode_steps] = evaluate(bandit, allocator, step + 1, total, ranks)
        if bar is not None:
            bar.update()
    if bar is not None:
        bar.close()
    return Drive(rewards, expected, evaluations)


def evaluate(bandit: RankBandit, allocator: Allocator, step: int, total: int, ranks: RankMap) -> dict[float, float]:
    """E[R] of the allocator's evaluation-mode decision at every SNR (fixed mid-range H and ρ, so it is repeatable)."""
    out = {}
    for snr_db in bandit.snr_values:
        ctx = AllocationContext(step, snr_db, bandit.budgets[snr_db], float(np.mean(bandit.entropy_range)),
                                float(np.mean(bandit.oov_range)), ranks, bandit.bandwidth_hz,
                                min(step / max(total, 1), 1.0))
        out[snr_db] = bandit.expected_reward(snr_db, *bandit.execute(snr_db, allocator.deliver(ctx)))
    return out


def _context(bandit: RankBandit, step: int, total: int, snr_db: float, ranks: RankMap,
             rng: np.random.Generator) -> AllocationContext:
    return AllocationContext(step, snr_db, bandit.budgets[snr_db], float(rng.uniform(*bandit.entropy_range)),
                             float(rng.uniform(*bandit.oov_range)), ranks, bandit.bandwidth_hz, step / max(total, 1))


def share_of_gap(bandit: RankBandit, per_snr: dict[float, float]) -> float:
    """(E[R] − E[R_uniform]) / (E[R_opt] − E[R_uniform]), each averaged over the SNRs (0 uniform, 1 optimum)."""
    got = float(np.mean([per_snr[s] for s in bandit.snr_values]))
    uni = float(np.mean([bandit.uniform_reward(s) for s in bandit.snr_values]))
    opt = float(np.mean([bandit.optimum(s)[1] for s in bandit.snr_values]))
    if not opt > uni:
        return math.nan
    return (got - uni) / (opt - uni)


def paper_bandit(config: RunConfig, noise_std: float, tau: float = 2.0, total_weight: float = 0.5,
                 weights_seed: int = 0, u0: float = 0.3) -> RankBandit:
    """The known-optimum bandit (docs/policy.md) on ``config``'s model, channel and λ (shapes read without weights).

    U = u0 + Σ_m w_m·exp(−r_m/τ) + σ·ε with uneven importances w = total_weight·x/Σx, x ~ LogNormal(0, 1) drawn
    with ``weights_seed``; the budgets are the run's own (bits, T_max, fading, bandwidth, head reserved).
    """
    from airlora.channel import capacity_bps, scale_matched_bandwidth_hz
    from airlora.models import shapes_without_weights

    module_map, head_params = shapes_without_weights(config.model, config.adapter.target_modules)
    ch = config.channel
    bandwidth = ch.bandwidth_hz or scale_matched_bandwidth_hz(module_map.shapes)
    budgets = {float(s): Budget.for_model(module_map.shapes, config.adapter.r_max, ch.bits_per_param,
                                          capacity_bps(s, ch, bandwidth), ch.t_max_s, head_params)
               for s in sorted(set(ch.snr_db))}
    x = np.random.default_rng(weights_seed).lognormal(0.0, 1.0, size=len(module_map.shapes))
    gains = exponential_gains(total_weight * x / x.sum(), tau, config.adapter.r_max)
    return RankBandit(budgets, gains, u0=u0, noise_std=noise_std, reward_lambda=config.train.reward_lambda,
                      bandwidth_hz=bandwidth)
