"""Run a sweep's planned runs, locally in a process pool or on Ray actors, resumably.

Layout of ``--out DIR``: ``plan.json`` (every planned run), ``runs/{run_id}/`` (an `airlora run` folder each),
``posthoc/{run_id}/{int8|run}.json`` (the sweep file's post-hoc exports, evaluated on the edge; the export folders
themselves are removed once measured) and ``results.jsonl`` (one row per finished or failed run, rewritten
atomically after each run ends).
A run is finished when its ``summary.json`` exists (written last, atomically), so a restarted sweep skips
it; a run cut off half-way has no summary and is run again from scratch; a failed run is retried.

Workers are long-lived: a local worker process (or a Ray actor) takes run after run. It imports the libraries once
and, unless ``worker_cache`` is off, keeps a ``WarmCache`` (``airlora.loader``): each data source read, each tokenizer
loaded and each split tokenised once per worker, not once per run (each run's model comes from ``from_pretrained``,
out of the page cache after the first). A run's numbers do not depend on which worker ran it or after what: it seeds
itself, and a cached input is the input it would have read.
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
from typing import TYPE_CHECKING, Any

from tqdm.auto import tqdm

from airlora.config import RunConfig, from_dict, merge
from airlora.errors import AirloraError
from airlora.io import write_json_atomic, write_text_atomic
from airlora.sweep.grid import PlannedRun, Sweep
from airlora.sweep.rows import failed_row, finished_row

if TYPE_CHECKING:  # imported in the workers only: the sweep's own process needs no torch
    from airlora.loader import Loader, WarmCache

Outcome = dict[str, Any]
Job = tuple[str, dict[str, Any], str, list[int | str], str, dict[str, str]]
"""(run id, config as plain data, run folder, post-hoc exports still to do, their folder, the in-process allocator
registrations the worker repeats: name -> "module:Class")."""


def export_label(export: int | str) -> str:
    """A post-hoc export's name: 'run' or 'int8' / 'fp16' …"""
    from airlora.codecs import CODECS

    return "run" if export == "run" else CODECS[int(export)].name


def posthoc_done(folder: Path, export: int | str) -> bool:
    """True when this post-hoc export has been measured (an error is retried)."""
    path = folder / f"{export_label(export)}.json"
    return path.is_file() and json.loads(path.read_text()).get("status") == "ok"


def posthoc_export(run_dir: Path, export: int | str, folder: Path) -> dict[str, Any]:
    """Export a finished run (at ``export`` bits, or 'run': its own precisions), evaluate it as the edge, write and
    return the record; the export folder is removed afterwards (the record keeps the accounting)."""
    import shutil

    from airlora.edge import edge_evaluate
    from airlora.export import export_adapter

    name = export_label(export)
    adir = folder / name
    try:
        m = export_adapter(run_dir, None if export == "run" else int(export), adir, overwrite=True)
        edge = edge_evaluate(adir, m["model_dir"])
        record = {"status": "ok", "export": export, "edge_test_accuracy": edge["test_accuracy"],
                  "cloud_test_accuracy": edge["cloud_test_accuracy"], "accuracy_drop": edge["accuracy_drop"],
                  "max_abs_logit_diff": edge["max_abs_logit_diff"], "precisions": m["precisions"],
                  "head_bits": m["head_bits"]}
        record |= {key: m[key] for key in ("payload_bytes", "scale_bytes", "header_bytes", "config_bytes",
                                           "manifest_bytes", "overhead_raw_bytes", "overhead_bytes",
                                           "reserved_overhead_bytes", "on_air_bits", "airtime_s", "t_max_s",
                                           "fits_t_max")}
    except Exception as err:  # recorded and retried by the next start of the sweep
        record = {"status": "failed", "export": export, "error": f"{type(err).__name__}: {err}",
                  "traceback": traceback.format_exc()}
    finally:
        shutil.rmtree(adir, ignore_errors=True)
    write_json_atomic(folder / f"{name}.json", record)
    return record


def run_one(config_data: dict[str, Any], run_dir: str, exports: list[int | str] | None = None,
            posthoc_dir: str | None = None, plugins: dict[str, str] | None = None,
            loader: Loader | None = None) -> Outcome:
    """Worker body: one `airlora run` (unless it already finished), then its post-hoc exports; any error is written to
    ``failed.json`` (the run's) or the export's record and returned, never raised. ``plugins``: allocators the
    parent registered in process, registered here again (a worker is a fresh process; entry points it finds itself).
    ``loader``: the worker's ``WarmCache``, or None to read every input afresh. The outcome's ``worker`` says which
    process ran it and what its cache has reused so far."""
    from airlora import registry
    from airlora.runner import run

    for name, path in (plugins or {}).items():
        registry.register(name, path, replace=True)
    out = Path(run_dir)
    config = from_dict(RunConfig, config_data)
    if not (out / "summary.json").is_file():
        (out / "failed.json").unlink(missing_ok=True)
        try:
            run(config, out, overwrite=True, loader=loader)
        except Exception as err:  # a crashed run is recorded; the sweep goes on
            failure = {"status": "failed", "error": f"{type(err).__name__}: {err}",
                       "traceback": traceback.format_exc()}
            write_json_atomic(out / "failed.json", failure)
            return failure | {"worker": worker_record(loader)}
    if exports:
        import torch

        torch.set_num_threads(config.train.threads or os.cpu_count() or 1)
        for export in exports:
            posthoc_export(out, export, Path(posthoc_dir))
    return {"status": "ok", "worker": worker_record(loader)}


