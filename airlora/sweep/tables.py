"""The paper's tables (III–VI) and ours, as markdown, from a sweep's result rows."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterable
from functools import cache
from typing import Any

from airlora.config import RunConfig, flatten
from airlora.sweep.rows import PAPER_SUFFIX
from airlora.sweep.stats import mean_ci

Row = dict[str, Any]

LABELS = {
    "ppo": "PPO", "ddim": "DDIM", "ppo+ddpm": "PPO+DDPM", "ppo+ddim-mlp": "AirLLM (PPO+DDIM/MLP)",
    "ppo+ddim-unet": "PPO+DDIM/U-Net", "adalora": "AdaLoRA", "uniform": "Uniform", "random": "Random",
    "heuristic": "Channel heuristic",
}
"""What each method is called in tables and legends; ppo+ddim-mlp is the paper's AirLLM."""

ORDER = ["ppo", "ddim", "ppo+ddpm", "ppo+ddim-mlp", "ppo+ddim-unet", "adalora", "uniform", "random", "heuristic"]


def label(method: str) -> str:
    base = method.removesuffix(PAPER_SUFFIX)
    return LABELS.get(base, base) + (" [paper MDP]" if base != method else "")


def of(rows: Iterable[Row], experiment: str) -> list[Row]:
    """The finished rows of one experiment."""
    return [r for r in rows if r["status"] == "ok" and experiment in r["experiments"]]


def group(rows: Iterable[Row], key: str | Callable[[Row], Any]) -> dict[Any, list[Row]]:
    """Rows by the value of ``key`` (a row field or a function), in first-seen order."""
    out: dict[Any, list[Row]] = defaultdict(list)
    for r in rows:
        out[key(r) if callable(key) else r[key]].append(r)
    return dict(out)


SHOWN_ELSEWHERE = ("allocator", "policy.variant", "train.seed", "train.regime")
"""Params a setting's name already says (the method and its regime) or that a table pools over (the seed)."""


def setting(row: Row) -> str:
    """What a run set besides its seed: its method and each value that differs from the defaults."""
    defaults = _defaults()
    extra = [f"{key.rsplit('.', 1)[-1]} {_value(value)}" for key, value in sorted(row["params"].items())
             if key not in SHOWN_ELSEWHERE and defaults.get(key, object()) != value]
    return ", ".join([label(row["method"])] + extra)


@cache
def _defaults() -> dict[str, Any]:
    return flatten(RunConfig().to_dict())


def _value(value: Any) -> str:
    return ",".join(f"{v:g}" for v in value) if isinstance(value, list) else f"{value:g}" if isinstance(
        value, float) else str(value)


def methods_in(rows: Iterable[Row]) -> list[str]:
    present = {r["method"] for r in rows}
    known = [m + suffix for m in ORDER for suffix in ("", PAPER_SUFFIX) if m + suffix in present]
    return known + sorted(present - set(known))


def cell(rows: list[Row], field: str, digits: int = 4, scale: float = 1.0) -> str:
    return mean_ci([r[field] for r in rows]).format(digits, scale)


def markdown(header: list[str], body: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in body]
    return "\n".join(lines)


def table_methods(rows: list[Row]) -> str:
    """Table III: accuracy, delivered size and mean reward per method."""
    by_method = group(rows, "method")
    body = [[label(m), cell(by_method[m], "test_accuracy"), cell(by_method[m], "transmitted_params", 0),
             cell(by_method[m], "mean_reward", 3)] for m in methods_in(rows)]
    return markdown(["method", "test accuracy", "transmitted params", "mean reward"], body)


def table_by(rows: list[Row], key: str, key_title: str, methods: bool = True,
             fields: tuple[tuple[str, str, int, float], ...] = (("test accuracy", "test_accuracy", 4, 1.0),)) -> str:
    """One line per value of ``key`` (and per method when ``methods``), one column per field."""
    body = []
    for value, chunk in sorted(group(rows, key).items(), key=lambda kv: _sort_key(kv[0])):
        parts = group(chunk, "method") if methods else {None: chunk}
        for method in (methods_in(chunk) if methods else [None]):
            line = [str(value)] + ([label(method)] if methods else [])
            line += [cell(parts[method], f, digits, scale) for _, f, digits, scale in fields]
            body.append(line)
    header = [key_title] + (["method"] if methods else []) + [title for title, *_ in fields]
    return markdown(header, body)


def table_settings(rows: list[Row]) -> str:
    """One line per distinct setting (its runs differ only in the seed), by increasing mean on-air bits."""
    chunks = sorted(group(rows, setting).items(), key=lambda kv: mean_ci([r["transmitted_bits"] for r in kv[1]]).mean)
    body = [[name, cell(chunk, "test_accuracy"), cell(chunk, "transmitted_bits", 3, 1e-6)] for name, chunk in chunks]
    return markdown(["setting", "test accuracy", "on-air Mbit"], body)


def _sort_key(value: Any) -> tuple[int, Any]:
    try:
        return (0, float(str(value).split(",")[0]))
    except ValueError:
        return (1, str(value))
