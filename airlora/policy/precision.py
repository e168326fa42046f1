"""The learned policy's precision: which common codec a delivery is sent at, learned per delivery channel.

In the ``delivery`` regime the policy decides precision as well as ranks, so λ·η prices bits it chose to send
(a rank-only decision is proposed at the highest precision and only lowered where it does not fit). The rule is
a bandit over the allowed precisions for each delivery SNR: UCB1 on the paired probe-set reward of the decisions
made at that precision while it learns, the best mean at delivery. The ranks are then chosen by the rank policy
priced at that precision (``RankPolicy.priced_at``), so each arm's reward is that of its best ranks.

Why a bandit and not a precision head in PPO: there are K ≤ 4 codecs, the reward of each is measured directly
(paired against the full adapter on fixed examples, ~1,400× less variance than a training batch's loss for one
module), and a module-by-module precision would add D categorical dimensions for effects that, measured so far,
are common to every module (int8 within 0.15 points of fp32 at the same ranks).
"""

from __future__ import annotations

import math
from typing import Any


class PrecisionChoice:
    """UCB1 over the allowed precisions (level indices 0..K−1, ascending bits), one bandit per delivery SNR."""

    def __init__(self, levels: int) -> None:
        self.levels = levels
        self.counts: dict[float, list[int]] = {}
        self.sums: dict[float, list[float]] = {}
        self.squares = self.total = 0.0
        self.seen = 0

    def choose(self, snr_db: float, explore: bool) -> int:
        """The level to send at over this channel: while exploring, each untried level once (highest first), then
        the highest upper confidence bound; at delivery, the best mean (of the nearest SNR tried; else the highest)."""
        if not explore:
            tried = [s for s in self.counts if any(self.counts[s])]
            if not tried:
                return self.levels - 1
            nearest = min(tried, key=lambda s: (abs(s - snr_db), s))
            return max(self._tried(nearest), key=lambda k: (self._mean(nearest, k), k))
        counts = self.counts.setdefault(snr_db, [0] * self.levels)
        self.sums.setdefault(snr_db, [0.0] * self.levels)
        untried = [k for k in range(self.levels) if counts[k] == 0]
        if untried:
            return max(untried)
        n = sum(counts)
        return max(range(self.levels),
                   key=lambda k: (self._mean(snr_db, k) + self.scale() * math.sqrt(2 * math.log(n) / counts[k]), k))

    def update(self, snr_db: float, level: int, reward: float) -> None:
        """Record the reward of a decision sent at ``level`` over the channel at ``snr_db``."""
        self.counts.setdefault(snr_db, [0] * self.levels)[level] += 1
        self.sums.setdefault(snr_db, [0.0] * self.levels)[level] += reward
        self.total += reward
        self.squares += reward * reward
        self.seen += 1

    def scale(self) -> float:
        """The spread of the rewards seen (their standard deviation), the unit of the exploration bonus."""
        if self.seen < 2:
            return 1.0
        mean = self.total / self.seen
        return math.sqrt(max(self.squares / self.seen - mean * mean, 1e-12))

    def _tried(self, snr_db: float) -> list[int]:
        return [k for k in range(self.levels) if self.counts[snr_db][k]]

    def _mean(self, snr_db: float, level: int) -> float:
        return self.sums[snr_db][level] / max(self.counts[snr_db][level], 1)

    def state_dict(self) -> dict[str, Any]:
        """Plain values (for checkpoints)."""
        return {"levels": self.levels, "counts": {str(s): c for s, c in self.counts.items()},
                "sums": {str(s): v for s, v in self.sums.items()}, "total": self.total, "squares": self.squares,
                "seen": self.seen}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore ``state_dict()``."""
        self.levels = state["levels"]
        self.counts = {float(s): list(c) for s, c in state["counts"].items()}
        self.sums = {float(s): list(v) for s, v in state["sums"].items()}
        self.total, self.squares, self.seen = state["total"], state["squares"], state["seen"]
