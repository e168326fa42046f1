"""airlora: communication-aware LoRA rank allocation for remote fine-tuning over a wireless link (AirLLM).

The Python API is the command's own code path; its names are imported on first use, so ``import airlora`` loads
neither torch nor the models::

    from airlora import RunConfig, merge, run

    config = merge(RunConfig(allocator="airllm"), {"train.steps": 40, "channel.snr_db": [0.0]})
    summary = run(config, "runs/airllm-40")  # the dict written to runs/airllm-40/summary.json
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"
__all__ = ["RunConfig", "load_config", "merge", "run"]


def __getattr__(name: str) -> Any:
    """``run`` (``airlora.runner.run``) and the config helpers of ``airlora.config``, imported when first asked for."""
    if name == "run":
        from airlora.runner import run

        return run
    if name in ("RunConfig", "load_config", "merge"):
        from airlora import config

        return getattr(config, name)
    raise AttributeError(f"module 'airlora' has no attribute {name!r}")
