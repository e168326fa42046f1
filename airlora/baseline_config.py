"""Typed settings of the baseline allocators that have any: `adalora` and `heuristic` (the airllm policy's are in
``airlora.policy.config``). Sections ``adalora`` and ``heuristic`` of a RunConfig.
"""

from __future__ import annotations

from dataclasses import dataclass

from airlora.validation import _check, _finite


@dataclass
class AdaLoraSettings:
    """The `adalora` baseline: PEFT's AdaLoRA RankAllocator (schedule, scores, masks) driven by our trainer."""

    target_bits: int | None = None
    """On-air bits of the final adapter, task head included (set by --match-bits-of); None: see design_snr_db."""
    design_snr_db: float | None = None
    """With target_bits None, the final adapter is the largest that fits T_max at this SNR; None: the delivery SNR in
    the 'delivery' regime, the run's lowest in the 'paper' regime."""
    tinit_share: float = 0.1
    """Share of train.steps trained at full rank before the first cut (PEFT's tinit)."""
    tfinal_share: float = 0.2
    """Share of train.steps at the end trained with the final ranks frozen (PEFT's tfinal)."""
    delta_t: int = 10
    """Steps between re-allocations while the budget shrinks (PEFT's deltaT)."""
    beta1: float = 0.85
    """EMA factor of the sensitivity |θ·∂L/∂θ| (PEFT's beta1); the `heuristic` allocator uses it too."""
    beta2: float = 0.85
    """EMA factor of the sensitivity's uncertainty (PEFT's beta2); the `heuristic` allocator uses it too."""

    def __post_init__(self) -> None:
        _check(self.target_bits is None or (isinstance(self.target_bits, int) and self.target_bits >= 1),
               "adalora.target_bits", "null or an integer >= 1", self.target_bits)
        _check(self.design_snr_db is None or _finite(self.design_snr_db), "adalora.design_snr_db",
               "null or a finite number of dB", self.design_snr_db)
        for name in ("tinit_share", "tfinal_share"):
            value = getattr(self, name)
            _check(_finite(value) and 0 <= value < 1, f"adalora.{name}", "a number in [0, 1)", value)
        _check(self.tinit_share + self.tfinal_share < 1, "adalora.tinit_share + tfinal_share",
               "a sum below 1 (a budgeting phase must remain)", self.tinit_share + self.tfinal_share)
        _check(self.delta_t >= 1, "adalora.delta_t", "an integer >= 1", self.delta_t)
        for name in ("beta1", "beta2"):
            value = getattr(self, name)
            _check(_finite(value) and 0 < value < 1, f"adalora.{name}", "a number in (0, 1)", value)


@dataclass
class HeuristicSettings:
    """The `heuristic` allocator: a budget-proportional uniform floor, then triplets by importance per on-air bit."""

    floor_share: float = 0.5
    """Share of the largest uniform rank that fits which every module keeps (floor(share·r_uniform))."""

    def __post_init__(self) -> None:
        _check(_finite(self.floor_share) and 0 <= self.floor_share <= 1, "heuristic.floor_share",
               "a number in [0, 1]", self.floor_share)
