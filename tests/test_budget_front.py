"""The budget-front sweep: its preset spans what the issue asks for, post-hoc exports run and resume, the report's
accuracy-vs-budget table, figure, heat-map and goal check come out of the rows."""

import json
import sys
from pathlib import Path

import numpy as np
import pytest

from airlora import bundle
from airlora.budget import Budget
from airlora.channel import capacity_bps, scale_matched_bandwidth_hz
from airlora.codecs import CODECS
from airlora.config import RunConfig
from airlora.errors import AirloraError
from airlora.models import module_map_without_weights
from airlora.sweep.grid import load_sweep

ROOT = Path(__file__).resolve().parents[1]
MINILM_HEAD = {"classifier.weight": (2, 384), "classifier.bias": (2,)}


def test_the_preset_spans_from_some_modules_at_rank_1_to_everything_fits():
    sweep = load_sweep(ROOT / "configs" / "budget-front.yaml")
    configs = [r.config for r in sweep.runs]
    assert len({c.train.seed for c in configs}) >= 3 and min(c.train.steps for c in configs) >= 200
    assert {c.allocator for c in configs} == {"uniform", "heuristic", "adalora"}
    assert {c.channel.bits for c in configs} == {(32,), (4, 8, 16, 32)}
    t_max = sorted({c.channel.t_max_s for c in configs})
    joint_t_max = sorted({c.channel.t_max_s for c in configs if len(c.channel.bits) > 1})
    assert joint_t_max == t_max[:-1] and len(sweep.runs) == 63  # joint wherever fp32 does not fit everything
    assert len(t_max) >= 4 and all(c.model == "minilm" and len(c.channel.snr_db) == 1 for c in configs)
    for run in sweep.runs:  # every fp32 run exported at int8 post hoc; every joint run at its own precisions
        assert run.exports == ([8] if run.config.channel.bits == (32,) else ["run"])
    module_map = module_map_without_weights("minilm")
    config = configs[0]
    capacity = capacity_bps(config.channel.snr_db[0], config.channel, scale_matched_bandwidth_hz(module_map.shapes))
    reserve = bundle.overhead_bound_bytes(module_map.names, module_map.shapes, MINILM_HEAD, (32,), 8, 1.0,
                                          "/some/folder/of/the/model", 200)
    head = sum(CODECS[32].tensor_bits(s) for s in MINILM_HEAD.values())

    def budget(t):
        return Budget.for_delivery(module_map.shapes, 8, (32,), capacity, t, 770, head + 8 * reserve)

    tightest, widest = budget(t_max[0]), budget(t_max[-1])
    assert tightest.max_uniform_rank() == 0 and not tightest.nothing_fits()  # some modules fit rank 1, not all
    assert widest.max_uniform_rank() == 8  # everything fits at fp32 (and so every joint mode would choose fp32)
    assert budget(t_max[-2]).max_uniform_rank() < 8
    assert 0 < budget(t_max[1]).max_uniform_rank() < budget(t_max[2]).max_uniform_rank() < 8


def test_posthoc_section_is_checked(tmp_path):
    path = tmp_path / "s.json"
    for posthoc, message in (({"exports": [3]}, "posthoc.exports = \\[3\\] is not allowed"),
                             ({"experiments": ["nope"], "exports": [8]}, "posthoc.experiments = \\['nope'\\]"),
                             ({"bits": [8]}, "posthoc must be a mapping with keys experiments, exports"),
                             ({"exports": [[8]]}, "posthoc.exports = \\[\\[8\\]\\] is not allowed"),
                             ({"experiments": [["a"]], "exports": [8]}, "posthoc.experiments = \\[\\['a'\\]\\]")):
        path.write_text(json.dumps({"experiments": {"a": {"allocator": ["uniform"]}}, "posthoc": posthoc}))
        with pytest.raises(AirloraError, match=message):
            load_sweep(path)


