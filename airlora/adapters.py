"""SVD-form adapters with a rank that can change at every step (AdaLoRA's W0 + P·diag(λ)·Q).

Letters: B batch, T tokens, d_in / d_out the linear's sizes, R = r_max stored triplets, r active rank.

Which triplets are active: when a module's rank changes to r, the r triplets with the largest |λ|
become active (ties go to the lower index). With P and Q kept near-orthonormal by the regulariser,
λ are the singular values of ΔW, so dropping the smallest |λ| is the best rank-r cut of ΔW
(Eckart–Young). While the rank stays the same the active set stays the same.

Cut triplets keep their values: they are excluded from the forward (no gradient reaches them) and
``forget_momentum`` clears their optimiser momentum, so with no weight decay an Adam step leaves them
exactly unchanged. A later rank increase restores them where they were instead of from zero.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cached_property

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from airlora.codecs import Codec, codec, fake_quantise, lambda_codec, round_trip
from airlora.config import AdapterConfig
from airlora.models import ModuleMap
from airlora.ranks import RankMap


class SVDLinear(nn.Module):
    """A frozen linear layer plus an SVD adapter of up to ``r_max`` triplets, ``rank`` of them active."""

    def __init__(self, base: nn.Linear, r_max: int, alpha: float, generator: torch.Generator) -> None:
        super().__init__()
        self.base = base
        d_in, d_out = base.in_features, base.out_features
        self.r_max = r_max
        self.scaling = alpha / r_max  # fixed: a rank cut must not rescale the triplets that remain
        # PEFT AdaLoRA's names and shapes (lora_A = Q, lora_B = P, lora_E = λ as (R, 1), adapter "default"),
        # so PEFT's own RankAllocator can score these triplets and the export maps one to one.
        # Orthonormal P columns and Q rows satisfy the regulariser from the start; λ = 0 makes ΔW = 0.
        self.lora_B = nn.ParameterDict({"default": nn.Parameter(_orthonormal(d_out, r_max, generator))})  # (d_out, R)
        self.lora_A = nn.ParameterDict(
            {"default": nn.Parameter(_orthonormal(d_in, r_max, generator).T.contiguous())}  # (R, d_in)
        )
        self.lora_E = nn.ParameterDict({"default": nn.Parameter(torch.zeros(r_max, 1))})  # (R, 1)
        self.register_buffer("active", torch.arange(r_max), persistent=False)  # (r,) sorted indices
        self.register_buffer("active_mask", torch.ones(r_max), persistent=False)  # (R,) 1.0 where active
        self.rank = r_max
        self.train_codec: Codec | None = None
        """Quantisation-aware training: the codec the training forward fake-quantises the active triplets with."""

    @property
    def P(self) -> nn.Parameter:  # (d_out, R)
        return self.lora_B["default"]

    @property
    def Q(self) -> nn.Parameter:  # (R, d_in)
        return self.lora_A["default"]

    @property
    def lam(self) -> torch.Tensor:  # (R,) view of lora_E
        return self.lora_E["default"].view(-1)

    def set_rank(self, rank: int) -> torch.Tensor | None:
        """Activate the ``rank`` triplets with the largest |λ|; return the indices just deactivated, if any."""
        if rank == self.rank:
            return None
        # numpy on the CPU copy of λ: at R ≤ a few hundred this is several times cheaper than torch ops, and the
        # trainer calls it for every module at every rank change
        magnitude = np.abs(self.lam.detach().cpu().numpy())
        active = np.sort(np.argsort(-magnitude, kind="stable")[:rank])
        cut = np.setdiff1d(self.active.cpu().numpy(), active, assume_unique=True)
        self.activate(torch.from_numpy(active).to(self.lam.device))
        return torch.from_numpy(cut).to(self.lam.device) if cut.size else None

    def activate(self, active: torch.Tensor) -> None:
        """Make exactly the triplets at the sorted indices ``active`` (r,) the active ones."""
        self.active, self.rank = active, int(active.numel())
        self.active_mask = torch.zeros_like(self.active_mask).index_fill_(0, active, 1.0)

    def active_factors(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(P_a (d_out, r), λ_a (r,), Q_a (r, d_in)) of the active triplets."""
        if self.rank == self.r_max:
            return self.P, self.lam, self.Q
        return self.P.index_select(1, self.active), self.lam.index_select(0, self.active), self.Q.index_select(
            0, self.active
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (B, T, d_in)
        if self.rank == 0:
            return self.base(x)
        if not torch.is_grad_enabled() and type(self.base) is nn.Linear:
            # evaluation: one matmul with W0 + ΔW (ΔW costs d_out·d_in·r, nothing next to B·T tokens) instead of
            # two narrow memory-bound matmuls and an add over every token; profiled at ~20 % of an eval pass
            weight = self.base.weight + self.delta_weight().to(self.base.weight.dtype)
            return F.linear(x, weight, self.base.bias)
        out = self.base(x)
        P, lam, Q = self.active_factors()  # only the r active triplets are multiplied
        if self.train_codec is not None:  # the values the edge will get, with straight-through gradients
            c = self.train_codec
            P, lam, Q = fake_quantise(c, P.T).T, fake_quantise(lambda_codec(c), lam), fake_quantise(c, Q)
        h = F.linear(x.to(Q.dtype), Q * (lam * self.scaling)[:, None])  # (B, T, r); λ folded into Q's r rows
        if out.dtype != h.dtype:
            return out + F.linear(h, P).to(out.dtype)
        # the add fused into the second matmul: one pass over the (B·T, d_out) output instead of two
        return torch.addmm(out.reshape(-1, out.shape[-1]), h.reshape(-1, h.shape[-1]), P.T).view(out.shape)

    def delta_weight(self) -> torch.Tensor:
        """ΔW = scaling·P_a·diag(λ_a)·Q_a, shape (d_out, d_in)."""
        P, lam, Q = self.active_factors()
        return (P * (lam * self.scaling)) @ Q

    def orthogonality(self) -> torch.Tensor:
        """||P_aᵀP_a − I||²_F + ||Q_aQ_aᵀ − I||²_F over the active triplets."""
        return _gram_penalty(self.P.T[None], self.active_mask[None]) + _gram_penalty(self.Q[None],
                                                                                    self.active_mask[None])


def _gram_penalty(rows: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Σ_g ||M_g ⊙ (A_g A_gᵀ − I)||²_F with M_g = m_g m_gᵀ: (G, R, d) factors, (G, R) 0/1 masks -> ().

    The mask keeps exactly the active rows' block of each Gram matrix, so this is the penalty of the active
    triplets alone, computed on all R rows: no index_select per module, and one batched matmul for a group.
    """
    eye = torch.eye(rows.shape[1], dtype=rows.dtype, device=rows.device)
    outer = mask[:, :, None] * mask[:, None, :]  # (G, R, R)
    return ((torch.bmm(rows, rows.transpose(1, 2)) - eye) * outer).pow(2).sum()


def _orthonormal(rows: int, cols: int, generator: torch.Generator) -> torch.Tensor:
    """A (rows, cols) matrix with orthonormal columns (rows ≥ cols) or rows (rows < cols), seeded."""
    gauss = torch.randn(max(rows, cols), min(rows, cols), generator=generator)
    q, _ = torch.linalg.qr(gauss)
    return q if rows >= cols else q.T


@dataclass
class AdapterSet:
    """All adapters of one model, addressed by rank key (``layers.{i}.{module}``)."""

    modules: dict[str, SVDLinear]
    module_map: ModuleMap
    r_max: int

    @classmethod
    def inject(cls, model: nn.Module, module_map: ModuleMap, config: AdapterConfig, seed: int) -> AdapterSet:
        """Freeze ``model`` and replace each mapped linear with an ``SVDLinear`` (in place)."""
        for p in model.parameters():
            p.requires_grad_(False)
        generator = torch.Generator().manual_seed(seed)
        modules = {}
        for key, name in module_map.names.items():
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name)
            wrapped = SVDLinear(getattr(parent, child), config.r_max, config.alpha, generator)
            setattr(parent, child, wrapped)
            modules[key] = wrapped
        adapters = cls(modules, module_map, config.r_max)
        init = config.r_max if config.init_rank is None else config.init_rank
        adapters.set_ranks({key: init for key in modules})
        return adapters

    def ranks(self) -> RankMap:
        """The active rank of every module."""
        return {key: m.rank for key, m in self.modules.items()}

    def set_ranks(self, ranks: RankMap) -> list[tuple[nn.Parameter, int, torch.Tensor]]:
        """Apply a (feasible) rank mapping; return (parameter, dim, indices) of every triplet just cut."""
        cuts = []
        for key, module in self.modules.items():
            cut = module.set_rank(int(ranks[key]))
            if cut is not None:
                cuts += [(module.P, 1, cut), (module.lora_E["default"], 0, cut), (module.Q, 0, cut)]
        return cuts

    @contextlib.contextmanager
    def ranks_for_evaluation(self, ranks: RankMap) -> Iterator[None]:
        """Evaluate at ``ranks`` (top-|λ| triplets, as a delivery would send them), then put back the exact active
        sets of training: the optimiser and the training trajectory never see the change."""
        before = {key: m.active.clone() for key, m in self.modules.items()}
        self.set_ranks(ranks)
        try:
            yield
        finally:
            for key, m in self.modules.items():
                m.activate(before[key])

    def set_training_precisions(self, precisions: dict[str, int] | None) -> None:
        """Quantisation-aware training: fake-quantise each module's active triplets at its precision in the training
        forward (straight-through estimator); None turns it off. Evaluation is unaffected (see ``as_delivered``)."""
        for key, module in self.modules.items():
            bits = None if precisions is None else precisions[key]
            module.train_codec = None if bits is None or bits == 32 else codec(bits)

    @contextlib.contextmanager
    def as_delivered(self, ranks: RankMap, precisions: dict[str, int] | None = None,
                     head: dict[str, nn.Parameter] | None = None, head_bits: int = 32) -> Iterator[None]:
        """Evaluate the model as the edge will have it: ``ranks`` (as ``ranks_for_evaluation``) and every active
        triplet, and the head, through its codec's round trip; the exact values and active sets are put back after.

        The same functions as the exporter's (``airlora.codecs``), so the accuracy measured here is the edge's.
        """
        saved: dict[str, tuple[torch.Tensor, ...]] = {}
        saved_head: dict[str, torch.Tensor] = {}
        with self.ranks_for_evaluation(ranks):
            try:
                with torch.no_grad():
                    for key, m in self.modules.items():
                        bits = 32 if precisions is None else precisions[key]
                        if bits == 32 or not m.rank:
                            continue
                        c = codec(bits)
                        saved[key] = (m.P.detach().clone(), m.lam.detach().clone(), m.Q.detach().clone())
                        P, lam, Q = m.active_factors()
                        P_hat, lam_hat, Q_hat = round_trip(c, P.T).T, round_trip(lambda_codec(c), lam), round_trip(c, Q)
                        m.P[:, m.active], m.lam[m.active], m.Q[m.active] = P_hat, lam_hat, Q_hat
                    if head is not None and head_bits != 32:
                        for name, p in head.items():
                            saved_head[name] = p.detach().clone()
                            p.copy_(round_trip(codec(head_bits), p))
                yield
            finally:
                with torch.no_grad():
                    for key, (P, lam, Q) in saved.items():
                        m = self.modules[key]
                        m.P.copy_(P)
                        m.lam.copy_(lam)
                        m.Q.copy_(Q)
                    for name, value in saved_head.items():
                        head[name].copy_(value)

    def parameters(self) -> list[nn.Parameter]:
        """Every adapter parameter (all r_max triplets of every module)."""
        return [p for m in self.modules.values() for p in (m.P, m.lora_E["default"], m.Q)]

    def orthogonality(self) -> torch.Tensor:
        """Mean orthogonality penalty over adapted modules (the regulariser added to the task loss).

        The modules' P and Q factors are stacked by shape (four groups in a transformer layer's six modules) and
        each group is one batched Gram matrix, so the op count per step does not grow with the number of modules
        (it was ~12 ops per module, forward and backward each).
        """
        total = sum(
            _gram_penalty(torch.stack([m.P for m in members]).transpose(1, 2) if kind == "P"
                          else torch.stack([m.Q for m in members]),
                          torch.stack([m.active_mask for m in members]))
            for (kind, _), members in self._shape_groups.items()
        )
        return total / len(self.modules)

    @cached_property
    def _shape_groups(self) -> dict[tuple[str, tuple[int, ...]], list[SVDLinear]]:
        """Modules grouped by the shape of their P, and separately of their Q: ("P" | "Q", shape) -> modules."""
        groups: dict[tuple[str, tuple[int, ...]], list[SVDLinear]] = {}
        for m in self.modules.values():
            groups.setdefault(("P", tuple(m.P.shape)), []).append(m)
            groups.setdefault(("Q", tuple(m.Q.shape)), []).append(m)
        return groups

    def active_tensors(self) -> dict[str, torch.Tensor]:
        """What goes on air: Q_a, P_a, λ_a of every module with rank > 0, as ``{key}.lora_A|lora_B|lora_E``."""
        out = {}
        for key, module in self.modules.items():
            if module.rank:
                P, lam, Q = (t.detach().contiguous() for t in module.active_factors())
                out.update({f"{key}.lora_A": Q, f"{key}.lora_B": P, f"{key}.lora_E": lam.view(-1, 1)})
        return out

    def state(self) -> dict[str, torch.Tensor]:
        """Every stored triplet and the active sets, for checkpoints (cut triplets included)."""
        out = {}
        for key, m in self.modules.items():
            out.update({f"{key}.P": m.P.detach().clone(), f"{key}.lam": m.lam.detach().clone(),
                        f"{key}.Q": m.Q.detach().clone(), f"{key}.active": m.active.clone()})
        return out

    def load_state(self, state: dict[str, torch.Tensor]) -> None:
        """Restore what ``state`` returned: triplet values, active sets and ranks."""
        with torch.no_grad():
            for key, m in self.modules.items():
                m.P.copy_(state[f"{key}.P"])
                m.lam.copy_(state[f"{key}.lam"])
                m.Q.copy_(state[f"{key}.Q"])
                m.activate(state[f"{key}.active"].clone())


def forget_momentum(optimizer: torch.optim.Optimizer, cuts: list[tuple[nn.Parameter, int, torch.Tensor]]) -> None:
    """Zero the first-moment (momentum) state of cut triplets so the optimiser leaves them unchanged.

    A cut triplet's gradient is exactly zero; with zero momentum and no weight decay Adam's update is
    zero too (SGD's momentum buffer likewise). The second moment may stay: it only scales a zero update.
    """
    for param, dim, index in cuts:
        state = optimizer.state.get(param)
        if not state:
            continue
        for name in ("exp_avg", "momentum_buffer"):
            if state.get(name) is not None:
                state[name].index_fill_(dim, index, 0.0)
