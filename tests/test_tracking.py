"""Live logging (``train.report_to``): TensorBoard's event files read back with its own EventAccumulator hold every
named scalar at the right steps, equal to metrics.csv, and a resumed run appends to the same log with each step once.
"""

import csv
import json
import math
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from airlora import tracking, trainer
from airlora.cli import main
from airlora.config import merge
from airlora.runner import run
from airlora.tracking import STEP_SCALARS

pytestmark = pytest.mark.integration  # end-to-end on the tiny model: see pyproject.toml

GUIDE = Path(__file__).resolve().parents[1] / "docs" / "guide.md"
"""The user's reference, whose table of metric names must be what the log holds."""
EXTRA_STEP_SCALARS = ("charts/t_max_s", "charts/capacity_mbps", "charts/learning_rate", "charts/mean_rank",
                      "perf/decision_ms", "perf/apply_ms", "perf/update_ms")
POLICY_TAGS = ("losses/ppo_policy_loss", "losses/ppo_value_loss", "policy/ppo_approx_kl", "policy/ppo_clipfrac",
               "policy/ppo_explained_variance", "policy/ppo_entropy", "losses/refiner_denoise_loss",
               "policy/critic_noise_std", "policy/guidance_scale", "policy/decision_ms", "policy/update_ms",
               "policy/mean_reward")
"""The per-episode names the guide (docs/guide.md) lists for airllm."""


def read_log(out):
    log = EventAccumulator(str(out / "tensorboard"), size_guidance={"scalars": 0, "histograms": 0, "tensors": 0})
    log.Reload()
    return log


def steps(log, tag):
    return [event.step for event in log.Scalars(tag)]


def values(log, tag):
    return [event.value for event in log.Scalars(tag)]


def csv_rows(path):
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


@pytest.fixture
def airllm_config(tiny_config):
    """airllm on the tiny model: 2-step episodes, so episodes end (and log) inside a short run."""
    return merge(tiny_config, {"allocator": "airllm", "policy.episode_steps": 2, "train.report_to": "tensorboard"})


def check_log(out, n_steps):
    """Every named scalar at its steps, with the values of metrics.csv, policy_metrics.csv and summary.json."""
    log = read_log(out)
    metrics = csv_rows(out / "metrics.csv")
    assert [int(r["step"]) for r in metrics] == list(range(n_steps))
    for tag, column in STEP_SCALARS.items():
        assert steps(log, tag) == list(range(n_steps)), tag
        expected = [float(r[column] == "True") if column == "budget_ok" else float(r[column]) for r in metrics]
        assert np.allclose(values(log, tag), expected, rtol=1e-6), tag  # stored as float32
    for tag in EXTRA_STEP_SCALARS:
        assert steps(log, tag) == list(range(n_steps)), tag
    assert values(log, "charts/t_max_s") == [1.0] * n_steps
    assert np.allclose(values(log, "perf/decision_ms"), [1e3 * float(r["decision_s"]) for r in metrics], rtol=1e-5)
    evals = [int(r["step"]) for r in metrics if r["val_accuracy"]]
    assert steps(log, "eval/val_accuracy") == evals == steps(log, "eval/best_val_accuracy")
    accuracies = [float(r["val_accuracy"]) for r in metrics if r["val_accuracy"]]
    assert np.allclose(values(log, "eval/val_accuracy"), accuracies)
    summary = json.loads((out / "summary.json").read_text())
    assert steps(log, "eval/test_accuracy") == [n_steps - 1]
    assert math.isclose(values(log, "eval/test_accuracy")[0], summary["test_accuracy"], rel_tol=1e-6)
    assert math.isclose(values(log, "eval/best_val_accuracy")[-1], summary["val_accuracy"], rel_tol=1e-6)
    # the rank histogram: one per step, over every module
    histograms = log.Histograms("charts/ranks")
    assert [h.step for h in histograms] == list(range(n_steps))
    ranks = csv_rows(out / "ranks.csv")
    for h, row in zip(histograms, ranks, strict=True):
        assert h.histogram_value.num == len(row) - 1 == 12
        assert math.isclose(h.histogram_value.sum, sum(int(v) for k, v in row.items() if k != "step"))
    # the resolved config as hparams and as text
    assert set(log.PluginTagToContent("hparams")) == {"_hparams_/experiment", "_hparams_/session_start_info",
                                                      "_hparams_/session_end_info"}
    assert "config/text_summary" in log.Tags()["tensors"]
    return log


def test_every_named_scalar_is_in_the_event_files_at_its_steps(airllm_config, tmp_path):
    out = tmp_path / "run"
    run(airllm_config, out)
    log = check_log(out, 6)
    episodes = csv_rows(out / "policy_metrics.csv")
    assert len(episodes) == 2  # episodes of 2 steps end at steps 2 and 4 (the third's end is never seen)
    for tag in POLICY_TAGS:
        key = tag.split("/", 1)[1]
        assert steps(log, tag) == [2, 4], tag
        assert np.allclose(values(log, tag), [float(r[key]) for r in episodes], rtol=1e-5, equal_nan=True), tag
    assert "policy/episode" not in log.Tags()["scalars"]
    config = json.loads((out / "config.json").read_text())
    assert config["resolved"]["report_to"] == "tensorboard"
    # the guide's table of names is the log's: each name it lists is logged, each logged name is listed
    listed = set(re.findall(r"`((?:charts|perf|eval|losses|policy)/\w+)`", GUIDE.read_text(encoding="utf-8")))
    logged = {tag for tag in log.Tags()["scalars"] + log.Tags()["histograms"] if not re.search(r"_-?\d+dB$", tag)}
    assert listed - {"charts/bits"} == logged  # charts/bits: runs with several precisions only


