"""Shared fixtures: a tiny saved BERT and a small labelled CSV, the config of a run on them, finished runs made once
per session, a run that dies at a given step, and the small policy networks of a quick airllm run."""

import csv
import json
import time
from unittest import mock

import pytest
import torch
from hypothesis import settings

from airlora.config import RunConfig, from_dict, merge
from airlora.policy.threads import single_thread
from tests.tiny_models import save_tiny_bert

# Hypothesis would keep its example database in .hypothesis/ of the working folder; a test writes only under its tmp
# dirs (a failing example is still printed in full, with its arguments).
settings.register_profile("airlora", database=None)
settings.load_profile("airlora")


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


def _tiny_config(tiny_files) -> RunConfig:
    model, data, _ = tiny_files
    return from_dict(RunConfig, {
        "model": str(model),
        "data": {"source": str(data), "val_size": 20, "test_size": 20, "batch_size": 8, "eval_batch_size": 16},
        "channel": {"snr_db": [-5.0, 5.0], "bandwidth_hz": 5e4},
        "adapter": {"r_max": 4},
        "train": {"steps": 6, "eval_every": 3, "warmup_steps": 0, "threads": 1, "progress": False},
    })


@pytest.fixture
def tiny_config(tiny_files):
    """A RunConfig for the tiny model and data: a binding budget, few steps, no progress bar.

    50 kHz: at -5 dB (~18 kbit/s) the head and the delivery's reserved overhead (~15 kbit for the tiny BERT) fit and
    no triplet does; at 5 dB (~86 kbit/s) about rank 2 of 4 at fp32."""
    return _tiny_config(tiny_files)


GENEROUS_RANDOM_RUN = {"allocator": "random", "train.steps": 6, "train.eval_every": 6, "channel.bandwidth_hz": 1e6,
                       "channel.snr_db": [20.0], "train.lr": 5e-2}
"""A `random` run on a link where every rank fits, so its ranks differ per module and its adapter moves the logits."""


@pytest.fixture(scope="session")
def finished_run(tmp_path_factory, tiny_files):
    """``finished_run(overrides=None)``: the folder of a finished in-process run of ``tiny_config`` merged with
    ``overrides`` (default: ``GENEROUS_RANDOM_RUN``), made once per session and shared: copy it before changing it."""
    from airlora.runner import run

    made = {}

    def make(overrides: dict | None = None):
        overrides = GENEROUS_RANDOM_RUN if overrides is None else overrides
        key = json.dumps(overrides, sort_keys=True)
        if key not in made:
            out = tmp_path_factory.mktemp("finished-run") / "run"
            threads = torch.get_num_threads()
            try:
                run(merge(_tiny_config(tiny_files), overrides), out)
            finally:
                torch.set_num_threads(threads)  # the run set it from its config; later tests expect the default
            made[key] = out
        return made[key]

    return make


@pytest.fixture
def crash_run():
    """``crash_run(config, out, at_call, step_delay_s=0)``: run ``config`` in ``out`` until the ``at_call``-th call
    of ``FineTuner.step`` raises KeyboardInterrupt, as if the process died there (checkpoints written before it stay
    on disk); each earlier step first sleeps ``step_delay_s``. The real step is back once it returns."""
    from airlora.finetuner import FineTuner
    from airlora.runner import run

    real_step = FineTuner.step

    def crash(config, out, at_call: int, step_delay_s: float = 0.0) -> None:
        calls = 0

        def dying_step(self, batch):
            nonlocal calls
            calls += 1
            if calls == at_call:
                raise KeyboardInterrupt
            if step_delay_s:
                time.sleep(step_delay_s)
            return real_step(self, batch)

        with mock.patch.object(FineTuner, "step", dying_step), pytest.raises(KeyboardInterrupt):
            run(config, out)

    return crash


@pytest.fixture
def small_policy():
    """Policy networks small enough for a tiny run (overrides; a test adds its own episode length and batch)."""
    return {"policy.ppo.hidden": 32, "policy.diffusion.hidden": 32, "policy.diffusion.time_embed_dim": 16,
            "policy.diffusion.train_timesteps": 100, "policy.diffusion.inference_steps": 10,
            "policy.diffusion.unet_channels": 8}
