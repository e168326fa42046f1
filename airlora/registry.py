"""Allocator names: the built-in ones, those registered in process, and those packages register as entry points.

The one place that knows which names ``allocator`` may take. It imports nothing of airlora but the error type, so
``airlora.config`` validates a name without importing ``airlora.allocators`` (which imports the config back), and
naming an allocator loads no allocator code. ``airlora.allocators.allocator_class`` turns a name into its class.

Three sources, looked up in this order (a name is never taken twice):
- built in: ``BUILTIN``, each a ``"module:Class"`` path imported when first asked for;
- in process: ``register(name, cls)`` (``airlora.allocators.register``), a class or a ``"module:Class"`` path;
- entry points of the group ``airlora.allocators`` in installed packages' metadata, e.g. in a pyproject.toml::

      [project.entry-points."airlora.allocators"]
      top-down = "airlora_topdown:TopDownAllocator"

  read once per process, when a name is neither built in nor registered.
"""

from __future__ import annotations

import functools
import re
from importlib import metadata
from typing import Any

from airlora.errors import AirloraError

ENTRY_POINT_GROUP = "airlora.allocators"
BUILTIN: dict[str, str] = {
    "uniform": "airlora.allocators.uniform:UniformAllocator",
    "random": "airlora.allocators.random:RandomAllocator",
    "heuristic": "airlora.allocators.heuristic:HeuristicAllocator",
    "adalora": "airlora.allocators.adalora:AdaLoraAllocator",
    "airllm": "airlora.allocators.airllm:AirLLMAllocator",
    "compress": "airlora.allocators.compress:CompressAllocator",
}
"""The allocators airlora ships: name -> ``"module:Class"``."""
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]*$")
_registered: dict[str, Any] = {}
"""In-process registrations: name -> class or ``"module:Class"`` path."""


@functools.cache
def entry_points() -> dict[str, metadata.EntryPoint]:
    """The group's entry points by name (first one wins where two packages use a name; built-in names are skipped)."""
    found: dict[str, metadata.EntryPoint] = {}
    for point in metadata.entry_points(group=ENTRY_POINT_GROUP):
        if point.name not in BUILTIN:
            found.setdefault(point.name, point)
    return found


def register(name: str, target: Any, replace: bool = False) -> None:
    """Make ``name`` an allocator name in this process: ``target`` is an ``Allocator`` subclass or a
    ``"module:Class"`` path. A built-in name cannot be taken; another registration only with ``replace``."""
    if not isinstance(name, str) or not _NAME.match(name):
        raise AirloraError(f"allocator name {name!r} is not allowed; expected letters, digits and _ . + - (not "
                           "starting with a punctuation mark)")
    if name in BUILTIN:
        raise AirloraError(f"allocator name {name!r} is built in; register yours under another name")
    if name in _registered and not replace:
        raise AirloraError(f"allocator {name!r} is already registered in this process; pass replace=True to "
                           "replace it")
    if not (isinstance(target, type) or (isinstance(target, str) and ":" in target)):
        raise AirloraError(f"allocator {name!r}: register an Allocator subclass or a 'module:Class' path, "
                           f"not {target!r}")
    _registered[name] = target


def unregister(name: str) -> None:
    """Forget an in-process registration (nothing happens for a name that is not registered)."""
    _registered.pop(name, None)


def registered() -> dict[str, Any]:
    """The in-process registrations: name -> class or path."""
    return dict(_registered)


def importable(target: Any) -> str | None:
    """The ``"module:Class"`` path another process can import ``target`` by, or None (a class made in ``__main__``
    or inside a function)."""
    if isinstance(target, str):
        return target
    module, qualname = getattr(target, "__module__", ""), getattr(target, "__qualname__", "")
    if module in ("__main__", "__mp_main__") or "<locals>" in qualname:
        return None
    return f"{module}:{qualname}"


def is_known(name: Any) -> bool:
    """True when ``name`` is built in, registered in process or an installed entry point."""
    return isinstance(name, str) and (name in BUILTIN or name in _registered or name in entry_points())


def names() -> list[str]:
    """Every allocator name, sorted: built in, registered and installed."""
    return sorted({*BUILTIN, *_registered, *entry_points()})


def allowed_text() -> str:
    """The names ``allocator`` accepts, as an error message says them."""
    plugins = sorted({*_registered, *entry_points()})
    text = f"one of {', '.join(sorted(BUILTIN))}"
    if plugins:
        text += f" (built in) or {', '.join(plugins)} (plugins)"
    return (text + f", or a name a package registers under the entry-point group '{ENTRY_POINT_GROUP}' "
            "(airlora.allocators.register in process)")


def target_of(name: str) -> tuple[Any, str]:
    """(class or ``"module:Class"`` path, where it comes from, for messages) of a known name."""
    if name in BUILTIN:
        return BUILTIN[name], "built in"
    if name in _registered:
        return _registered[name], "registered in process"
    point = entry_points().get(name)
    if point is None:
        raise AirloraError(f"allocator = {name!r} is not allowed; expected {allowed_text()}")
    package = point.dist.name if point.dist is not None else "an installed package"
    return point, f"entry point {point.name} = {point.value!r} of {package}"
