"""The numbers users read off a run, recomputed here from the files and from first principles: summary.json's
counts and ratios, the export manifest's airtime, the per-step SNR of each schedule, the decision cadence.

Capacities are integrated numerically from the fading distribution (scipy.integrate.quad), not taken from
airlora.channel; parameter counts come from the tiny BERT's shapes (2 layers, d_h 32, FFN 48, 2 labels).
"""

import csv
import json
import math
import zlib

import numpy as np
import pytest
import torch
from scipy import integrate, stats

from airlora.cli import main
from airlora.config import merge
from airlora.data import load_splits
from airlora.export import export_adapter
from airlora.runner import run
from tests import reference

pytestmark = pytest.mark.integration  # end-to-end on the tiny model: see pyproject.toml

SHAPES = {"q": (32, 32), "k": (32, 32), "v": (32, 32), "o": (32, 32), "fc1": (32, 48), "fc2": (48, 32)}
HEAD = 2 * 32 + 2  # classifier weight and bias


def capacity_bps(snr_db, bandwidth_hz, rician_k=0.0):
    """E[W·log2(1 + γ|h|²)] with E|h|² = 1: Rayleigh for K = 0, else Rician (|h|² = X / (2(K + 1)), X ~ ncx2(2, 2K))."""
    gamma = 10 ** (snr_db / 10)
    scale = 1 / (2 * (rician_k + 1))
    gain = stats.ncx2(2, 2 * rician_k, scale=scale) if rician_k else stats.expon()
    value, _ = integrate.quad(lambda x: math.log2(1 + gamma * x) * gain.pdf(x), 0, math.inf, limit=200)
    return bandwidth_hz * value


def rows_of(out):
    with (out / "metrics.csv").open(newline="") as handle:
        return list(csv.DictReader(handle))


def cost(key):
    d_in, d_out = SHAPES[key.rsplit(".", 1)[1]]
    return d_in + d_out + 1


@pytest.fixture
def skewed_data(tmp_path):
    """Two thirds positive, so the majority class is well defined."""
    path = tmp_path / "skewed.csv"
    words = {1: ["good", "great", "fun"], 0: ["bad", "awful", "dull"]}
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["sentence", "label"])
        for i in range(150):
            label = int(i % 3 != 0)
            writer.writerow([f"the film was {'not ' * (i % 2)}very {words[label][i % 3]}", label])
    return path


def test_summary_numbers_follow_from_the_ranks_rows_and_data(tiny_config, skewed_data, tmp_path):
    config = merge(tiny_config, {"allocator": "random", "data.source": str(skewed_data), "channel.snr_db": [5.0],
                                 "channel.bandwidth_hz": 1e6})
    s = run(config, tmp_path / "r")
    ranks = s["ranks"]
    assert len(set(ranks.values())) >= 3
    adapter = sum(r * cost(k) for k, r in ranks.items())
    assert (s["head_params"], s["adapter_params"], s["transmitted_params"]) == (HEAD, adapter, adapter + HEAD)
    tensors, _ = reference.run_adapter(tmp_path / "r")
    assert sum(t.numel() for k, t in tensors.items() if k.startswith("head.")) == HEAD
    assert sum(t.numel() for t in tensors.values()) == s["transmitted_params"]
    assert s["transmitted_params_paper_formula"] == sum(r * (2 * 32 + 1) for r in ranks.values()) + HEAD
    assert s["transmitted_bits"] == 32 * s["transmitted_params"]
    assert s["on_air_bits"] == s["transmitted_bits"] + 8 * s["delivery_overhead_bytes"]  # the delivery's own files
    assert 1000 < s["delivery_overhead_bytes"] < 4000  # the tiny BERT's header, config and manifest, compressed
    capacity = capacity_bps(5.0, 1e6)
    assert s["capacity_bps"] == pytest.approx(capacity, rel=1e-9)
    assert s["airtime_s"] == pytest.approx(s["on_air_bits"] / capacity, rel=1e-9)
    assert s["eta"] == pytest.approx(s["airtime_s"] / s["t_max_s"]) and s["budget_ok"] == (s["airtime_s"] <= 1.0)

    test_labels = load_splits(config.data, config.train.seed).test.labels
    assert s["majority_baseline_accuracy"] == pytest.approx(np.mean(test_labels == 1)) and np.mean(test_labels) > 0.5

    rows = rows_of(tmp_path / "r")
    step_s, decision_s = (np.array([float(r[c]) for r in rows]) for c in ("step_s", "decision_s"))
    assert s["decision_overhead_ratio"] == pytest.approx(decision_s.mean() / step_s.mean(), rel=1e-12)
    assert s["mean_step_s"] == pytest.approx(step_s.mean(), rel=1e-12)
    assert s["mean_reward"] == pytest.approx(np.mean([float(r["reward"]) for r in rows]), rel=1e-12)
    assert s["steps_over_budget"] == sum(r["budget_ok"] != "True" for r in rows) == 0
    assert s["val_accuracy"] == float(rows[s["best_step"]]["val_accuracy"])
    assert s["val_accuracy"] == max(float(r["val_accuracy"]) for r in rows if r["val_accuracy"])


