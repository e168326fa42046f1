"""A sweep file expanded into runs: the shared base config, named experiments, seeds.

Format (YAML or JSON)::

    base:              # RunConfig keys every run shares
      train: {steps: 100}
    seeds: [0, 1, 2]   # crossed with every experiment (train.seed)
    experiments:
      table3:          # one grid, or a list of grids whose runs are pooled
        - {allocator: [airllm], policy.variant: [ppo, ddim]}
        - {allocator: [adalora]}

A grid maps dotted config paths to lists of values; its runs are their cartesian product. Two experiments
that ask for the same config share one run, so defaults reused across tables are trained once.

``posthoc`` (optional) exports finished runs and evaluates each delivery on the edge, with no extra training::

    posthoc:
      experiments: [budget_front]   # the runs of these experiments
      exports: [8, run]             # 8: at int8, for runs with one allowed precision above 8 (rank-only, post-hoc);
                                    # run: at the precisions the run chose, for runs allowed several (joint)
"""

from __future__ import annotations

import hashlib
import itertools
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from airlora.config import RunConfig, flatten, from_dict, merge
from airlora.errors import AirloraError

SWEEP_KEYS = ("name", "base", "seeds", "experiments", "workers", "threads_per_run", "posthoc")
POSTHOC_KEYS = ("experiments", "exports")


@dataclass
class PlannedRun:
    """One run of the sweep: its id (a hash of its config), the overrides that made it, its experiments."""

    run_id: str
    config: RunConfig
    params: dict[str, Any]
    experiments: list[str] = field(default_factory=list)
    exports: list[int | str] = field(default_factory=list)
    """Post-hoc exports of the finished run: bits (every module at that codec) or 'run' (its own precisions)."""


@dataclass
class Sweep:
    """A parsed sweep file."""

    name: str
    runs: list[PlannedRun]
    workers: int | None
    threads_per_run: int | None


def _posthoc(data: Any, experiments: dict[str, Any]) -> tuple[list[str], list[int | str]]:
    """The posthoc section: (experiments, exports), each checked."""
    if data is None:
        return [], []
    from airlora.codecs import CODECS

    if not isinstance(data, dict) or set(data) - set(POSTHOC_KEYS):
        raise AirloraError(f"posthoc must be a mapping with keys {', '.join(POSTHOC_KEYS)}, got {data!r}")
    names, exports = data.get("experiments", list(experiments)), data.get("exports", [])
    if not isinstance(names, list) or any(not isinstance(n, str) or n not in experiments for n in names):
        raise AirloraError(f"posthoc.experiments = {names!r} is not allowed; expected a list of this file's "
                           f"experiments ({', '.join(experiments)})")
    known = [e == "run" or (isinstance(e, int) and e in CODECS) for e in exports] if isinstance(exports, list) else []
    if not known or not all(known):  # isinstance first: a list entry is unhashable
        raise AirloraError(f"posthoc.exports = {exports!r} is not allowed; expected a non-empty list of 'run' and "
                           f"precisions from {', '.join(map(str, sorted(CODECS)))}")
    return names, exports


def exports_for(config: RunConfig, exports: list[int | str]) -> list[int | str]:
    """Which post-hoc exports apply to a run: a precision below its one allowed precision, 'run' when it has several."""
    bits = config.channel.bits
    return [e for e in exports if (e == "run" and len(bits) > 1) or (e != "run" and len(bits) == 1 and e < bits[0])]


def _read(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise AirloraError(f"sweep file {str(path)!r} does not exist")
    text = path.read_text(encoding="utf-8")
    try:
        if path.suffix in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text)
        else:
            data = json.loads(text)
    except Exception as err:  # yaml and json parse errors
        raise AirloraError(f"sweep file {str(path)!r} is not valid: {err}") from None
    if not isinstance(data, dict):
        raise AirloraError(f"sweep file {str(path)!r} must be a mapping with keys {', '.join(SWEEP_KEYS)}")
    return data


def _grids(name: str, spec: Any) -> list[dict[str, list[Any]]]:
    grids = spec if isinstance(spec, list) else [spec]
    for grid in grids:
        if not isinstance(grid, dict) or not grid:
            raise AirloraError(f"experiments.{name} must be a mapping of config paths to value lists, "
                               f"or a list of such mappings; got {grid!r}")
        for key, values in grid.items():
            if not isinstance(values, list) or not values:
                raise AirloraError(f"experiments.{name}.{key} must be a non-empty list of values, got {values!r}")
    return grids


def run_id(config: RunConfig) -> str:
    """A readable, stable id: allocator, variant for airllm, seed, and a hash of the values that differ from the
    defaults (so a new config field with a default does not rename every finished run)."""
    defaults = flatten(RunConfig().to_dict())
    changed = {k: v for k, v in flatten(config.to_dict()).items() if defaults.get(k, object()) != v}
    digest = hashlib.sha256(json.dumps(changed, sort_keys=True).encode()).hexdigest()[:10]
    label = config.allocator if config.allocator != "airllm" else f"airllm-{config.policy.variant}"
    return f"{label.replace('+', '_')}-s{config.train.seed}-{digest}"


def load_sweep(path: str | Path, overrides: dict[str, Any] | None = None) -> Sweep:
    """Parse and validate a sweep file; ``overrides`` (dotted paths) are applied to every run's base."""
    path = Path(path)
    data = _read(path)
    unknown = sorted(set(data) - set(SWEEP_KEYS))
    if unknown:
        raise AirloraError(f"unknown key {unknown[0]!r} in sweep file {str(path)!r}; allowed: {', '.join(SWEEP_KEYS)}")
    base = from_dict(RunConfig, data.get("base") or {}, "base.")
    base = merge(base, overrides or {})
    seeds = data.get("seeds", [base.train.seed])
    if not isinstance(seeds, list) or not seeds or not all(isinstance(s, int) and s >= 0 for s in seeds):
        raise AirloraError(f"seeds must be a non-empty list of integers >= 0, got {seeds!r}")
    experiments = data.get("experiments")
    if not isinstance(experiments, dict) or not experiments:
        raise AirloraError("experiments must be a mapping of experiment names to grids")
    for key in ("workers", "threads_per_run"):
        value = data.get(key)
        if value is not None and (not isinstance(value, int) or value < 1):
            raise AirloraError(f"{key} must be an integer >= 1, got {value!r}")

    posthoc_experiments, exports = _posthoc(data.get("posthoc"), experiments)
    runs: dict[str, PlannedRun] = {}
    for name, spec in experiments.items():
        for grid in _grids(name, spec):
            keys = list(grid)
            for values in itertools.product(*grid.values()):
                for seed in seeds:
                    params = dict(zip(keys, values, strict=True)) | {"train.seed": seed}
                    try:
                        config = merge(base, params)
                    except (KeyError, TypeError):
                        raise AirloraError(f"experiments.{name}: {keys} holds a key that is not a config path; "
                                           "use dotted paths such as train.reward_lambda") from None
                    except AirloraError as err:
                        raise AirloraError(f"experiments.{name}: {err}") from None
                    rid = run_id(config)
                    planned = runs.setdefault(rid, PlannedRun(rid, config, params))
                    planned.params = planned.params | params
                    if name not in planned.experiments:
                        planned.experiments.append(name)
                    if name in posthoc_experiments:
                        planned.exports = sorted(set(planned.exports) | set(exports_for(config, exports)), key=str)
    return Sweep(str(data.get("name") or path.stem), list(runs.values()), data.get("workers"),
                 data.get("threads_per_run"))
