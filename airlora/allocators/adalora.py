"""`adalora`: PEFT's own AdaLoRA (Zhang et al., ICLR 2023) as the channel-unaware baseline, on our trainer.

PEFT's ``RankAllocator`` scores and masks our SVD triplets directly: ``SVDLinear`` stores them under PEFT
AdaLoRA's parameter names (``lora_A/lora_B/lora_E.default``), which is all the allocator reads. Nothing of
AdaLoRA is re-implemented: the sensitivity EMAs (``update_ipt``), the cubic budget schedule (``budget_schedule``)
and the masks (``mask_to_budget``, ``mask_using_rank_pattern``) are PEFT's. What is written here is the phase logic
of ``AdaLoraModel.update_and_allocate`` (which needs a PEFT-wrapped model), followed step for step in ``observe``.
A module's rank is the number of triplets its mask keeps; the trainer projects the ranks onto each step's airtime
budget, as for every allocator.

Budget. AdaLoRA counts triplets; the channel counts bits (a triplet of fc1 costs 2.5 times one of q in MiniLM).
The final adapter's size is set in bits: ``adalora.target_bits`` (``--match-bits-of``: another run's on-air bits,
head and overhead included), or else the largest adapter that fits T_max at ``adalora.design_snr_db`` (default the
delivery SNR in the default ``delivery`` regime, where only the delivery is constrained; in the ``paper`` regime the
lowest SNR of the run, so AdaLoRA's own final allocation fits every step and the projection never has to cut it).
PEFT's schedule runs in triplets, from all of them (init_bgt) to target_bgt = target adapter bits / mean triplet
bits; each of its masks is taken at the same cubic share of the way from the full adapter to the target, in bits:
the count handed to ``mask_to_budget`` is the largest whose kept triplets, in PEFT's score order, fit.

Joint mode (several allowed precisions, ``channel.bits``): one common precision for the whole run, chosen with the
target like ``uniform``'s pair, rank first: the highest precision at which the full adapter fits the target, else
the lowest (the most triplets); triplet costs are the exact bits at that precision. The trainer's projection may
still lower it at a step whose budget is tighter than the target's. The final allocation (step total_step − tfinal)
uses the target itself, so the final adapter lands within one triplet of it (below it only when fewer triplets
than that carry a score, e.g. triplets never trained because the channel always cut them).

Where PEFT surprises, and what is done:
1. Zeroing: ``mask_to_budget`` writes λ = 0 into every masked triplet, losing its value (SVDLinear itself keeps
   the values of cut triplets). Kept as AdaLoRA does it: a masked triplet that comes back restarts from λ = 0.
   It also makes PEFT's choice and SVDLinear's top-|λ| activation agree: the zeroed triplets are the ones a
   module's new rank leaves out. (Within a module whose count does not change, SVDLinear keeps its active set.)
2. ranknum scaling: PEFT's SVDLinear scales ΔW by lora_alpha / ranknum, with ranknum frozen at init_r during
   training (masks never resize modules), so with init_r = r_max it is our fixed alpha / r_max.
3. total_step: AdaLoraConfig rejects total_step <= 0 and tinit >= total_step − tfinal. tinit and tfinal come
   from shares of train.steps and are clamped so a budgeting phase exists, with tfinal >= 1 whenever the run has
   two steps or more, so the final allocation happens inside the run.
4. ``mask_to_budget`` calls torch.kthvalue with k = init_bgt − budget, which fails for k = 0 (a budget that cuts
   nothing, e.g. a target as large as the full adapter): such a mask is skipped.
5. ``update_ipt`` multiplies by p.grad, which is None for a module that ran at rank 0 this step: zeros are put in
   first (the trainer's zero_grad(set_to_none=True) drops them right after).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from airlora.adapters import SVDLinear
from airlora.allocators.base import AllocationContext, Allocator, Decision, StepOutcome, split_decision
from airlora.baseline_config import AdaLoraSettings
from airlora.channel import SnrSchedule, capacity_bps, param_cap
from airlora.config import RunConfig
from airlora.errors import AirloraError
from airlora.models import FAMILIES, resolve_modules
from airlora.ranks import RankMap

if TYPE_CHECKING:
    from peft import AdaLoraConfig

ADAPTER = "default"
"""PEFT's adapter name, under which SVDLinear stores its triplets."""