@pytest.fixture(scope="module")
def tiny_front(tmp_path_factory, tiny_files):
    """A budget front on the tiny model: uniform fp32 and joint at two budgets, two seeds, with post-hoc exports."""
    import subprocess

    model, data, _ = tiny_files
    root = tmp_path_factory.mktemp("front")
    path = root / "front.json"
    path.write_text(json.dumps({
        "name": "tiny-front",
        "base": {"model": str(model), "data": {"source": str(data), "val_size": 20, "test_size": 20, "batch_size": 8},
                 "channel": {"bandwidth_hz": 6e4, "snr_db": [5.0]}, "adapter": {"r_max": 4},
                 "train": {"steps": 4, "eval_every": 2, "warmup_steps": 0, "lr": 5e-2}},
        "seeds": [0, 1],
        "experiments": {"budget_front": [{"allocator": ["uniform"], "channel.bits": [[32], [4, 8, 16, 32]],
                                          "channel.t_max_s": [0.4, 1.0]}]},
        "posthoc": {"exports": [8, "run"]},
    }))
    out = root / "sweep"
    for _ in range(2):  # the second start finds everything done, post-hoc exports included
        result = subprocess.run([sys.executable, "-m", "airlora.cli", "sweep", str(path), "--out", str(out),
                                 "--quiet", "--workers", "2"], capture_output=True, text=True, timeout=900)
        assert result.returncode == 0, result.stderr[-3000:]
    result = subprocess.run([sys.executable, "-m", "airlora.cli", "report", str(out)], capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    return out, rows


@pytest.mark.integration
def test_posthoc_exports_are_measured_once_and_the_joint_edge_is_the_run(tiny_front):
    out, rows = tiny_front
    assert len(rows) == 8 and all(r["status"] == "ok" for r in rows)
    for row in rows:
        records = row["posthoc"]
        if row["bits"] == "32":
            assert set(records) == {"int8"} and records["int8"]["status"] == "ok"
            assert records["int8"]["precisions"] == dict.fromkeys(row["ranks"], 8)
            assert records["int8"]["cloud_test_accuracy"] == row["test_accuracy"]  # the run's own, fp32
        else:
            record = records["run"]
            assert set(records) == {"run"} and record["status"] == "ok" and record["precisions"] == row["precisions"]
            assert record["edge_test_accuracy"] == row["test_accuracy"]  # the edge gets what the run reported
            assert record["overhead_bytes"] <= record["reserved_overhead_bytes"] and record["fits_t_max"]
    assert not list((out / "posthoc").glob("*/int8")) and not list((out / "posthoc").glob("*/run"))  # measured, gone


@pytest.mark.integration
def test_the_report_has_the_front_its_figure_heatmap_and_goal_check(tiny_front):
    out, rows = tiny_front
    report = (out / "report.md").read_text()
    assert "## Accuracy vs airtime budget" in report and "Uniform fp32 → int8 post-hoc" in report
    for figure in ("accuracy_vs_budget", "joint_rank_bits"):
        assert f"figures/{figure}.png" in report and (out / "figures" / f"{figure}.png").stat().st_size > 1000
    check = json.loads((out / "budget_front.json").read_text())
    assert len(check["budgets"]) == 2
    # the table's numbers, recomputed from the rows: uniform joint minus uniform fp32, paired by seed, per budget
    for point in check["rows"]:
        t_max = next(r["t_max_s"] for r in rows if round(r["capacity_bps"] * r["t_max_s"] / 1e6, 6) ==
                     point["budget_mbit"])
        acc = {(r["bits"], r["seed"]): r["test_accuracy"] for r in rows if r["t_max_s"] == t_max}
        post = {r["seed"]: r["posthoc"]["int8"]["edge_test_accuracy"] for r in rows if r["t_max_s"] == t_max and
                r["bits"] == "32"}
        rank_only = {"Uniform fp32": {s: acc[("32", s)] for s in (0, 1)}, "Uniform fp32 → int8 post-hoc": post}
        best = max(rank_only, key=lambda n: np.mean(list(rank_only[n].values())))
        assert point["rank_only"] == best and point["joint"] == "Uniform joint"
        diff = [acc[("4,8,16,32", s)] - rank_only[best][s] for s in (0, 1)]
        assert point["diff"] == pytest.approx(np.mean(diff))
    assert "Goal 1" in report and "Goal 2" in report
    assert "payload" in report and "overhead" in report  # one joint run's delivery, byte by byte


def test_default_config_is_still_one_fp32_precision():
    assert RunConfig().channel.bits == (32,)
