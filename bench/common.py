"""Shared pieces of the benchmarks: the default session and side-by-side timing."""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as `python bench/x.py` from a checkout

import torch  # noqa: E402

from airlora.config import RunConfig, merge  # noqa: E402
from airlora.io import write_text_atomic  # noqa: E402
from airlora.session import Session, build_session  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


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


def commit(checkout: Path = ROOT) -> str:
    """The short commit of a checkout, with '+changes' when its tracked files differ from it."""
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=checkout)
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True,
                           cwd=checkout).stdout.strip()
    return head.stdout.strip() + ("+changes" if dirty else "")


def import_seconds(env: dict[str, str] | None = None) -> float:
    """Seconds a fresh interpreter takes to import what `airlora run` imports before it builds the run."""
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-c", "import airlora.cli, airlora.runner, transformers.models.bert"], check=True,
                   env=env, cwd=ROOT)
    return time.perf_counter() - t0


def emit(result: dict, out: Path | None) -> None:
    """Print a bench's JSON result and, with ``out``, write it there atomically."""
    text = json.dumps(result, indent=2)
    print(text)
    if out:
        write_text_atomic(out, text + "\n")
