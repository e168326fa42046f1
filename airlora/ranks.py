"""The one rank format: a mapping ``"layers.{i}.{module}" -> int``, shaped like PEFT's ``rank_pattern``."""

from __future__ import annotations

import re

from airlora.errors import AirloraError

MODULES: tuple[str, ...] = ("q", "k", "v", "o", "fc1", "fc2")
"""Canonical names of the six adapted modules of a layer (attention q, k, v, o; FFN fc1, fc2)."""

RankMap = dict[str, int]

_KEY = re.compile(r"^layers\.(\d+)\.(q|k|v|o|fc1|fc2)$")


def rank_key(layer: int, module: str) -> str:
    """The rank-mapping key of one (layer, module) adapter."""
    return f"layers.{layer}.{module}"


def parse_key(key: str) -> tuple[int, str]:
    """Split ``"layers.{i}.{module}"`` into ``(i, module)``."""
    match = _KEY.match(key)
    if match is None:
        raise AirloraError(f"rank key {key!r}: expected 'layers.<i>.<module>' with module in {', '.join(MODULES)}")
    return int(match.group(1)), match.group(2)


def all_keys(num_layers: int) -> list[str]:
    """Every key of a model with ``num_layers`` layers, layer-major, in the canonical module order."""
    return [rank_key(i, m) for i in range(num_layers) for m in MODULES]


def validate_ranks(ranks: dict[str, int], keys: list[str], r_max: int) -> RankMap:
    """Check a user-given mapping: known keys, integer ranks in [0, r_max]. Missing keys get rank 0."""
    known = set(keys)
    for key, value in ranks.items():
        if key not in known:
            raise AirloraError(f"rank key {key!r} is not a module of this model; allowed: {keys[0]} … {keys[-1]}")
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= r_max:
            raise AirloraError(f"rank of {key!r} is {value!r}; allowed: an integer in [0, {r_max}]")
    return {key: int(ranks.get(key, 0)) for key in keys}
