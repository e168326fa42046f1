"""`airlora sweep` and `airlora report`: grids, resumability after a kill, failures recorded, report numbers."""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from scipy import stats

from airlora.errors import AirloraError
from airlora.sweep.execute import execute, plan_threads
from airlora.sweep.grid import load_sweep
from airlora.sweep.stats import mean_ci, paired, verdict
from tests import reference

ROOT = Path(__file__).resolve().parents[1]


def airlora(*args, check=True, **kwargs):
    result = subprocess.run([sys.executable, "-m", "airlora.cli", *map(str, args)], capture_output=True, text=True,
                            **kwargs)
    if check:
        assert result.returncode == 0, result.stderr[-3000:]
    return result


def tiny_sweep(tmp_path, tiny_files, experiments, steps=4, seeds=(0, 1)):
    model, data, _ = tiny_files
    path = tmp_path / "sweep.json"
    path.write_text(json.dumps({
        "name": "tiny",
        "base": {"model": str(model), "data": {"source": str(data), "val_size": 20, "test_size": 20, "batch_size": 8},
                 "channel": {"bandwidth_hz": 2e4, "snr_db": [-5.0, 5.0]}, "adapter": {"r_max": 4},
                 "train": {"steps": steps, "eval_every": 2, "warmup_steps": 0}, "policy": {"episode_steps": 2}},
        "seeds": list(seeds),
        "experiments": experiments,
    }))
    return path


@pytest.mark.integration
def test_grid_expands_pools_and_shares_identical_runs(tmp_path, tiny_files):
    path = tiny_sweep(tmp_path, tiny_files, {
        "a": [{"allocator": ["uniform", "random"]}, {"allocator": ["heuristic"]}],
        "b": {"allocator": ["uniform"], "train.reward_lambda": [0.1, 1.0]},
    })
    sweep = load_sweep(path)
    # a: 3 settings, b: 2 of which (uniform, λ 0.1) is a's uniform run; times 2 seeds
    assert len(sweep.runs) == (3 + 1) * 2
    shared = [r for r in sweep.runs if r.experiments == ["a", "b"]]
    assert len(shared) == 2 and {r.config.allocator for r in shared} == {"uniform"}
    assert len({r.run_id for r in sweep.runs}) == len(sweep.runs)
    # ids are stable across loads
    assert [r.run_id for r in load_sweep(path).runs] == [r.run_id for r in sweep.runs]


@pytest.mark.integration
@pytest.mark.parametrize("experiments, message", [
    ({"a": {"train.nope": [1]}}, "unknown key 'train.nope'"),
    ({"a": {"train.steps": []}}, "experiments.a.train.steps must be a non-empty list"),
    ({"a": {"allocator": ["nope"]}}, "allocator"),
    ({"a": {"train.reward_lambda": [-1.0]}}, "train.reward_lambda"),
    ({}, "experiments must be a mapping"),
])
def test_bad_sweep_files_name_the_field(tmp_path, tiny_files, experiments, message):
    with pytest.raises(AirloraError, match=re.escape(message)):
        load_sweep(tiny_sweep(tmp_path, tiny_files, experiments))


def test_threads_never_oversubscribe_the_cores():
    assert plan_threads(None, None, cores=2) == (2, 1)
    assert plan_threads(1, None, cores=2) == (1, 2)
    assert plan_threads(None, 2, cores=16) == (8, 2)
    for workers in range(1, 9):
        w, t = plan_threads(workers, None, cores=8)
        assert w * t <= 8


def test_intervals_and_verdicts():
    values = [0.8, 0.82, 0.86]
    est = mean_ci(values)
    sem = np.std(values, ddof=1) / np.sqrt(3)
    assert est.mean == pytest.approx(np.mean(values))
    assert est.half_width == pytest.approx(stats.t.ppf(0.975, 2) * sem)
    assert verdict(paired({0: 0.9, 1: 0.91, 2: 0.92}, {0: 0.8, 1: 0.8, 2: 0.8})) == "holds"
    assert verdict(paired({0: 0.7, 1: 0.71, 2: 0.72}, {0: 0.8, 1: 0.8, 2: 0.8})) == "does not hold"
    assert verdict(paired({0: 0.9, 1: 0.7}, {0: 0.8, 1: 0.8})) == "inconclusive at this scale"
    assert verdict(paired({0: 0.9}, {0: 0.8})).startswith("inconclusive")


