"""Subprocess smoke runs of the CLI on a tiny saved model with a tiny budget, and its error contract."""

import csv
import json
import math
import re
import subprocess
import sys

import pytest
from scipy import integrate

from airlora.cli import main
from airlora.models import default_model_dir


@pytest.fixture(scope="module")
def tiny_setup(tiny_files, tmp_path_factory):
    return (tmp_path_factory.mktemp("cli"), *tiny_files)


def _airlora(*args, check=True, cwd=None):
    proc = subprocess.run([sys.executable, "-m", "airlora.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=300, cwd=cwd)
    if check and proc.returncode != 0:
        raise AssertionError(proc.stderr)
    return proc


@pytest.mark.integration
def test_run_writes_config_metrics_summary_within_budget(tiny_setup):
    root, model, data, config = tiny_setup
    out = root / "run"
    proc = _airlora("run", "--config", config, "--model", model, "--data", data, "--steps", 6, "--eval-every", 3,
                    "--snr-db=-5,5", "--bandwidth-hz", 5e4, "--r-max", 4, "--quiet", "--out", out)
    assert "test accuracy" in proc.stdout and "Delivered ranks" in proc.stdout
    summary = json.loads((out / "summary.json").read_text())
    for key in ["allocator", "model", "dataset", "steps", "seed", "test_accuracy", "val_accuracy",
                "majority_baseline_accuracy", "ranks", "transmitted_params", "transmitted_params_paper_formula",
                "bits_per_param", "precisions", "transmitted_bits", "delivery_overhead_bytes", "on_air_bits", "snr_db",
                "bandwidth_hz", "capacity_bps", "airtime_s", "t_max_s", "budget_ok", "wall_s"]:
        assert key in summary, key
    assert summary["budget_ok"] and summary["airtime_s"] <= summary["t_max_s"]
    assert summary["steps"] == 6 and summary["bandwidth_hz"] == 5e4
    assert set(summary["ranks"].values()) <= set(range(5))
    # 50 kHz at these SNRs cannot carry rank 4 everywhere: the budget binds
    assert sum(summary["ranks"].values()) < 4 * len(summary["ranks"])
    assert summary["transmitted_bits"] == summary["transmitted_params"] * 32
    rows = list(csv.DictReader((out / "metrics.csv").open()))
    assert [int(r["step"]) for r in rows] == list(range(6))
    assert all(float(r["airtime_s"]) <= 1.0 for r in rows)
    assert {float(r["snr_db"]) for r in rows} <= {-5.0, 5.0}
    resolved = json.loads((out / "config.json").read_text())
    assert resolved["channel"]["bandwidth_hz"] == 5e4 and resolved["resolved"]["dataset_sizes"]["test"] == 20


@pytest.mark.integration
def test_finished_run_is_not_overwritten(tiny_setup, capsys):
    root, model, data, config = tiny_setup
    out = root / "once"
    args = ["run", "--config", config, "--model", model, "--data", data, "--steps", 2, "--quiet", "--out", out]
    assert main(list(map(str, args))) == 0
    summary = (out / "summary.json").read_bytes()
    capsys.readouterr()
    assert main(list(map(str, args))) == 2
    assert capsys.readouterr().err == (f"airlora: error: --out {str(out)!r} already holds a finished run; choose "
                                       "another folder or --overwrite\n")
    assert (out / "summary.json").read_bytes() == summary


def channel_rows(text):
    """The table rows of `airlora channel`: [SNR dB, C Mbit/s, budget bits, r_max bits, uniform rank] as text."""
    rows = []
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("│").split("│")]
        if len(cells) == 5 and re.fullmatch(r"-?\d+(\.\d+)?", cells[0]):
            rows.append(cells)
    return rows


def rayleigh_capacity_bps(snr_db, bandwidth_hz):
    """E[W·log2(1 + γ|h|²)] with |h|² ~ Exp(1), by numerical integration (not airlora's closed form)."""
    gamma = 10 ** (snr_db / 10)
    return bandwidth_hz * integrate.quad(lambda x: math.log2(1 + gamma * x) * math.exp(-x), 0, math.inf)[0]


def test_channel_command_prints_the_readme_table(capsys):
    """The README's `airlora channel` table for the default model, and every number of it recomputed here."""
    assert main(["channel"]) == 0
    out = capsys.readouterr().out
    assert "model minilm: 6 layers × 6 modules (bert); W = 4.6908 MHz (scale-matched" in out
    rows = channel_rows(out)
    assert [[r[0], r[1], r[4]] for r in rows] == [["-5", "1.699", "1"], ["0", "4.036", "3"], ["5", "8.049", "6"],
                                                 ["10", "13.634", "8"], ["15", "20.312", "8"]]  # README
    config = json.loads((default_model_dir() / "config.json").read_text())
    d, ffn, layers = config["hidden_size"], config["intermediate_size"], config["num_hidden_layers"]
    cost = layers * (4 * (2 * d + 1) + 2 * (d + ffn + 1))  # Σ (d_in + d_out + 1) over the 36 modules
    opt_cost = 24 * (4 * (2 * 2048 + 1) + 2 * (2048 + 8192 + 1))  # OPT-1.3B
    bandwidth = 100e6 * cost / opt_cost
    assert f"{bandwidth / 1e6:.4f}" == "4.6908"
    for snr, c_mbit, budget_bits, full_bits, uniform in rows:
        capacity = rayleigh_capacity_bps(float(snr), bandwidth)
        assert c_mbit == f"{capacity / 1e6:.3f}" and budget_bits == f"{capacity:,.0f}"
        assert full_bits == f"{8 * cost * 32:,}" and int(uniform) == min(8, int(capacity // (32 * cost)))


@pytest.mark.integration
def test_channel_command_on_an_awgn_link(tiny_setup, capsys):
    _, model, _, _ = tiny_setup
    assert main(["channel", "--model", str(model), "--snr-db=-5,15", "--bandwidth-hz", "1e5", "--t-max-s", "1",
                 "--fading", "awgn", "--r-max", "8"]) == 0
    cost = 2 * (4 * (32 + 32 + 1) + 2 * (32 + 48 + 1))  # the tiny BERT: 2 layers, d 32, FFN 48
    rows = channel_rows(capsys.readouterr().out)
    assert [r[0] for r in rows] == ["-5", "15"]
    for snr, c_mbit, _, full_bits, uniform in rows:
        capacity = 1e5 * math.log2(1 + 10 ** (float(snr) / 10))  # Shannon, no fading
        assert c_mbit == f"{capacity / 1e6:.3f}" and full_bits == f"{8 * cost * 32:,}"
        assert int(uniform) == min(8, int(capacity // (32 * cost)))
    assert [r[4] for r in rows] == ["1", "8"]


@pytest.mark.parametrize(
    "args, message",
    [
        (["run", "--out", "x", "--snr-db", "abc"], "--snr-db 'abc': expected a number, a comma-separated list"),
        (["run", "--out", "x", "--steps", "0"], "train.steps = 0 is not allowed; expected an integer >= 1"),
        (["run", "--out", "x", "--allocator", "nope"],
         "allocator = 'nope' is not allowed; expected one of adalora, airllm, compress, heuristic, random, uniform"),
        (["run", "--out", "x", "--model", "/no/such/folder"],
         "model '/no/such/folder': '/no/such/folder' is not a Hugging Face checkpoint folder (no config.json)"),
        (["run", "--out", "x", "--config", "/no/such.yaml"], "config file '/no/such.yaml' does not exist"),
        (["channel", "--bandwidth-hz", "-3"], "channel.bandwidth_hz = -3.0 is not allowed; expected a positive"),
    ],
)
def test_user_errors_exit_2_with_one_line_and_nothing_written(args, message, tmp_path, monkeypatch, capsys):
    """In process (test_bad_input runs the same contract in a subprocess, traceback and --debug included)."""
    monkeypatch.chdir(tmp_path)
    assert main(args) == 2
    captured = capsys.readouterr()
    assert captured.err.startswith(f"airlora: error: {message}") and captured.err.count("\n") == 1
    assert captured.out == "" and not list(tmp_path.iterdir())
