"""Rank allocators, each a small class with the interface of ``base.Allocator``, found by name.

The names are the config's (``airlora.config.ALLOCATORS``, which validates them without importing this package);
classes are imported when first asked for, so naming allocators does not load PEFT or diffusers.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from airlora.allocators.base import AllocationContext, Allocator, Decision, PrecisionMap, StepOutcome, split_decision
from airlora.errors import AirloraError

if TYPE_CHECKING:
    from airlora.config import RunConfig

_REGISTRY: dict[str, str] = {
    "uniform": "airlora.allocators.uniform:UniformAllocator",
    "random": "airlora.allocators.random:RandomAllocator",
    "heuristic": "airlora.allocators.heuristic:HeuristicAllocator",
    "adalora": "airlora.allocators.adalora:AdaLoraAllocator",
    "airllm": "airlora.allocators.airllm:AirLLMAllocator",
}

__all__ = ["AllocationContext", "Allocator", "Decision", "PrecisionMap", "StepOutcome", "allocator_class",
           "make_allocator", "names", "split_decision"]


def names() -> list[str]:
    """Names accepted by ``--allocator`` (the same as ``airlora.config.ALLOCATORS``, tested)."""
    return sorted(_REGISTRY)


def allocator_class(name: str) -> type[Allocator]:
    """The class registered under ``name``."""
    if name not in _REGISTRY:
        raise AirloraError(f"allocator {name!r} is unknown; allowed: {', '.join(names())}")
    module, cls = _REGISTRY[name].split(":")
    return getattr(importlib.import_module(module), cls)


def make_allocator(config: RunConfig) -> Allocator:
    """The allocator ``config.allocator`` names, seeded from ``config.train.seed``."""
    return allocator_class(config.allocator)(config, config.train.seed)
