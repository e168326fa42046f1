"""Shared pieces of the benchmarks: the default session and side-by-side timing."""

from __future__ import annotations

import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as `python bench/x.py` from a checkout

import torch  # noqa: E402

from airlora.config import RunConfig, merge  # noqa: E402
from airlora.session import Session, build_session  # noqa: E402


def default_session(**overrides) -> Session:
    """The README's default run (MiniLM + tweets, batch 32), built but not trained."""
    return build_session(merge(RunConfig(), {"train.progress": False, **overrides}))


def interleaved(fns: dict[str, Callable[[int], object]], iters: int, warmup: int = 3) -> dict[str, list[float]]:
    """Seconds per call of each function, calling them in turn so they share the machine's state and load."""
    for i in range(warmup):
        for fn in fns.values():
            fn(i)
    times: dict[str, list[float]] = {name: [] for name in fns}
    for i in range(iters):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn(warmup + i)
            times[name].append(time.perf_counter() - t0)
    return times


def mean(values: list[float]) -> float:
    return statistics.fmean(values)


def matmul_gflops(n: int = 1024, repeats: int = 10) -> float:
    """fp32 GFLOP/s of a square matmul on this machine with the current torch threads (the practical peak)."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    t0 = time.perf_counter()
    for _ in range(repeats):
        a @ b
    return 2 * n**3 * repeats / (time.perf_counter() - t0) / 1e9