def worker_record(loader: Loader | None) -> dict[str, Any]:
    """The worker process and what its cache has loaded and reused so far (``WarmCache.counts``)."""
    counts = getattr(loader, "counts", None)
    return {"pid": os.getpid(), "cache": counts is not None, **(counts or {})}


def _warm_cache(worker_cache: bool) -> WarmCache | None:
    from airlora.loader import WarmCache

    return WarmCache() if worker_cache else None


_WORKER_CACHE: WarmCache | None = None
"""The cache of this worker process of the local pool (set by ``_start_worker``)."""


def _start_worker(worker_cache: bool) -> None:
    global _WORKER_CACHE
    _WORKER_CACHE = _warm_cache(worker_cache)


def _run_in_worker(*job: Any) -> Outcome:
    return run_one(*job, loader=_WORKER_CACHE)


class RunWorker:
    """A Ray actor that runs run after run with one ``WarmCache`` (or none, with ``worker_cache`` off)."""

    def __init__(self, worker_cache: bool) -> None:
        self.cache = _warm_cache(worker_cache)

    def run(self, *job: Any) -> Outcome:
        """``run_one`` of a job (``Job`` less its run id) with this actor's cache."""
        return run_one(*job, loader=self.cache)


def plan_threads(workers: int | None, threads_per_run: int | None, cores: int | None = None) -> tuple[int, int]:
    """Workers and torch threads per run so that workers × threads does not exceed the cores.

    Unless the sweep file or ``--workers`` says otherwise: one run per core, on one thread each. On the 2-core
    reference machine two runs at one thread did 1.07–1.17× the runs per hour of one run at two, in three
    measurements (docs/results/runs-per-hour/sweep_throughput*.json).
    The split never depends on how many runs are left: a run's last float bits depend on its thread count (losses
    differed by 6e-8 at two threads), and a resumed sweep must give the numbers an uninterrupted one gives."""
    cores = cores or os.cpu_count() or 1
    if workers is None:
        workers = max(1, cores // threads_per_run) if threads_per_run else cores
    threads = threads_per_run or max(1, cores // workers)
    return workers, threads


def _local(todo: list[Job], workers: int, worker_cache: bool) -> Iterator[tuple[str, Outcome]]:
    """Process pool with at most ``workers`` runs in flight; a dead worker fails only the runs it held.

    Spawned, not forked: a process forked after torch has started its thread pools can hang in them, so each worker
    imports and loads for itself, once (``_start_worker``), and then takes runs until the sweep ends."""
    pending = list(reversed(todo))
    while pending:
        with ProcessPoolExecutor(max_workers=workers, mp_context=get_context("spawn"), initializer=_start_worker,
                                 initargs=(worker_cache,)) as pool:
            in_flight: dict[Any, str] = {}
            broken = False
            while (pending or in_flight) and not broken:
                while pending and len(in_flight) < workers:
                    rid, *job = pending.pop()
                    in_flight[pool.submit(_run_in_worker, *job)] = rid
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


def _ray(todo: list[Job], workers: int | None, threads: int, address: str | None,
         worker_cache: bool) -> Iterator[tuple[str, Outcome]]:
    """The same runs on Ray actors (``RunWorker``), each reserving ``threads`` CPUs, on a local instance or a cluster.

    ``workers`` actors (default: the cluster's CPUs over ``threads``) are asked for; each takes the next run once it
    has started, so runs wait in this queue while the cluster cannot place an actor (as Ray tasks would wait in
    Ray's). An actor that dies fails the run it held and a new one is asked for in its place; an actor that fails to
    start is not replaced, and when none is left the runs still waiting fail with its error."""
    try:
        import ray
        from ray.exceptions import RayActorError
    except ImportError:
        raise AirloraError("--backend ray needs Ray: pip install 'airlora[ray]'") from None
    if not todo:
        return
    ray.init(address=address, ignore_reinit_error=True, log_to_driver=False)
    actor = ray.remote(num_cpus=threads, max_restarts=0, max_task_retries=0)(RunWorker)
    if workers is None:
        workers = max(1, int(ray.cluster_resources().get("CPU", threads)) // threads)
    starting: dict[Any, Any] = {}  # ready ref -> actor not yet known to be placed

    def start() -> None:
        worker = actor.remote(worker_cache)
        starting[worker.__ray_ready__.remote()] = worker

    for _ in range(min(workers, len(todo))):
        start()
    idle, pending, in_flight = [], list(reversed(todo)), {}
    start_error = "no Ray actor could start"
    try:
        while pending or in_flight:
            while pending and idle:
                worker = idle.pop()
                rid, *job = pending.pop()
                in_flight[worker.run.remote(*job)] = (rid, worker)
            if not (in_flight or starting):  # every actor failed to start: nothing will take these runs
                while pending:
                    yield pending.pop()[0], {"status": "failed", "error": start_error}
                break
            done, _ = ray.wait([*in_flight, *starting], num_returns=1)
            if done[0] in starting:
                worker = starting.pop(done[0])
                try:
                    ray.get(done[0])
                    idle.append(worker)
                except RayActorError as err:  # its constructor failed: another would fail the same way
                    start_error = f"the Ray actor could not start ({type(err).__name__}: {err})"
                continue
            rid, worker = in_flight.pop(done[0])
            try:
                outcome = ray.get(done[0])
                idle.append(worker)
            except RayActorError as err:  # it died under the run (killed, out of memory)
                outcome = {"status": "failed", "error": f"the Ray actor running it died ({type(err).__name__})"}
                start()
            except Exception as err:  # any other Ray error: this run failed, the actor goes on
                outcome = {"status": "failed", "error": f"{type(err).__name__}: {err}"}
                idle.append(worker)
            yield rid, outcome
    finally:
        for worker in [*idle, *starting.values(), *(w for _, w in in_flight.values())]:
            ray.kill(worker)


def execute(sweep: Sweep, out: Path, backend: str = "local", workers: int | None = None,
            address: str | None = None, progress: bool = True,
            on_result: Callable[[str, Outcome], None] | None = None,
            worker_cache: bool = True) -> list[dict[str, Any]]:
    """Run every planned run not yet finished under ``out``; return all result rows.

    ``worker_cache``: each worker keeps a ``WarmCache`` across its runs (the same rows, sooner); False builds every run
    from scratch in its worker."""
    if backend not in ("local", "ray"):
        raise AirloraError(f"--backend {backend!r} is not allowed; expected 'local' or 'ray'")
    out = Path(out)
    plugins = worker_plugins(sweep)
    planned = {run.run_id: run for run in sweep.runs}
    write_json_atomic(out / "plan.json", {
        "name": sweep.name,
        "runs": [{"run_id": r.run_id, "experiments": r.experiments, "params": r.params} for r in sweep.runs],
    })
    rows = {rid: row for rid, run in planned.items()
            if (row := finished_row(run, out / "runs" / rid, out / "posthoc" / rid))}
    left = []  # seed by seed, so a sweep stopped early has whole seeds rather than whole settings
    for rid, run in sorted(planned.items(), key=lambda item: item[1].config.train.seed):
        exports = [e for e in run.exports if not posthoc_done(out / "posthoc" / rid, e)]
        if rid not in rows or exports:
            left.append((rid, run, exports))
    _write_rows(out, rows, planned)
    requested = workers or sweep.workers
    workers, threads = plan_threads(requested, sweep.threads_per_run)
    todo = [(rid, merge(run.config, {"train.threads": threads, "train.progress": False}).to_dict(),
             str(out / "runs" / rid), exports, str(out / "posthoc" / rid), plugins) for rid, run, exports in left]

    if backend == "local":
        jobs = _local(todo, workers, worker_cache)
    else:
        jobs = _ray(todo, workers if requested else None, threads, address, worker_cache)
    bar = tqdm(total=len(planned), initial=len(rows), desc=f"sweep {sweep.name}", disable=not progress,
               dynamic_ncols=True, unit="run")
    failures = 0
    for rid, outcome in jobs:
        run = planned[rid]
        row = finished_row(run, out / "runs" / rid, out / "posthoc" / rid) if outcome["status"] == "ok" else None
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


def worker_plugins(sweep: Sweep) -> dict[str, str]:
    """The in-process allocator registrations the sweep's runs use, as paths a worker process can import; a class
    it cannot import (made in ``__main__`` or in a function) is an error before anything runs."""
    from airlora import registry

    used = {run.config.allocator for run in sweep.runs}
    out = {}
    for name, target in registry.registered().items():
        if name not in used:
            continue
        path = registry.importable(target)
        if path is None:
            raise AirloraError(f"allocator {name!r} is registered in process from {target!r}, which a sweep's worker "
                               "processes cannot import; define it in an importable module or install it as an entry "
                               f"point of the group '{registry.ENTRY_POINT_GROUP}'")
        out[name] = path
    return out


def _write_rows(out: Path, rows: dict[str, dict[str, Any]], planned: dict[str, PlannedRun]) -> None:
    lines = [json.dumps(rows[rid]) for rid in planned if rid in rows]
    write_text_atomic(out / "results.jsonl", "".join(line + "\n" for line in lines))
