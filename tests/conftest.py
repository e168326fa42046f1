"""Shared fixtures: a tiny saved BERT checkpoint and a small labelled CSV, for end-to-end runs."""

import csv

import pytest

from airlora.config import RunConfig, from_dict
from airlora.policy.threads import single_thread
from tests.tiny_models import save_tiny_bert


@pytest.fixture(scope="session")
def tiny_files(tmp_path_factory):
    """(model folder, data CSV, config YAML) for fast runs on a tiny model."""
    root = tmp_path_factory.mktemp("tiny")
    model = save_tiny_bert(root / "model")
    data = root / "data.csv"
    good, bad = ["good", "great", "fun"], ["bad", "awful", "dull"]
    with data.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["sentence", "label"])
        for i in range(120):
            word = (good if i % 2 else bad)[i % 3]
            writer.writerow([f"the movie was very {word}", i % 2])
    config = root / "config.yaml"
    config.write_text("data:\n  val_size: 20\n  test_size: 20\n  batch_size: 8\n  eval_batch_size: 16\n"
                      "train:\n  warmup_steps: 0\n  threads: 1\n  progress: false\n")
    return model, data, config


@pytest.fixture
def one_thread():
    """Tiny networks on one thread: OpenMP hand-offs between two threads cost far more than their maths."""
    with single_thread():
        yield


@pytest.fixture
def tiny_config(tiny_files):
    """A RunConfig for the tiny model and data: a binding budget, few steps, no progress bar.

    50 kHz: at -5 dB (~18 kbit/s) the head and the delivery's reserved overhead (~15 kbit for the tiny BERT) fit and
    no triplet does; at 5 dB (~86 kbit/s) about rank 2 of 4 at fp32."""
    model, data, _ = tiny_files
    return from_dict(RunConfig, {
        "model": str(model),
        "data": {"source": str(data), "val_size": 20, "test_size": 20, "batch_size": 8, "eval_batch_size": 16},
        "channel": {"snr_db": [-5.0, 5.0], "bandwidth_hz": 5e4},
        "adapter": {"r_max": 4},
        "train": {"steps": 6, "eval_every": 3, "warmup_steps": 0, "threads": 1, "progress": False},
    })
