"""The optimiser side of one training step: AdamW over the adapters and the task head, its learning-rate schedule,
and the step itself. Shared by the training loop (``airlora.trainer``) and the Gymnasium environment.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch.optim.lr_scheduler import LambdaLR

from airlora import distributed
from airlora.adapters import forget_momentum
from airlora.batching import Batch
from airlora.errors import AirloraError
from airlora.session import Session


def linear_warmup_decay(warmup_steps: int, total_steps: int) -> Callable[[int], float]:
    """The learning-rate factor of step s: linear warm-up to 1 over ``warmup_steps``, then linear decay to 0.

    The same schedule as transformers' ``get_linear_schedule_with_warmup`` (tested against it); written here
    because importing ``transformers.optimization`` imports PEFT too, seconds at every start of a run.
    """
    warmup = min(warmup_steps, total_steps)

    def factor(step: int) -> float:
        if step < warmup:
            return step / max(1, warmup)
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup))

    return factor


class NonFiniteLoss(AirloraError):
    """The task loss of a batch was NaN or infinite."""


class FineTuner:
    """The optimiser side of one training step, shared by the training loop and the Gymnasium environment."""

    def __init__(self, session: Session) -> None:
        cfg = session.config
        self.session = session
        # no weight decay on adapters, so cut triplets stay exactly as they were (see adapters.forget_momentum)
        # fused: one kernel over every tensor instead of ~10 ops per tensor per step, so the optimiser's cost does
        # not grow with the number of adapted modules (three tensors each); the CPU and CUDA both have it for fp32
        self.optimizer = torch.optim.AdamW(
            [
                {"params": session.adapters.parameters(), "lr": cfg.train.lr, "weight_decay": 0.0},
                {"params": list(session.head.values()), "lr": cfg.train.head_lr, "weight_decay": 0.01},
            ],
            fused=True,
        )
        self.scheduler = LambdaLR(self.optimizer, linear_warmup_decay(cfg.train.warmup_steps, cfg.train.steps))
        self.forward = distributed.wrap(session)  # the step's loss; under DDP in a job of several processes

    def apply(self, ranks: dict[str, int], precisions: dict[str, int] | None = None) -> None:
        """Deploy a feasible rank mapping (cut triplets keep their values) and, with ``train.quantization_aware``,
        the precisions the training forward fake-quantises at."""
        forget_momentum(self.optimizer, self.session.adapters.set_ranks(ranks))
        if self.session.config.train.quantization_aware:
            self.session.adapters.set_training_precisions(precisions)

    def step(self, batch: Batch) -> float:
        """Forward, backward and optimiser step on one batch; gradients stay until ``zero_grad``."""
        cfg = self.session.config
        local = distributed.local_batch(batch).to(self.session.device)  # this process's rows of the global batch
        rows, global_rows = len(local.labels), len(batch.labels)
        total, loss = self.forward(local, distributed.gradient_weight(rows, global_rows), cfg.adapter.orth_reg_weight)
        task_loss = distributed.global_mean(float(loss.detach()), rows, global_rows)  # the global batch's loss
        if not math.isfinite(task_loss):  # before the update, so a NaN never reaches the weights
            raise NonFiniteLoss(f"training loss became {task_loss}; lower train.lr (now {cfg.train.lr})")
        total.backward()
        self.optimizer.step()
        self.scheduler.step()
        return task_loss

    def zero_grad(self) -> None:
        """Drop this step's gradients (after the allocator has seen them)."""
        self.optimizer.zero_grad(set_to_none=True)