def test_a_resumed_run_appends_to_the_same_log_with_every_step_once(airllm_config, tmp_path, monkeypatch):
    """Stopped at step 8, after its checkpoint of step 5 and with steps 5-7 already logged; the resume logs from step
    5 again (purge_step) and TensorBoard reads each step once. At the checkpoint, the log up to it is on disk."""
    config = merge(airllm_config, {"train.steps": 12, "train.checkpoint_every": 5})
    out = tmp_path / "run"
    real_save, real_rss, seen = trainer.save_checkpoint, trainer.rss_mb, []

    def save_checkpoint(out_, step, payload):
        seen.append((step, steps(read_log(out_), "charts/loss")))  # what a kill right now would leave
        real_save(out_, step, payload)

    calls = iter(range(100))

    def rss_mb():
        if next(calls) == 8:
            raise KeyboardInterrupt  # as a kill during step 8
        return real_rss()

    monkeypatch.setattr(trainer, "save_checkpoint", save_checkpoint)
    monkeypatch.setattr(trainer, "rss_mb", rss_mb)
    with pytest.raises(KeyboardInterrupt):
        run(config, out)
    assert seen == [(5, [0, 1, 2, 3, 4])]
    assert steps(read_log(out), "charts/loss") == list(range(8))  # the stopped process logged 5-7 too
    monkeypatch.setattr(trainer, "rss_mb", real_rss)
    summary = run(config, out, resume=True)
    assert summary["resumed_from_step"] == 5
    assert len(list((out / "tensorboard").glob("events.out.tfevents.*"))) == 2  # one log, two processes' files
    log = check_log(out, 12)
    episodes = csv_rows(out / "policy_metrics.csv")
    for tag in POLICY_TAGS:
        logged = steps(log, tag)
        assert len(logged) == len(episodes) == 5 and logged == sorted(set(logged)), tag
        assert np.allclose(values(log, tag), [float(r[tag.split("/", 1)[1]]) for r in episodes], rtol=1e-5,
                           equal_nan=True)


def test_report_to_none_writes_no_log_and_a_missing_backend_is_one_line(tiny_config, tiny_files, tmp_path, capsys,
                                                                          monkeypatch):
    run(merge(tiny_config, {"train.report_to": "none", "train.steps": 2}), tmp_path / "quiet")
    assert not (tmp_path / "quiet" / "tensorboard").exists()
    monkeypatch.setattr(tracking, "available", lambda backend: False)
    model, data, config = tiny_files
    out = tmp_path / "missing"
    capsys.readouterr()
    assert main(["run", "--quiet", "--config", str(config), "--model", str(model), "--data", str(data), "--steps", "2",
                 "--report-to", "tensorboard", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err == ("airlora: error: train.report_to = 'tensorboard' but tensorboard is not installed; pip install "
                   "tensorboard, or --report-to none\n")
    assert not out.exists()
    run(merge(tiny_config, {"train.steps": 2}), tmp_path / "auto")  # 'auto' without TensorBoard: no log, no error
    assert not (tmp_path / "auto" / "tensorboard").exists()


def test_overwrite_replaces_the_old_log_and_the_progress_bar_is_unchanged(tiny_config, tmp_path):
    out = tmp_path / "run"
    config = merge(tiny_config, {"train.steps": 3, "train.report_to": "tensorboard"})
    run(config, out)
    run(merge(config, {"train.steps": 2}), out, overwrite=True)
    assert len(list((out / "tensorboard").glob("events.out.tfevents.*"))) == 1
    assert steps(read_log(out), "charts/loss") == [0, 1]


def test_the_progress_bar_is_the_only_thing_a_run_prints_on_stderr(tiny_files, tmp_path):
    model, data, config = tiny_files
    result = subprocess.run([sys.executable, "-m", "airlora.cli", "run", "--config", str(config), "--model",
                             str(model), "--data", str(data), "--steps", "3", "--set", "train.progress=true",
                             "--report-to", "tensorboard", "--out", str(tmp_path / "run")],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    lines = [line for line in result.stderr.replace("\r", "\n").splitlines() if line.strip()]
    assert lines and all(line.startswith("airlora uniform") for line in lines), lines


def test_wandb_offline_run(tiny_config, tmp_path, monkeypatch):
    """Only where wandb is installed (``pip install 'airlora[wandb]'``; not a dependency): one offline run in
    OUT/wandb whose record file holds every step's names and the test accuracy (wandb ships no reader for it offline;
    protobuf keeps names and JSON values as plain bytes)."""
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    out = tmp_path / "run"
    summary = run(merge(tiny_config, {"train.report_to": "wandb"}), out)
    records = list((out / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(records) == 1
    data = records[0].read_bytes()
    for tag in [*STEP_SCALARS, *EXTRA_STEP_SCALARS, "charts/ranks", "eval/val_accuracy", "eval/test_accuracy"]:
        assert tag.encode() in data, tag
    assert json.dumps(summary["test_accuracy"]).encode() in data