def adapter_keys(model: nn.Module, target_modules: dict[str, str] | None = None) -> dict[str, str]:
    """Module name of every SVDLinear in ``model`` -> its rank key (``layers.{i}.{module}``)."""
    # The frozen linear inside each SVDLinear is its ``.base``: resolving the families with that suffix reuses the
    # model's one module-name resolver, so the keys are the ones the session gave the adapters.
    candidates = [target_modules] if target_modules else list(FAMILIES.values())
    for suffixes in candidates:
        try:
            found = resolve_modules(model, {canon: f"{suffix}.base" for canon, suffix in suffixes.items()})
        except AirloraError:
            continue
        names = {name.removesuffix(".base"): key for key, name in found.names.items()}
        if all(isinstance(model.get_submodule(name), SVDLinear) for name in names):
            return names
    raise AirloraError("the model has no SVD adapters on its six modules per layer; inject them first")


class TripletSensitivity:
    """AdaLoRA's importance of every triplet, from PEFT's sensitivity and uncertainty EMAs.

    PEFT keeps, per parameter entry, Ī = EMA of |θ·∂L/∂θ| and Ū = EMA of |I − Ī| (AdaLoRA Eq. 8–9); a triplet's
    score is Ī·Ū of its λ plus the mean Ī·Ū over its row of Q and its column of P (Eq. 10–11), combined as PEFT's
    ``mask_to_budget`` combines them, so ranking these scores reproduces PEFT's masks.
    """

    def __init__(self, model: nn.Module, peft_config: AdaLoraConfig, target_modules: dict[str, str] | None) -> None:
        from peft.tuners.adalora.layer import RankAllocator  # peft takes seconds to import: only when used

        self.keys = adapter_keys(model, target_modules)
        self.modules: dict[str, SVDLinear] = {name: model.get_submodule(name) for name in self.keys}
        self.peft = RankAllocator(model, peft_config, ADAPTER)

    def update(self, model: nn.Module) -> None:
        """Fold this step's gradients into PEFT's EMAs; call after ``optimizer.step()``, before ``zero_grad()``."""
        for module in self.modules.values():
            for p in (module.lora_A[ADAPTER], module.lora_B[ADAPTER], module.lora_E[ADAPTER]):
                if p.grad is None:  # the module ran at rank 0: no gradient reached it (PEFT would fail on None)
                    p.grad = torch.zeros_like(p)
        self.peft.update_ipt(model)

    def state_dict(self) -> dict[str, dict[str, torch.Tensor]]:
        """PEFT's sensitivity EMAs, by parameter name."""
        peft = self.peft
        return {"ipt": peft.ipt, "exp_avg_ipt": peft.exp_avg_ipt, "exp_avg_unc": peft.exp_avg_unc}

    def load_state_dict(self, state: dict[str, dict[str, torch.Tensor]]) -> None:
        for name in ("ipt", "exp_avg_ipt", "exp_avg_unc"):
            setattr(self.peft, name, {k: v.clone() for k, v in state[name].items()})

    def _element(self, name: str, part: str) -> torch.Tensor | None:
        param = f"{name}.{part}.{ADAPTER}"
        if param not in self.peft.exp_avg_ipt:
            return None
        return self.peft.exp_avg_ipt[param] * self.peft.exp_avg_unc[param]

    def scores(self) -> dict[str, np.ndarray]:
        """Score of each stored triplet, (R,) float64 per rank key; zeros before the first update."""
        out = {}
        for name, key in self.keys.items():
            lam, q, p = (self._element(name, part) for part in ("lora_E", "lora_A", "lora_B"))
            if lam is None:
                out[key] = np.zeros(self.modules[name].r_max)
                continue
            score = lam.view(-1) + q.mean(dim=1) + p.mean(dim=0)  # (R,): λ_j + row j of Q + column j of P
            out[key] = score.double().cpu().numpy()
        return out


def schedule_steps(total_step: int, settings: AdaLoraSettings) -> tuple[int, int]:
    """(tinit, tfinal) for a run of ``total_step`` steps, clamped to what AdaLoraConfig accepts."""
    tfinal = min(max(1, round(settings.tfinal_share * total_step)), total_step - 1)
    tinit = max(0, min(round(settings.tinit_share * total_step), total_step - tfinal - 1))
    return tinit, tfinal


