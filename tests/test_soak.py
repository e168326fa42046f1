"""Soak: 5,000 steps of the default model and data with the AirLLM policy; no NaN, no memory growth.

Marked slow (about 50 minutes on 2 cores): `.venv/bin/python -m pytest -m slow tests/test_soak.py`.
"""

import csv
import json
import math

import numpy as np
import pytest

from airlora.config import RunConfig, merge
from airlora.run import run


@pytest.mark.slow
def test_five_thousand_steps_without_nan_or_memory_growth(tmp_path):
    config = merge(RunConfig(), {"allocator": "airllm", "train.steps": 5000, "train.eval_every": 500,
                                 "train.patience": 10_000, "train.progress": False})
    summary = run(config, tmp_path)
    with (tmp_path / "metrics.csv").open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 5000 and summary["steps"] == 5000
    assert all(math.isfinite(float(r["loss"])) and math.isfinite(float(r["reward"])) for r in rows)
    assert all(r["budget_ok"] == "True" for r in rows) and summary["budget_ok"]
    rss = np.array([float(r["rss_mb"]) for r in rows])
    early, late = rss[100:200].mean(), rss[-100:].mean()  # after the first evaluation's buffers exist
    print(json.dumps({"rss_mb_steps_100_199": early, "rss_mb_last_100": late}))
    assert late <= early * 1.05 + 20, (early, late)