@pytest.mark.integration
def test_a_killed_sweep_finishes_without_redoing_finished_runs(tmp_path, tiny_files):
    path = tiny_sweep(tmp_path, tiny_files, {"a": {"allocator": ["uniform", "random", "heuristic"]}}, steps=30,
                      seeds=(0, 1))
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "airlora.cli", "sweep", str(path), "--out", str(out), "--workers", "1", "--quiet"]
    proc = subprocess.Popen(cmd, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    try:
        while time.time() < deadline:
            finished = list(out.glob("runs/*/summary.json"))
            if finished:
                break
            assert proc.poll() is None, "the sweep ended before it could be killed"
            time.sleep(0.2)
        time.sleep(1.0)  # into the next run
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    done_before = {p.parent.name: p.stat().st_mtime_ns for p in out.glob("runs/*/summary.json")}
    assert 1 <= len(done_before) < 6
    rows_before = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert {r["run_id"] for r in rows_before} <= set(done_before)  # rows only for finished runs

    airlora("sweep", path, "--out", out, "--workers", "2", "--quiet")
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert len(rows) == 6 and all(r["status"] == "ok" for r in rows)
    assert len({r["run_id"] for r in rows}) == 6
    for run_id, mtime in done_before.items():  # finished runs were not run again
        assert (out / "runs" / run_id / "summary.json").stat().st_mtime_ns == mtime
    assert not list(out.rglob("*.tmp"))


@pytest.mark.integration
def test_a_crashing_run_is_recorded_and_the_sweep_goes_on(tmp_path, tiny_files):
    _, data, _ = tiny_files
    path = tiny_sweep(tmp_path, tiny_files, {"a": {"data.source": [str(data), str(tmp_path / "missing.csv")]}},
                      seeds=(0,))
    out = tmp_path / "out"
    result = airlora("sweep", path, "--out", out, "--quiet", check=False)
    assert result.returncode == 1
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert sorted(r["status"] for r in rows) == ["failed", "ok"]
    failed = next(r for r in rows if r["status"] == "failed")
    assert "missing.csv" in failed["error"] and "failed" in result.stdout


def smoke_sweep(out, *sets):
    """`airlora sweep configs/smoke.yaml` (48 runs) with ``--set`` overrides, then `airlora report`."""
    airlora("sweep", ROOT / "configs" / "smoke.yaml", "--out", out, "--quiet", *sets, timeout=900)
    airlora("report", out)
    return [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def tiny_smoke(tmp_path_factory, tiny_files):
    """The smoke preset as it is, every experiment and seed, on the tiny model and data: (folder, rows)."""
    model, data, _ = tiny_files
    out = tmp_path_factory.mktemp("smoke") / "smoke"
    rows = smoke_sweep(out, "--set", f"model={model}", "--set", f"data.source={data}", "--set", "data.val_size=20",
                       "--set", "data.test_size=20", "--set", "data.batch_size=8")
    return out, rows


def check_smoke_report(out, rows):
    """Every table and figure of the report, and numbers of Tables III and VI recomputed from the rows."""
    report = (out / "report.md").read_text()
    for title in ("Claims of the paper", "Table III", "Accuracy vs SNR", "Table IV", "Table V (a)", "Table V (b)",
                  "Table VI", "Diffusion training steps", "Noise schedules", "Accuracy vs bits"):
        assert f"## {title}" in report, title
    for figure in ("fig3_reward_curves", "fig4_accuracy_vs_snr", "fig5_reward_vs_lambda", "fig6_reward_per_prediction",
                   "fig7_steps", "fig8_rank_heatmaps", "pareto_accuracy_vs_bits"):
        png = out / "figures" / f"{figure}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and f"figures/{figure}.png" in report

    assert len(rows) == 48 and all(r["status"] == "ok" for r in rows)
    # Table III's AdaLoRA line, recomputed here from the rows
    acc = np.array([r["test_accuracy"] for r in rows if "table3" in r["experiments"] and r["method"] == "adalora"])
    half = stats.t.ppf(0.975, len(acc) - 1) * np.std(acc, ddof=1) / np.sqrt(len(acc))
    params = np.mean([r["transmitted_params"] for r in rows
                      if "table3" in r["experiments"] and r["method"] == "adalora"])
    line = next(line for line in report.splitlines() if line.startswith("| AdaLoRA |"))
    assert f"{acc.mean():.4f} ± {half:.4f} (n={len(acc)})" in line and f"{params:.0f}" in line
    # Table VI: decision time grows with the DDIM steps
    decision = {n: np.mean([r["mean_decision_s"] for r in rows if "ddim_steps" in r["experiments"]
                            and r["inference_steps"] == n]) for n in (10, 50)}
    assert decision[10] < decision[50]
    assert all(r["steps_over_budget"] == 0 for r in rows)
    for r in rows:
        reference.assert_delivery_fits(out / "runs" / r["run_id"])


@pytest.mark.integration
def test_smoke_sweep_and_report_hold_every_table_and_figure(tiny_smoke):
    check_smoke_report(*tiny_smoke)


@pytest.mark.integration
@pytest.mark.slow
def test_smoke_sweep_and_report_on_the_real_model(tmp_path):
    """The CI-sized preset on the real default model and data (~100 s on 2 cores; `pytest -m slow`)."""
    out = tmp_path / "smoke"
    check_smoke_report(out, smoke_sweep(out))


TIMING_KEYS = {"wall_s", "mean_step_s", "mean_decision_s", "decision_overhead_ratio", "mean_apply_s"}


def comparable_rows(rows):
    return {r["run_id"]: {k: v for k, v in r.items() if k not in TIMING_KEYS} for r in rows}


@pytest.mark.integration
def test_a_worker_loads_once_and_its_rows_equal_fresh_runs(tmp_path, tiny_files):
    path = tiny_sweep(tmp_path, tiny_files, {"a": {"allocator": ["uniform", "random", "heuristic"]}})
    outcomes = []
    warm = execute(load_sweep(path), tmp_path / "warm", workers=1, progress=False,
                   on_result=lambda rid, outcome: outcomes.append(outcome))
    cold = execute(load_sweep(path), tmp_path / "cold", workers=1, progress=False, worker_cache=False)
    assert comparable_rows(warm) == comparable_rows(cold) and len(warm) == 6
    workers = [o["worker"] for o in outcomes]
    assert len({w["pid"] for w in workers}) == 1 and all(w["cache"] for w in workers)
    last = workers[-1]  # the tokenizer loaded once, each source read once, a seed's splits shared
    assert last["tokenizer_loads"] == 1 and last["tokenizer_hits"] == 5 and last["source_reads"] == 1
    assert last["encodes"] == 6 and last["encode_hits"] == 12


@pytest.mark.integration
def test_ray_backend_runs_the_same_grid_on_warm_actors(tmp_path, tiny_files):
    ray = pytest.importorskip("ray")
    path = tiny_sweep(tmp_path, tiny_files, {"a": {"allocator": ["uniform", "random"]}}, seeds=(0,))
    local = execute(load_sweep(path), tmp_path / "local", progress=False)
    outcomes = []

    def too_long(*_):
        raise TimeoutError("the Ray sweep hung")

    signal.signal(signal.SIGALRM, too_long)
    signal.alarm(240)
    try:
        # two actors asked for on a cluster that holds one: the second never starts, the runs wait for the first
        ray.init(num_cpus=1, log_to_driver=False)
        remote = execute(load_sweep(path), tmp_path / "ray", backend="ray", workers=2, progress=False,
                         on_result=lambda rid, outcome: outcomes.append(outcome))
    finally:
        signal.alarm(0)
        ray.shutdown()
    assert comparable_rows(local) == comparable_rows(remote) and len(local) == 2  # same seeds, same numbers
    assert len({o["worker"]["pid"] for o in outcomes}) == 1  # one actor took both runs and kept its cache
    assert outcomes[-1]["worker"]["tokenizer_hits"] == 1 and outcomes[-1]["worker"]["encode_hits"] == 3


@pytest.mark.parametrize("preset", ["smoke", "paper-cpu", "paper-gpu", "paper-cpu-v2"])
def test_presets_parse_with_enough_seeds(preset):
    sweep = load_sweep(ROOT / "configs" / f"{preset}.yaml")
    seeds = {r.config.train.seed for r in sweep.runs}
    assert len(seeds) >= (2 if preset == "smoke" else 3)
    allocators = {"uniform", "heuristic", "adalora", "airllm"} | ({"random"} if preset != "paper-cpu-v2" else set())
    assert {r.config.allocator for r in sweep.runs} == allocators
    if preset == "paper-cpu-v2":  # every policy starts pretrained, at the tight budget, choosing the precisions too
        assert len(sweep.runs) == 33
        assert all(r.config.policy.pretrain.before_run and r.config.channel.t_max_s == 0.2
                   and r.config.channel.bits == (4, 8, 16, 32) for r in sweep.runs)