def target_bits_of(run_dir: str | Path) -> int:
    """On-air bits of another run's delivery, head and overhead included (its summary.json), for ``--match-bits-of``."""
    path = Path(run_dir) / "summary.json"
    try:
        summary = json.loads(path.read_text(encoding="utf-8"))
        bits = summary["on_air_bits"] if "on_air_bits" in summary else summary["transmitted_bits"]
    except (OSError, ValueError, KeyError, TypeError):
        raise AirloraError(f"--match-bits-of {str(run_dir)!r}: expected a finished run folder whose summary.json "
                           "has on_air_bits (or transmitted_bits)") from None
    if isinstance(bits, bool) or not isinstance(bits, int) or bits < 1:
        raise AirloraError(f"--match-bits-of {str(run_dir)!r}: transmitted_bits = {bits!r} is not a positive integer")
    return bits


def default_design_snr_db(config: RunConfig, seed: int) -> float:
    """The SNR whose budget AdaLoRA's final adapter fills when ``adalora.design_snr_db`` is None: in the ``delivery``
    regime the delivery SNR (only the delivery is constrained; as ``trainer.delivery_snr_db`` picks it), in the
    ``paper`` regime the run's lowest SNR (so its final allocation fits every step's budget)."""
    values = sorted(SnrSchedule(config.channel, seed).values)
    if config.train.regime == "paper":
        return values[0]
    delivery = config.channel.delivery_snr_db
    return delivery if delivery is not None else values[(len(values) - 1) // 2]


class AdaLoraAllocator(Allocator):
    """PEFT's AdaLoRA schedule and masks; ranks = triplets kept per module (see the module docstring)."""

    name = "adalora"

    def __init__(self, config: RunConfig, seed: int) -> None:
        super().__init__(config, seed)
        self.settings = config.adalora
        self.total_step = config.train.steps
        self.tinit, self.tfinal = schedule_steps(self.total_step, self.settings)
        # Deliver only AdaLoRA's final allocation, so its adapter is the size its target says (equal-bits runs).
        self.first_deliverable_step = self.total_step - self.tfinal
        self.r_max = config.adapter.r_max
        self.target_bits: int | None = None
        """On-air bits of the final allocation's triplets (head and overhead excluded); set at the first decision."""
        self.precision: int = config.channel.bits_per_param
        """The common precision of every module (joint mode: chosen at the first decision)."""
        self.costs: dict[str, int] = {}
        """Bits per triplet of each module at ``precision``."""
        self.full_bits = 0
        self.sensitivity: TripletSensitivity | None = None
        self.rank_pattern: dict[str, list[bool]] | None = None
        """PEFT's latest masks, by lora_E parameter name; None until the first cut (all triplets kept)."""

    def allocate(self, ctx: AllocationContext) -> Decision:
        if self.target_bits is None:
            self._set_target(ctx)
        if self.rank_pattern is None:
            ranks = {key: self.r_max for key in ctx.budget.keys}
        else:
            keys = self.sensitivity.keys
            ranks = {keys[name.removesuffix(f".lora_E.{ADAPTER}")]: int(sum(mask))
                     for name, mask in self.rank_pattern.items()}
        if len(ctx.budget.allowed_bits) == 1 or self.precision not in ctx.budget.allowed_bits:
            return ranks  # a delivery at another precision set (train.deliver_t_max_s): at its highest
        return ranks, dict.fromkeys(ctx.budget.keys, self.precision)

    def training_ranks(self, ctx: AllocationContext) -> RankMap:
        """``delivery`` regime: AdaLoRA prunes as it trains, so it trains at its own schedule's ranks (monotone in
        total, a final phase at the delivered shape); the channel does not throttle them."""
        return split_decision(self.allocate(ctx))[0]

    def _set_target(self, ctx: AllocationContext) -> None:
        """The final allocation's bits (from target_bits, or what fits T_max at the design SNR) and its precision."""
        budget = ctx.budget
        if self.settings.target_bits is not None:
            total = self.settings.target_bits
        else:
            design = self.settings.design_snr_db
            if design is None:
                design = default_design_snr_db(self.config, self.seed)
            capacity = capacity_bps(design, self.config.channel, ctx.bandwidth_hz)
            total = param_cap(1, capacity, budget.t_max_s)  # the bit cap
        room = total - budget.reserved_bits
        full = {b: self.r_max * int(budget.unit_bits[:, k].sum()) for k, b in enumerate(budget.allowed_bits)}
        fitting = [b for b in budget.allowed_bits if full[b] <= room]
        self.precision = max(fitting) if fitting else budget.allowed_bits[0]
        self.costs = {key: int(c) for key, c in zip(budget.keys, budget.unit_bits_at(
            dict.fromkeys(budget.keys, self.precision)), strict=True)}
        self.full_bits = full[self.precision]
        self.target_bits = int(np.clip(room, 0, self.full_bits))

    def _start(self, model: nn.Module) -> None:
        from peft import AdaLoraConfig

        mean_cost = float(np.mean(list(self.costs.values())))
        target_triplets = min(len(self.costs) * self.r_max, int(self.target_bits // mean_cost))
        peft_config = AdaLoraConfig(
            init_r=self.r_max, target_r=round(target_triplets / len(self.costs)), tinit=self.tinit,
            tfinal=self.tfinal, deltaT=self.settings.delta_t, beta1=self.settings.beta1, beta2=self.settings.beta2,
            total_step=self.total_step, orth_reg_weight=self.config.adapter.orth_reg_weight,
        )
        self.sensitivity = TripletSensitivity(model, peft_config, self.config.adapter.target_modules)
        # PEFT sets target_bgt = target_r · modules (a whole average rank); ours is the bits target in triplets.
        self.sensitivity.peft.target_bgt = target_triplets

    def observe(self, outcome: StepOutcome) -> None:
        """PEFT's phases: warm-up, shrinking budget, final allocation, frozen final ranks."""
        if self.sensitivity is None:
            self._start(outcome.model)
        peft, model, step = self.sensitivity.peft, outcome.model, outcome.step
        final_step = self.total_step - self.tfinal
        if step < final_step:
            # 1. sensitivity EMAs; PEFT's cubic schedule gives this step's triplet budget and whether to mask
            self.sensitivity.update(model)
            budget, mask_now = peft.budget_schedule(step)
            if mask_now and budget < peft.init_bgt:  # kthvalue needs k = init_bgt − budget >= 1
                # the same cubic share of the way from the full adapter to the target, in parameters
                share = (budget - peft.target_bgt) / (peft.init_bgt - peft.target_bgt)  # 1 → 0
                self._mask(model, self.target_bits + share * (self.full_bits - self.target_bits))
        elif step == final_step:
            # 2. final allocation: the most triplets, in PEFT's score order, that fit the target
            self._mask(model, self.target_bits)
            peft.reset_ipt()
        elif self.rank_pattern is not None:
            # 3. final fine-tuning: PEFT re-applies the final masks every step
            peft.mask_using_rank_pattern(model, self.rank_pattern)

    def state_dict(self) -> dict[str, Any]:
        return {"target_bits": self.target_bits, "precision": self.precision, "costs": self.costs,
                "full_bits": self.full_bits,
                "rank_pattern": self.rank_pattern,
                "sensitivity": self.sensitivity.state_dict() if self.sensitivity is not None else None}

    def load_state_dict(self, state: dict[str, Any], ctx: AllocationContext, model: nn.Module) -> None:
        self.target_bits, self.costs, self.precision = state["target_bits"], state["costs"], state["precision"]
        self.full_bits, self.rank_pattern = state["full_bits"], state["rank_pattern"]
        if state["sensitivity"] is not None:
            self._start(model)
            self.sensitivity.load_state_dict(state["sensitivity"])

    def _mask(self, model: nn.Module, bits: float) -> None:
        """PEFT's mask keeping the longest prefix of triplets, best score first, whose on-air bits fit ``bits``."""
        scores = self.sensitivity.scores()
        keys = list(scores)
        values = np.concatenate([scores[key] for key in keys])  # (N,)
        costs = np.repeat([self.costs[key] for key in keys], [scores[key].size for key in keys])  # (N,)
        order = np.argsort(-values, kind="stable")
        keep = int(np.searchsorted(np.cumsum(costs[order]), bits, side="right"))
        if keep < self.sensitivity.peft.init_bgt:
            self.rank_pattern = self.sensitivity.peft.mask_to_budget(model, keep)
        else:
            self.rank_pattern = {f"{name}.lora_E.{ADAPTER}": [True] * self.r_max for name in self.sensitivity.keys}