def test_train_s_counts_every_process_of_a_resumed_run(tiny_config, tmp_path, crash_run):
    import time

    config = merge(tiny_config, {"train.steps": 12, "train.checkpoint_every": 4})
    # the first process's steps take long, so its share of train_s is unmistakable
    crash_run(config, tmp_path / "r", at_call=11, step_delay_s=0.25)
    pointer = json.loads((tmp_path / "r" / "checkpoint.json").read_text())
    earlier = torch.load(tmp_path / "r" / pointer["file"], weights_only=True)["elapsed_s"]
    assert pointer["step"] == 8 and earlier >= 8 * 0.25

    started = time.perf_counter()
    s = run(config, tmp_path / "r", resume=True)
    resumed_wall = time.perf_counter() - started
    resumed_steps = sum(float(r["step_s"]) for r in rows_of(tmp_path / "r")[8:])
    assert s["resumed_from_step"] == 8
    assert earlier + resumed_steps <= s["train_s"] <= earlier + resumed_wall


def test_export_manifest_airtime_and_fits_t_max(tiny_config, tmp_path):
    """An 8-bit run on a link where 8 bits fit and 16 and 32 do not: the bytes written, the airtime and the verdict."""
    config = merge(tiny_config, {"channel.snr_db": [0.0], "channel.bandwidth_hz": 5e4, "channel.bits": [8]})
    s = run(config, tmp_path / "r")
    capacity = capacity_bps(0.0, 5e4)
    unit = sum(reference.wire_bits(8, *SHAPES[m]) for m in SHAPES) * 2  # both layers: 7,424 bits per unit rank
    head = 2 * (32 * 8 + 16) + (2 * 8 + 16)  # the classifier's two rows, and its bias as one row
    reserve = 8 * s["delivery_overhead_bytes"]
    assert s["ranks"] == dict.fromkeys(s["ranks"], 3)  # the largest uniform rank whose int8 delivery fits
    assert 3 * unit + head + reserve <= capacity < 4 * unit + head + reserve
    assert s["transmitted_bits"] == 3 * unit + head and s["precisions"] == dict.fromkeys(s["ranks"], 8)
    params = sum(r * cost(k) for k, r in s["ranks"].items()) + HEAD
    for bits, fits in ((None, True), (8, True), (16, False), (32, False)):
        adir = tmp_path / f"a{bits}"
        m = export_adapter(tmp_path / "r", bits, adir)
        payload = adir / m["payload_file"]
        raw = payload.read_bytes()
        header = 8 + int.from_bytes(raw[:8], "little")
        tensor_bytes = len(raw) - header
        if bits in (None, 8):  # the run's own codec: exactly the bits it budgeted, in the file
            assert tensor_bytes * 8 == s["transmitted_bits"] and m["payload_file"].endswith("quantised.safetensors")
        else:
            assert tensor_bytes * 8 == params * bits and m["payload_file"] == "adapter_model.safetensors"
        sent = raw[:header] + (adir / "adapter_config.json").read_bytes() + (adir / "delivery.json").read_bytes()
        overhead = len(zlib.compress(sent, 9))
        assert m["overhead_bytes"] == overhead and m["overhead_raw_bytes"] == len(sent)
        if bits in (None, 8):
            assert overhead <= s["delivery_overhead_bytes"] == m["reserved_overhead_bytes"]
        assert m["capacity_bps"] == pytest.approx(capacity, rel=1e-9) and m["transmitted_params"] == params
        assert m["on_air_bits"] == 8 * (tensor_bytes + overhead)
        assert m["airtime_s"] == pytest.approx(8 * (tensor_bytes + overhead) / capacity, rel=1e-9)
        assert m["fits_t_max"] is fits and (8 * (tensor_bytes + overhead) / capacity <= 1.0) is fits


