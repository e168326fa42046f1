"""Policy decision time vs training-step time on the default model and batch, measured in turn in one process.

    python bench/decision_overhead.py [--iters 30]

Prints decision_overhead_ratio (mean decision / mean training step; the issue's goal is <= 0.01), the step's
FLOPs counted by torch's FlopCounterMode, and the step's GFLOP/s against this machine's fp32 matmul rate.
"""

from __future__ import annotations

import argparse
import json

from common import default_session, interleaved, matmul_gflops, mean
from torch.utils.flop_counter import FlopCounterMode

from airlora.finetuner import FineTuner
from airlora.trainer import context


def measure(iters: int = 30) -> dict[str, float]:
    session = default_session(allocator="airllm")
    tuner = FineTuner(session)
    session.model.train()
    ranks = session.adapters.ranks()
    batches = [session.train_batches.batch(step) for step in range(iters + 3)]  # built once, as the loop does

    def decide(step: int) -> None:
        session.allocator.allocate(context(session, step, ranks, batches[step]))

    def train_step(step: int) -> None:
        tuner.step(batches[step])
        tuner.zero_grad()

    times = interleaved({"decision": decide, "step": train_step}, iters)
    with FlopCounterMode(display=False) as counter:
        train_step(0)
    flops = counter.get_total_flops()
    step_s = mean(times["step"])
    peak = matmul_gflops()
    return {
        "decision_overhead_ratio": mean(times["decision"]) / step_s,
        "decision_ms": 1e3 * mean(times["decision"]),
        "train_step_s": step_s,
        "train_step_gflop": flops / 1e9,
        "train_step_gflops_per_s": flops / step_s / 1e9,
        "matmul_fp32_gflops_per_s": peak,
        "share_of_matmul_rate": flops / step_s / 1e9 / peak,
        "ranks_all": sum(ranks.values()),
    }


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iters", type=int, default=30)
    print(json.dumps(measure(parser.parse_args().iters), indent=2))
