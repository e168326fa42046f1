"""Run a sweep's planned runs, locally in a process pool or as Ray tasks, resumably.

Layout of ``--out DIR``: ``plan.json`` (every planned run), ``runs/{run_id}/`` (an `airlora run` folder each)
and ``results.jsonl`` (one row per finished or failed run, rewritten atomically after each run ends).
A run is finished when its ``summary.json`` exists (written last, atomically), so a restarted sweep skips
it; a run cut off half-way has no summary and is run again from scratch; a failed run is retried.
"""

from __future__ import annotations

import json
import os
import traceback
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from multiprocessing import get_context
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from airlora.config import RunConfig, from_dict, merge
from airlora.errors import AirloraError
from airlora.io import write_json_atomic, write_text_atomic
from airlora.sweep.grid import PlannedRun, Sweep
from airlora.sweep.rows import failed_row, finished_row

Outcome = dict[str, Any]
Job = tuple[str, dict[str, Any], str]
"""(run id, config as plain data, run folder)."""


def run_one(config_data: dict[str, Any], run_dir: str) -> Outcome:
    """Worker body: one `airlora run`; any error is written to ``failed.json`` and returned, never raised."""
    from airlora.run import run

    out = Path(run_dir)
    (out / "failed.json").unlink(missing_ok=True)
    try:
        run(from_dict(RunConfig, config_data), out, overwrite=True)
        return {"status": "ok"}
    except Exception as err:  # a crashed run is recorded; the sweep goes on
        failure = {"status": "failed", "error": f"{type(err).__name__}: {err}", "traceback": traceback.format_exc()}
        write_json_atomic(out / "failed.json", failure)
        return failure


def plan_threads(workers: int | None, threads_per_run: int | None, cores: int | None = None) -> tuple[int, int]:
    """Workers and torch threads per run so that workers × threads does not exceed the cores."""
    cores = cores or os.cpu_count() or 1
    if workers is None:
        workers = max(1, cores // threads_per_run) if threads_per_run else cores
    threads = threads_per_run or max(1, cores // workers)
    return workers, threads


def _local(todo: list[Job], workers: int) -> Iterator[tuple[str, Outcome]]:
    """Process pool with at most ``workers`` runs in flight; a dead worker fails only the runs it held."""
    pending = list(reversed(todo))
    while pending:
        with ProcessPoolExecutor(max_workers=workers, mp_context=get_context("spawn")) as pool:
            in_flight: dict[Any, str] = {}
            broken = False
            while (pending or in_flight) and not broken:
                while pending and len(in_flight) < workers:
                    rid, data, run_dir = pending.pop()
                    in_flight[pool.submit(run_one, data, run_dir)] = rid
                done, _ = wait(in_flight, return_when=FIRST_COMPLETED)
                for future in done:
                    rid = in_flight.pop(future)
                    try:
                        yield rid, future.result()
                    except BrokenProcessPool:
                        broken = True
                        yield rid, {"status": "failed", "error": "the worker process died (killed, or out of memory)"}
            for rid in in_flight.values():  # the pool broke under these too
                yield rid, {"status": "failed", "error": "the worker process died (killed, or out of memory)"}


def _ray(todo: list[Job], threads: int, address: str | None) -> Iterator[tuple[str, Outcome]]:
    """The same runs as Ray tasks, each reserving ``threads`` CPUs, on a local instance or a cluster."""
    try:
        import ray
    except ImportError:
        raise AirloraError("--backend ray needs Ray: pip install 'airlora[ray]'") from None
    ray.init(address=address, ignore_reinit_error=True, log_to_driver=False)
    task = ray.remote(num_cpus=threads, max_retries=0)(run_one)
    refs = {task.remote(data, run_dir): rid for rid, data, run_dir in todo}
    while refs:
        done, _ = ray.wait(list(refs), num_returns=1)
        rid = refs.pop(done[0])
        try:
            yield rid, ray.get(done[0])
        except Exception as err:  # a worker crash surfaces as a Ray error
            yield rid, {"status": "failed", "error": f"{type(err).__name__}: {err}"}


def execute(sweep: Sweep, out: Path, backend: str = "local", workers: int | None = None,
            address: str | None = None, progress: bool = True,
            on_result: Callable[[str, Outcome], None] | None = None) -> list[dict[str, Any]]:
    """Run every planned run not yet finished under ``out``; return all result rows."""
    if backend not in ("local", "ray"):
        raise AirloraError(f"--backend {backend!r} is not allowed; expected 'local' or 'ray'")
    out = Path(out)
    workers, threads = plan_threads(workers or sweep.workers, sweep.threads_per_run)
    planned = {run.run_id: run for run in sweep.runs}
    write_json_atomic(out / "plan.json", {
        "name": sweep.name,
        "runs": [{"run_id": r.run_id, "experiments": r.experiments, "params": r.params} for r in sweep.runs],
    })
    rows = {rid: row for rid, run in planned.items() if (row := finished_row(run, out / "runs" / rid))}
    todo = []  # seed by seed, so a sweep stopped early has whole seeds rather than whole settings
    for rid, run in sorted(planned.items(), key=lambda item: item[1].config.train.seed):
        if rid in rows:
            continue
        config = merge(run.config, {"train.threads": threads, "train.progress": False})
        todo.append((rid, config.to_dict(), str(out / "runs" / rid)))
    _write_rows(out, rows, planned)

    jobs = _local(todo, workers) if backend == "local" else _ray(todo, threads, address)
    bar = tqdm(total=len(planned), initial=len(rows), desc=f"sweep {sweep.name}", disable=not progress,
               dynamic_ncols=True, unit="run")
    failures = 0
    for rid, outcome in jobs:
        run = planned[rid]
        row = finished_row(run, out / "runs" / rid) if outcome["status"] == "ok" else None
        if row is None:
            failures += 1
            row = failed_row(run, outcome.get("error", "no summary.json was written"))
        rows[rid] = row
        _write_rows(out, rows, planned)
        bar.update(1)
        bar.set_postfix(failed=failures, refresh=False)
        if on_result is not None:
            on_result(rid, outcome)
    bar.close()
    return [rows[rid] for rid in planned if rid in rows]


def _write_rows(out: Path, rows: dict[str, dict[str, Any]], planned: dict[str, PlannedRun]) -> None:
    lines = [json.dumps(rows[rid]) for rid in planned if rid in rows]
    write_text_atomic(out / "results.jsonl", "".join(line + "\n" for line in lines))
