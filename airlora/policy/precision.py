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


def channel_key(snr_db: float) -> float:
    """The bandit a delivery channel belongs to: its SNR to the nearest dB (an SNR trace has many distinct values,
    and one bandit per exact value would never leave its first arm)."""
    return float(round(snr_db))


class PrecisionChoice:
    """UCB1 over the allowed precisions (``channel.bits``), one bandit per delivery SNR (to the nearest dB)."""

    def __init__(self, bits: tuple[int, ...]) -> None:
        self.bits = tuple(sorted(bits))
        self.counts: dict[float, dict[int, int]] = {}
        self.sums: dict[float, dict[int, float]] = {}
        self.squares = self.total = 0.0
        self.seen = 0

    def choose(self, snr_db: float, explore: bool, allowed: tuple[int, ...] | None = None) -> int:
        """The bits to send at over this channel, among ``allowed`` (default all): while exploring, each untried
        precision once (highest first), then the highest upper confidence bound; at delivery, the best mean (of the
        nearest SNR tried; else the highest allowed)."""
        snr_db = channel_key(snr_db)
        arms = sorted(set(allowed or self.bits) & set(self.bits)) or [max(allowed or self.bits)]
        if not explore:
            tried = [s for s, c in self.counts.items() if any(c.get(b, 0) for b in arms)]
            if not tried:
                return arms[-1]
            nearest = min(tried, key=lambda s: (abs(s - snr_db), s))
            return max((b for b in arms if self.counts[nearest].get(b, 0)), key=lambda b: (self._mean(nearest, b), b))
        counts = self.counts.setdefault(snr_db, {})
        untried = [b for b in arms if counts.get(b, 0) == 0]
        if untried:
            return max(untried)
        n = sum(counts[b] for b in arms)
        return max(arms, key=lambda b: (self._mean(snr_db, b) + self.scale() * math.sqrt(2 * math.log(n) / counts[b]),
                                        b))

    def update(self, snr_db: float, bits: int, reward: float) -> None:
        """Record the reward of a decision sent at ``bits`` over the channel at ``snr_db``."""
        snr_db = channel_key(snr_db)
        counts, sums = self.counts.setdefault(snr_db, {}), self.sums.setdefault(snr_db, {})
        counts[bits] = counts.get(bits, 0) + 1
        sums[bits] = sums.get(bits, 0.0) + reward
        self.total += reward
        self.squares += reward * reward
        self.seen += 1

    def scale(self) -> float:
        """The spread of the rewards seen (their standard deviation), the unit of the exploration bonus."""
        if self.seen < 2:
            return 1.0
        mean = self.total / self.seen
        return math.sqrt(max(self.squares / self.seen - mean * mean, 1e-12))

    def _mean(self, snr_db: float, bits: int) -> float:
        return self.sums[snr_db][bits] / max(self.counts[snr_db][bits], 1)

    def state_dict(self) -> dict[str, Any]:
        """Plain values (for checkpoints)."""
        return {"bits": list(self.bits), "counts": {str(s): {str(b): n for b, n in c.items()}
                                                    for s, c in self.counts.items()},
                "sums": {str(s): {str(b): v for b, v in c.items()} for s, c in self.sums.items()},
                "total": self.total, "squares": self.squares, "seen": self.seen}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore ``state_dict()``."""
        self.bits = tuple(state["bits"])
        self.counts = {float(s): {int(b): n for b, n in c.items()} for s, c in state["counts"].items()}
        self.sums = {float(s): {int(b): v for b, v in c.items()} for s, c in state["sums"].items()}
        self.total, self.squares, self.seen = state["total"], state["squares"], state["seen"]
