"""For every allocator, channel, precision set and step: what is trained on and what is delivered fit the link."""

import csv
import json
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from airlora.allocators import names
from airlora.codecs import CODECS
from airlora.config import merge
from airlora.runner import run

pytestmark = pytest.mark.integration  # end-to-end on the tiny model: see pyproject.toml

HEAD_SHAPES = ((2, 32), (2,))
"""The tiny BERT's classifier weight and bias."""


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(allocator=st.sampled_from(names()), bandwidth=st.floats(2e3, 3e5), t_max=st.floats(0.02, 2.0),
       snrs=st.lists(st.sampled_from([-10.0, -5.0, 0.0, 5.0, 10.0, 20.0]), min_size=1, max_size=3),
       bits=st.sets(st.sampled_from([4, 8, 16, 32]), min_size=1), r_max=st.integers(1, 6),
       fading=st.sampled_from(["rayleigh", "awgn"]))
def test_every_allocator_fits_every_step_and_the_delivery(tiny_config, tmp_path, allocator, bandwidth, t_max, snrs,
                                                         bits, r_max, fading):
    config = merge(tiny_config, {
        "allocator": allocator, "channel.bandwidth_hz": bandwidth, "channel.t_max_s": t_max, "channel.snr_db": snrs,
        "channel.bits": sorted(bits), "channel.fading": fading, "adapter.r_max": r_max,
        "train.steps": 4, "train.eval_every": 2, "train.checkpoint_every": 0, "policy.episode_steps": 2,
    })
    with tempfile.TemporaryDirectory(dir=tmp_path) as folder:  # one per example, all under pytest's tmp_path
        check_run(config, Path(folder), bits, t_max, r_max)


def check_run(config, out, bits, t_max, r_max):
    """Run ``config`` in ``out``; every step's bits and the delivery fit T_max, or nothing is sent when nothing fits."""
    summary = run(config, out)
    head_bits = max(bits)
    reserved = sum(CODECS[head_bits].tensor_bits(s) for s in HEAD_SHAPES) + 8 * summary["delivery_overhead_bytes"]
    with (out / "metrics.csv").open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 4
    for row in rows:
        capacity = float(row["capacity_bps"])
        airtime = int(row["transmitted_bits"]) / capacity  # the bits as counted, divided here, not the trainer's time
        assert int(row["transmitted_bits"]) >= reserved + int(row["total_rank"]) * min(bits) * (32 + 32)
        if reserved <= capacity * t_max:
            assert airtime <= t_max * (1 + 1e-12), row
        else:  # not even the head and the delivery's overhead fit: nothing is trained on air, and the run says so
            assert int(row["total_rank"]) == 0
    ranks, precisions = summary["ranks"], summary["precisions"]
    assert all(0 <= r <= r_max for r in ranks.values()) and set(precisions.values()) <= bits
    assert summary["head_bits"] == head_bits
    delivered = summary["on_air_bits"] / summary["capacity_bps"]
    if reserved <= summary["capacity_bps"] * t_max:
        assert summary["budget_ok"] and delivered <= t_max * (1 + 1e-12)
    else:
        assert not summary["budget_ok"] and sum(ranks.values()) == 0
    assert json.loads((out / "summary.json").read_text())["ranks"] == ranks


def test_a_link_where_nothing_fits_is_said_plainly(tiny_files, tmp_path, capsys):
    from airlora.cli import main

    model, data, config = tiny_files
    code = main(["run", "--config", str(config), "--model", str(model), "--data", str(data), "--steps", "2",
                 "--bandwidth-hz", "10", "--out", str(tmp_path / "r")])
    out = capsys.readouterr().out
    assert code == 0
    assert "nothing fits: even the task head alone" in out and "OVER BUDGET" in out
    assert "at 2 steps not even one triplet fit" in out
