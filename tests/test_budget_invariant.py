"""For every allocator, channel and step: the ranks trained on and the adapter delivered fit the link."""

import csv
import json
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from airlora.allocators import names
from airlora.config import merge
from airlora.run import run


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(allocator=st.sampled_from(names()), bandwidth=st.floats(2e3, 3e5), t_max=st.floats(0.02, 2.0),
       snrs=st.lists(st.sampled_from([-10.0, -5.0, 0.0, 5.0, 10.0, 20.0]), min_size=1, max_size=3),
       bits=st.sampled_from([8, 16, 32]), r_max=st.integers(1, 6), fading=st.sampled_from(["rayleigh", "awgn"]))
def test_every_allocator_fits_every_step_and_the_delivery(tiny_config, allocator, bandwidth, t_max, snrs, bits, r_max,
                                                         fading):
    config = merge(tiny_config, {
        "allocator": allocator, "channel.bandwidth_hz": bandwidth, "channel.t_max_s": t_max, "channel.snr_db": snrs,
        "channel.bits_per_param": bits, "channel.fading": fading, "adapter.r_max": r_max,
        "train.steps": 4, "train.eval_every": 2, "train.checkpoint_every": 0, "policy.episode_steps": 2,
    })
    out = Path(tempfile.mkdtemp())
    summary = run(config, out)
    head = summary["head_params"]
    with (out / "metrics.csv").open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 4
    for row in rows:
        capacity = float(row["capacity_bps"])
        head_fits = head * bits <= capacity * t_max
        airtime = int(row["transmitted_params"]) * bits / capacity  # recomputed, not the trainer's own number
        if head_fits:
            assert airtime <= t_max * (1 + 1e-12), row
        else:  # not even the task head fits: nothing is trained on air, and the run says so
            assert int(row["total_rank"]) == 0
    ranks = summary["ranks"]
    assert all(0 <= r <= r_max for r in ranks.values())
    delivered = summary["transmitted_params"] * bits / summary["capacity_bps"]
    if head * bits <= summary["capacity_bps"] * t_max:
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
