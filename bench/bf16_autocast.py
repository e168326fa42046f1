"""bf16 autocast vs fp32 training steps on the default model and batch, side by side in one process.

    python bench/bf16_autocast.py [--iters 2]

Prints the step-time ratio (> 1: bf16 is slower) and the largest loss difference on the same batches. On CPUs
without AVX512-BF16 or AMX bf16 matmuls fall back to slow kernels, which is why train.autocast defaults to off;
on a GPU, run it there to see the other side.
"""

from __future__ import annotations

import argparse
import json

from common import default_session, interleaved, mean

from airlora.finetuner import FineTuner


def measure(iters: int = 2) -> dict[str, float]:
    losses: dict[str, list[float]] = {"fp32": [], "bf16": []}
    steps = {}
    for name, mode in (("fp32", "off"), ("bf16", "bf16")):
        session = default_session(**{"train.autocast": mode})
        tuner = FineTuner(session)
        session.model.train()

        def step(i: int, session=session, tuner=tuner, name=name) -> None:
            losses[name].append(tuner.step(session.train_batches.batch(i)))
            tuner.zero_grad()

        steps[name] = step
    times = interleaved(steps, iters, warmup=1)
    return {
        "bf16_step_time_vs_fp32": mean(times["bf16"]) / mean(times["fp32"]),
        "fp32_step_s": mean(times["fp32"]),
        "bf16_step_s": mean(times["bf16"]),
        "max_loss_difference": max(abs(a - b) for a, b in zip(losses["fp32"], losses["bf16"], strict=True)),
    }


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iters", type=int, default=2)
    print(json.dumps(measure(parser.parse_args().iters), indent=2))
