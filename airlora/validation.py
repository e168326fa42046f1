"""Field checks shared by every config dataclass: one ``AirloraError`` naming the field and what is allowed."""

from __future__ import annotations

import math
import typing
from typing import Any

from airlora.errors import AirloraError


def _check(ok: bool, name: str, allowed: str, value: Any) -> None:
    if not ok:
        raise AirloraError(f"{name} = {value!r} is not allowed; expected {allowed}")


def _finite(value: float) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _one_of(kind: Any) -> str:
    return "one of " + ", ".join(repr(a) for a in typing.get_args(kind))
