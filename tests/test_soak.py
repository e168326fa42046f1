"""Soak: 5,000 steps with the AirLLM policy (its buffer, networks and logs all grow state); no NaN, no memory growth.

Marked slow: `.venv/bin/python -m pytest -m slow tests/test_soak.py`. The default model and data took 103
minutes on 2 cores (2026-12-02); the tiny model about five.
"""

import csv
import json
import math

import numpy as np
import pytest

from airlora.config import RunConfig, merge
from airlora.runner import run
from tests import reference

pytestmark = pytest.mark.integration  # end-to-end on the tiny model: see pyproject.toml


def soak(config, out):
    summary = run(merge(config, {"allocator": "airllm", "train.steps": 5000, "train.eval_every": 500,
                                 "train.patience": 10_000, "train.progress": False}), out)
    with (out / "metrics.csv").open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 5000 and summary["steps"] == 5000
    assert all(math.isfinite(float(r["loss"])) and math.isfinite(float(r["reward"])) for r in rows)
    reference.assert_every_step_fits(rows, config.channel.t_max_s)
    reference.assert_delivery_fits(out)
    rss = np.array([float(r["rss_mb"]) for r in rows])
    early, late = rss[100:200].mean(), rss[-100:].mean()  # after the first evaluation's buffers exist
    print(json.dumps({"rss_mb_steps_100_199": early, "rss_mb_last_100": late, "rss_mb_max": rss.max()}))
    assert late <= early * 1.05 + 20, (early, late)


@pytest.mark.slow
def test_default_model_five_thousand_steps(tmp_path):
    soak(RunConfig(), tmp_path)


@pytest.mark.slow
def test_tiny_model_five_thousand_steps(tiny_config, tmp_path):
    soak(merge(tiny_config, {"train.checkpoint_every": 500}), tmp_path)
