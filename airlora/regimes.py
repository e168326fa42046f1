"""What the 'delivery' regime (``train.regime``) adds to a training step: the ranks trained at, whatever the channel,
and the probe-set loss a learning allocator's candidate delivery is rewarded by (paired against the full adapter on
the same fixed training examples, so the difference has little noise: ~8× less variance than two unpaired batch
losses for whole rank vectors, ~1,400× for one module, measured on MiniLM + the tweets)."""

from __future__ import annotations

import contextlib
import math
from typing import Any

import torch

from airlora.errors import AirloraError
from airlora.session import Session


def training_ranks(session: Session, wanted: Any) -> dict[str, int]:
    """The 'delivery' regime's training ranks: what ``Allocator.training_ranks`` asked for, clipped to [0, r_max]
    (no channel projection: nothing is sent while training), or every triplet when it asked for nothing."""
    r_max, keys = session.config.adapter.r_max, session.adapters.modules
    if wanted is None:
        return dict.fromkeys(keys, r_max)
    if isinstance(wanted, tuple):  # (ranks, precisions): training is at full precision, the ranks are what counts
        wanted = wanted[0]
    if (not isinstance(wanted, dict) or set(wanted) != set(keys)
            or not all(isinstance(v, (int, float)) and math.isfinite(v) for v in wanted.values())):
        raise AirloraError(f"allocator {session.config.allocator!r} returned bad training ranks: expected a rank "
                           f"mapping with exactly the keys {next(iter(keys))} … and finite numbers, or None (every "
                           "triplet)")
    return {key: int(min(max(math.floor(wanted[key]), 0), r_max)) for key in keys}


def probe_loss(session: Session, delivery: tuple[dict[str, int], dict[str, int]] | None) -> float:
    """Mean task loss on the probe set with the model as ``delivery`` (ranks, precisions) would deliver it, or as it
    is (None: the full adapter). No gradients, dropout off: two calls on the same weights are paired."""
    model = session.model
    was_training = model.training
    model.eval()
    total = count = 0.0
    with torch.inference_mode(), session.autocast(), (session.as_delivered(*delivery) if delivery is not None
                                                      else contextlib.nullcontext()):
        for batch in session.probe_batches:
            batch = batch.to(session.device)
            n = int(batch.labels.numel())
            total += float(model(**batch.inputs, labels=batch.labels).loss) * n
            count += n
    model.train(was_training)
    return total / max(count, 1.0)