def test_edge_data_and_sha256_flags(tiny_config, tiny_files, skewed_data, tmp_path, capsys):
    run(merge(tiny_config, {"channel.snr_db": [20.0], "channel.bandwidth_hz": 1e6}), tmp_path / "r")
    adir = tmp_path / "a"
    sha = export_adapter(tmp_path / "r", 32, adir)["sha256"]["adapter_model.safetensors"]
    base = str(tiny_files[0])
    capsys.readouterr()
    assert main(["edge", str(adir), "--base", base, "--sha256", sha.upper(), "--data", str(skewed_data)]) == 0
    result = json.loads(capsys.readouterr().out)
    other = load_splits(merge(tiny_config, {"data.source": str(skewed_data)}).data, 42).test
    logits = reference.logits(reference.merged_model(tmp_path / "r"), tiny_files[0], other.sentences)
    assert result["test_examples"] == len(other) == 20 and result["accuracy_drop"] is None
    assert result["test_accuracy"] == int((logits.argmax(-1) == torch.as_tensor(other.labels)).sum()) / 20
    assert result["sha256"] == sha and result["checksum_ok"]

    wrong = sha[:-1] + ("0" if sha[-1] != "0" else "1")
    capsys.readouterr()
    assert main(["edge", str(adir), "--base", base, "--sha256", wrong]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err == (
        f"airlora: error: --sha256 {wrong} does not match the manifest's {sha} for adapter_model.safetensors; this "
        "is not the payload the sender announced\n")


@pytest.mark.parametrize("schedule", ["trace", "cycle-blocks", "random-blocks", "rician"])
def test_the_snr_column_follows_the_schedule(tiny_config, tmp_path, schedule):
    trace = tmp_path / "snr.txt"
    trace.write_text("-5\n0\n# a comment\n\n5\n10\n")
    channel = {
        "trace": {"channel.snr_schedule": "trace", "channel.snr_trace": str(trace)},
        "cycle-blocks": {"channel.snr_schedule": "cycle", "channel.snr_db": [-5.0, 5.0], "channel.snr_block_steps": 3},
        "random-blocks": {"channel.snr_db": [-5.0, 0.0, 5.0, 10.0, 15.0], "channel.snr_block_steps": 4},
        "rician": {"channel.snr_schedule": "cycle", "channel.snr_db": [0.0, 10.0], "channel.fading": "rician",
                   "channel.rician_k": 3.0},
    }[schedule]
    config = merge(tiny_config, {"train.steps": 12, **channel})
    run(config, tmp_path / "r")
    rows = rows_of(tmp_path / "r")
    snr = [float(r["snr_db"]) for r in rows]
    expected = {"trace": [[-5, 0, 5, 10][t % 4] for t in range(12)],
                "cycle-blocks": [[-5, 5][(t // 3) % 2] for t in range(12)],
                "rician": [[0, 10][t % 2] for t in range(12)]}
    if schedule == "random-blocks":
        assert all(len(set(snr[b:b + 4])) == 1 for b in range(0, 12, 4)) and len(set(snr)) > 1
        assert set(snr) <= {-5.0, 0.0, 5.0, 10.0, 15.0}
    else:
        assert snr == expected[schedule]
    k = 3.0 if schedule == "rician" else 0.0
    for row in rows:
        capacity = capacity_bps(float(row["snr_db"]), 5e4, k)
        assert float(row["capacity_bps"]) == pytest.approx(capacity, rel=3e-3 if k else 1e-9)  # Rician: Monte Carlo
        if k:
            assert float(row["capacity_bps"]) > 1.01 * capacity_bps(float(row["snr_db"]), 5e4)  # not Rayleigh's


def test_ranks_change_only_on_decision_steps(tiny_config, tmp_path, monkeypatch):
    from airlora.allocators.random import RandomAllocator

    decided = []
    real_allocate = RandomAllocator.allocate

    def spy(self, ctx):
        decided.append(ctx.step)
        return real_allocate(self, ctx)

    monkeypatch.setattr(RandomAllocator, "allocate", spy)
    config = merge(tiny_config, {"allocator": "random", "train.steps": 10, "train.allocate_every": 3,
                                 "channel.snr_db": [20.0], "channel.bandwidth_hz": 1e6})
    run(config, tmp_path / "r")
    assert decided == [0, 3, 6, 9]
    total = [int(r["total_rank"]) for r in rows_of(tmp_path / "r")]
    assert all(total[t] == total[t - 1] for t in range(1, 10) if t % 3)
    assert len({total[t] for t in decided}) > 1  # the decisions themselves did change the ranks
