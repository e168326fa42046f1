"""Subprocess smoke runs of the CLI on a tiny saved model with a tiny budget, and its error contract."""

import csv
import json
import subprocess
import sys

import pytest


@pytest.fixture(scope="module")
def tiny_setup(tiny_files, tmp_path_factory):
    return (tmp_path_factory.mktemp("cli"), *tiny_files)


def _airlora(*args, check=True, cwd=None):
    proc = subprocess.run([sys.executable, "-m", "airlora.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=300, cwd=cwd)
    if check and proc.returncode != 0:
        raise AssertionError(proc.stderr)
    return proc


def test_run_writes_config_metrics_summary_within_budget(tiny_setup):
    root, model, data, config = tiny_setup
    out = root / "run"
    proc = _airlora("run", "--config", config, "--model", model, "--data", data, "--steps", 6, "--eval-every", 3,
                    "--snr-db=-5,5", "--bandwidth-hz", 2e4, "--r-max", 4, "--quiet", "--out", out)
    assert "test accuracy" in proc.stdout and "Delivered ranks" in proc.stdout
    summary = json.loads((out / "summary.json").read_text())
    for key in ["allocator", "model", "dataset", "steps", "seed", "test_accuracy", "val_accuracy",
                "majority_baseline_accuracy", "ranks", "transmitted_params", "transmitted_params_paper_formula",
                "bits_per_param", "transmitted_bits", "snr_db", "bandwidth_hz", "capacity_bps", "airtime_s",
                "t_max_s", "budget_ok", "wall_s"]:
        assert key in summary, key
    assert summary["budget_ok"] and summary["airtime_s"] <= summary["t_max_s"]
    assert summary["steps"] == 6 and summary["bandwidth_hz"] == 2e4
    assert set(summary["ranks"].values()) <= set(range(5))
    # 20 kHz at these SNRs cannot carry rank 4 everywhere: the budget binds
    assert sum(summary["ranks"].values()) < 4 * len(summary["ranks"])
    assert summary["transmitted_bits"] == summary["transmitted_params"] * 32
    rows = list(csv.DictReader((out / "metrics.csv").open()))
    assert [int(r["step"]) for r in rows] == list(range(6))
    assert all(float(r["airtime_s"]) <= 1.0 for r in rows)
    assert {float(r["snr_db"]) for r in rows} <= {-5.0, 5.0}
    resolved = json.loads((out / "config.json").read_text())
    assert resolved["channel"]["bandwidth_hz"] == 2e4 and resolved["resolved"]["dataset_sizes"]["test"] == 20


def test_finished_run_is_not_overwritten(tiny_setup):
    root, model, data, config = tiny_setup
    out = root / "once"
    args = ["run", "--config", config, "--model", model, "--data", data, "--steps", 2, "--quiet", "--out", out]
    _airlora(*args)
    proc = _airlora(*args, check=False)
    assert proc.returncode == 2 and "--overwrite" in proc.stderr


def test_channel_command_prints_capacity_and_uniform_rank(tiny_setup):
    _, model, _, _ = tiny_setup
    proc = _airlora("channel", "--model", model, "--snr-db=-5,15", "--bandwidth-hz", 1e5, "--t-max-s", 1,
                    "--fading", "awgn", "--r-max", 8)
    # AWGN at 15 dB: log2(1 + 10^1.5) = 5.0278 bit/s/Hz → 0.503 Mbit/s on 100 kHz
    assert "0.503" in proc.stdout and "uniform rank" in proc.stdout


@pytest.mark.parametrize(
    "args, needle",
    [
        (["run", "--out", "x", "--snr-db", "abc"], "--snr-db"),
        (["run", "--out", "x", "--steps", "0"], "train.steps"),
        (["run", "--out", "x", "--allocator", "nope"], "allocator"),
        (["run", "--out", "x", "--model", "/no/such/folder"], "config.json"),
        (["run", "--out", "x", "--config", "/no/such.yaml"], "does not exist"),
        (["channel", "--bandwidth-hz", "-3"], "bandwidth_hz"),
    ],
)
def test_user_errors_exit_2_with_one_line_and_no_traceback(args, needle, tmp_path):
    proc = _airlora(*args, check=False, cwd=tmp_path)
    assert proc.returncode == 2
    assert needle in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "x").exists()
