"""Rank allocators, each a class with the interface of ``base.Allocator``, found by name.

Names come from ``airlora.registry``: the built-in allocators, those registered in process (``register``) and
those installed packages declare under the entry-point group ``airlora.allocators``. The config validates names
through the registry without importing this package; classes are imported when first asked for, so naming an
allocator does not load PEFT, diffusers or a plugin.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from airlora import registry
from airlora.allocators.base import AllocationContext, Allocator, Decision, PrecisionMap, StepOutcome, split_decision
from airlora.errors import AirloraError
from airlora.registry import ENTRY_POINT_GROUP, register, unregister

if TYPE_CHECKING:
    from airlora.config import RunConfig

__all__ = ["ENTRY_POINT_GROUP", "AllocationContext", "Allocator", "Decision", "PrecisionMap", "StepOutcome",
           "allocator_class", "make_allocator", "names", "register", "split_decision", "unregister"]


def names() -> list[str]:
    """Names accepted by ``--allocator``: built in, registered in process and installed as entry points."""
    return registry.names()


def allocator_class(name: str) -> type[Allocator]:
    """The class registered under ``name``; a plugin that cannot be imported, or is no ``Allocator`` subclass, is
    a one-line error naming where it came from."""
    target, source = registry.target_of(name)
    try:
        if isinstance(target, str):
            module, _, attr = target.partition(":")
            cls: Any = importlib.import_module(module)
            for part in attr.split("."):
                cls = getattr(cls, part)
        elif isinstance(target, type):
            cls = target
        else:  # an entry point
            cls = target.load()
    except Exception as err:  # a plugin's own import error, shown as one line (--debug has the traceback)
        raise AirloraError(f"allocator {name!r} ({source}) cannot be loaded: {type(err).__name__}: {err}") from err
    if not (isinstance(cls, type) and issubclass(cls, Allocator)):
        raise AirloraError(f"allocator {name!r} ({source}) is {cls!r}, not a subclass of "
                           "airlora.allocators.Allocator")
    return cls


def make_allocator(config: RunConfig) -> Allocator:
    """The allocator ``config.allocator`` names, seeded from ``config.train.seed``."""
    cls = allocator_class(config.allocator)
    try:
        return cls(config, config.train.seed)
    except AirloraError:
        raise
    except Exception as err:
        raise AirloraError(f"allocator {config.allocator!r} failed in __init__: {type(err).__name__}: {err}") from err
