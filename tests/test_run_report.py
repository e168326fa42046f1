"""``airlora report RUN_DIR``: one run's figures, written as PNG and drawn from the run's own files."""

import csv
import json
import shutil

import numpy as np
import pytest

from airlora import run_report
from airlora.cli import main

MODULES = ("q", "k", "v", "o", "fc1", "fc2")
PNG = b"\x89PNG\r\n\x1a\n"


def csv_rows(path):
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


def two_precision_run(allocator: str) -> dict:
    """A tiny run of ``allocator`` at two precisions on a link where triplets fit (airllm: 2-step episodes, so its
    policy logs a few), in the paper's regime, where the ranks trained at change with the step."""
    return {"allocator": allocator, "policy.episode_steps": 2, "channel.bits": [8, 32], "channel.snr_db": [6.0],
            "train.report_to": "none", "train.regime": "paper"}


@pytest.mark.integration
def test_report_of_an_airllm_run_writes_every_figure(finished_run, tmp_path, capsys):
    airllm_run = shutil.copytree(finished_run(two_precision_run("airllm")), tmp_path / "airllm")
    assert main(["report", str(airllm_run)]) == 0
    assert "report written to" in capsys.readouterr().out
    report = (airllm_run / "report.md").read_text()
    for name in run_report.CAPTIONS:
        path = airllm_run / "figures" / f"{name}.png"
        assert path.read_bytes()[:8] == PNG, name
        assert f"(figures/{name}.png)" in report and run_report.CAPTIONS[name] in report
    assert not list((airllm_run / "figures").glob(".*"))  # no temporary file left behind

    tables = run_report.read_run(airllm_run)
    policy = csv_rows(airllm_run / "policy_metrics.csv")
    assert len(policy) >= 2
    first = run_report.policy_figure(tables).axes[0]
    assert first.get_title() == "episode mean reward"
    assert np.allclose(first.lines[0].get_ydata(), [float(r["mean_reward"]) for r in policy])


@pytest.mark.integration
def test_the_figures_draw_the_run_s_own_numbers(finished_run):
    run_dir = finished_run(two_precision_run("heuristic"))  # its delivery sends modules at both precisions
    tables = run_report.read_run(run_dir)
    metrics = csv_rows(run_dir / "metrics.csv")
    summary = json.loads((run_dir / "summary.json").read_text())
    steps = [int(r["step"]) for r in metrics]

    loss_line = run_report.training_figure(tables).axes[0].lines[0]
    assert list(loss_line.get_xdata()) == steps
    assert np.allclose(loss_line.get_ydata(), [float(r["loss"]) for r in metrics])
    accuracy = run_report.training_figure(tables).axes[1]
    validation = [line for line in accuracy.lines if line.get_label() == "validation"][0]
    assert list(validation.get_xdata()) == [int(r["step"]) for r in metrics if r["val_accuracy"]]
    assert np.allclose(validation.get_ydata(), [float(r["val_accuracy"]) for r in metrics if r["val_accuracy"]])

    reward_axes = run_report.reward_figure(tables).axes
    assert np.allclose(reward_axes[0].lines[0].get_ydata(), [float(r["reward"]) for r in metrics])
    assert np.allclose(reward_axes[1].lines[0].get_ydata(), [float(r["eta"]) for r in metrics])

    airtime_ax = run_report.airtime_figure(tables).axes[0]
    assert np.allclose(airtime_ax.lines[0].get_ydata(), [float(r["airtime_s"]) for r in metrics])
    t_max_line = [line for line in airtime_ax.lines if line.get_label().startswith("T_max")][0]
    assert list(t_max_line.get_ydata()) == [summary["t_max_s"]] * 2

    # the delivery: ranks (and, at two precisions, the bits of the modules sent) per layer × module
    ranks_image, bits_image = (ax.images[0] for ax in run_report.delivered_ranks_figure(tables).axes if ax.images)
    layers = 1 + max(int(k.split(".")[1]) for k in summary["ranks"])
    expected = [[summary["ranks"][f"layers.{i}.{m}"] for m in MODULES] for i in range(layers)]
    assert np.array_equal(ranks_image.get_array(), expected)
    bits = [
        [summary["precisions"][f"layers.{i}.{m}"] if summary["ranks"][f"layers.{i}.{m}"] else 0 for m in MODULES]
        for i in range(layers)
    ]
    assert np.array_equal(bits_image.get_array(), bits)
    assert {b for row in bits for b in row} >= {8, 32}  # modules at each precision
    assert len({r for row in expected for r in row}) > 1  # ranks that differ: a misplaced cell would show

    # ranks over time: the strip of module m is (layers, steps) of ranks.csv
    rank_rows = csv_rows(run_dir / "ranks.csv")
    strips = [ax.images[0] for ax in run_report.ranks_over_time_figure(tables).axes if ax.images]
    assert len(strips) == len(MODULES)
    for module, strip in zip(MODULES, strips, strict=True):
        want = [[int(row[f"layers.{i}.{module}"]) for row in rank_rows] for i in range(layers)]
        assert np.array_equal(strip.get_array(), want), module
    assert len({tuple(np.asarray(s.get_array()).ravel()) for s in strips}) > 1  # not one strip drawn six times


def test_report_refuses_a_folder_that_is_neither_a_run_nor_a_sweep(tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("hello")
    assert main(["report", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "holds neither a finished run (summary.json" in err and "nor a sweep (results.jsonl" in err
    assert not (tmp_path / "figures").exists()


def test_report_of_a_sweep_folder_is_still_the_sweep_report(tmp_path, capsys):
    failed = {"status": "failed", "run_id": "a", "error": "boom"}
    (tmp_path / "results.jsonl").write_text(json.dumps(failed) + "\n")
    assert main(["report", str(tmp_path)]) == 2
    assert "no finished runs to report on" in capsys.readouterr().err  # the sweep report's own check


def test_the_bits_panel_leaves_out_modules_not_sent():
    ranks = {f"layers.{i}.{m}": (i + j) % 3 for i in range(2) for j, m in enumerate(MODULES)}
    precisions = {key: 8 if j % 2 else 32 for j, key in enumerate(ranks)}
    summary = {"ranks": ranks, "precisions": precisions, "allowed_bits": [8, 32], "best_step": 0, "r_max": 4}
    axes = [ax for ax in run_report.delivered_ranks_figure(run_report.RunTables(summary, [])).axes if ax.images]
    bits = np.asarray(axes[1].images[0].get_array())
    assert [bits[i, j] for i in range(2) for j in range(6)] == [
        precisions[key] if ranks[key] else 0 for key in ranks
    ]  # ranks is in layer-major, MODULES order
    assert 0 in bits and 8 in bits and 32 in bits
