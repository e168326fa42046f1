"""Resume after a crash or a SIGKILL continues the same run; the same seed gives the same run."""

import csv
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from airlora.config import merge
from airlora.errors import AirloraError
from airlora.run import run
from airlora.trainer import FineTuner

TIMING = {"step_s", "decision_s", "apply_s", "update_s", "rss_mb"}  # measured, not computed


def metrics(out):
    with (out / "metrics.csv").open(newline="") as handle:
        return [{k: v for k, v in row.items() if k not in TIMING} for row in csv.DictReader(handle)]


def same_outputs(a, b):
    assert metrics(a) == metrics(b)
    sa, sb = (json.loads((d / "summary.json").read_text()) for d in (a, b))
    for key in ("ranks", "final_step_ranks", "test_accuracy", "val_accuracy", "best_step", "transmitted_params",
                "mean_reward"):
        assert sa[key] == sb[key], key
    ta, tb = load_file(a / "adapter.safetensors"), load_file(b / "adapter.safetensors")
    assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)


def resumable(tiny_config, allocator, steps=12):
    return merge(tiny_config, {"allocator": allocator, "train.steps": steps, "train.checkpoint_every": 4,
                               "policy.episode_steps": 3})


@pytest.mark.parametrize("allocator", ["airllm", "adalora", "heuristic", "random", "uniform"])
def test_a_crashed_run_resumes_to_the_same_result(tiny_config, tmp_path, monkeypatch, allocator):
    config = resumable(tiny_config, allocator)
    run(config, tmp_path / "whole")

    real_step = FineTuner.step
    calls = {"n": 0}

    def crash_at_step_10(self, batch):
        calls["n"] += 1
        if calls["n"] == 11:
            raise KeyboardInterrupt  # as if the process died after step 9's checkpoint at 8
        return real_step(self, batch)

    monkeypatch.setattr(FineTuner, "step", crash_at_step_10)
    with pytest.raises(KeyboardInterrupt):
        run(config, tmp_path / "cut")
    monkeypatch.setattr(FineTuner, "step", real_step)
    pointer = json.loads((tmp_path / "cut" / "checkpoint.json").read_text())
    assert pointer["step"] == 8 and not (tmp_path / "cut" / "summary.json").exists()
    assert len(metrics(tmp_path / "cut")) == 8  # rows up to the checkpoint are already on disk

    with pytest.raises(AirloraError, match="add --resume"):
        run(config, tmp_path / "cut")
    summary = run(config, tmp_path / "cut", resume=True)
    assert summary["resumed_from_step"] == 8
    same_outputs(tmp_path / "whole", tmp_path / "cut")
    assert not list((tmp_path / "cut").glob("checkpoint*"))  # a finished run keeps no checkpoints


def test_same_seed_same_run(tiny_config, tmp_path):
    config = merge(tiny_config, {"allocator": "airllm", "policy.episode_steps": 3})
    run(config, tmp_path / "a")
    run(config, tmp_path / "b")
    same_outputs(tmp_path / "a", tmp_path / "b")
    run(merge(config, {"train.seed": 7}), tmp_path / "c")
    assert metrics(tmp_path / "a") != metrics(tmp_path / "c")


def test_resume_refuses_a_different_run(tiny_config, tmp_path, monkeypatch):
    config = resumable(tiny_config, "uniform")
    monkeypatch.setattr(FineTuner, "step", lambda self, batch: (_ for _ in ()).throw(KeyboardInterrupt))
    with pytest.raises(KeyboardInterrupt):
        run(config, tmp_path / "r")
    with pytest.raises(AirloraError, match="train.reward_lambda is 0.5 but the run was started with 0.1"):
        run(merge(config, {"train.reward_lambda": 0.5}), tmp_path / "r", resume=True)


def test_a_tampered_checkpoint_is_refused(tiny_config, tmp_path, monkeypatch):
    config = resumable(tiny_config, "uniform")
    real_step = FineTuner.step
    calls = {"n": 0}

    def crash(self, batch):
        calls["n"] += 1
        if calls["n"] == 6:
            raise KeyboardInterrupt
        return real_step(self, batch)

    monkeypatch.setattr(FineTuner, "step", crash)
    with pytest.raises(KeyboardInterrupt):
        run(config, tmp_path / "r")
    monkeypatch.setattr(FineTuner, "step", real_step)
    path = tmp_path / "r" / "checkpoint-4.pt"
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(AirloraError, match="checksum mismatch"):
        run(config, tmp_path / "r", resume=True)


def test_a_nan_loss_stops_with_a_checkpoint(tiny_config, tmp_path, monkeypatch):
    config = resumable(tiny_config, "uniform")

    def poisoned(module):
        original = module.forward

        def forward(*args, **kwargs):
            out = original(*args, **kwargs)
            if forward.calls == 5 and module.training:
                out.loss = out.loss * float("nan")
            forward.calls += module.training
            return out

        forward.calls = 0
        return forward

    from airlora import session as session_module

    build = session_module.build_session

    def build_poisoned(cfg):
        s = build(cfg)
        s.model.forward = poisoned(s.model)
        return s

    monkeypatch.setattr("airlora.run.build_session", build_poisoned)
    with pytest.raises(AirloraError, match=r"training loss became nan.*at step 5.*checkpoint of step 5"):
        run(config, tmp_path / "n")
    assert json.loads((tmp_path / "n" / "checkpoint.json").read_text())["step"] == 5
    assert len(metrics(tmp_path / "n")) == 5


def test_sigkill_then_resume_finishes_the_same_run(tiny_files, tmp_path):
    """A real process killed with SIGKILL mid-run, then `airlora run --resume`."""
    model, data, config = tiny_files
    args = ["--config", config, "--model", model, "--data", data, "--allocator", "airllm", "--steps", "400",
            "--eval-every", "50", "--quiet"]
    extra = tmp_path / "extra.yaml"
    extra.write_text(config.read_text() + "  checkpoint_every: 20\npolicy:\n  episode_steps: 5\n"
                     "adapter:\n  r_max: 4\nchannel:\n  bandwidth_hz: 20000.0\n  snr_db: [-5.0, 5.0]\n")
    args[1] = extra
    cmd = [sys.executable, "-m", "airlora.cli", "run", *map(str, args)]
    subprocess.run([*cmd, "--out", str(tmp_path / "whole")], check=True, capture_output=True)

    out = tmp_path / "killed"
    proc = subprocess.Popen([*cmd, "--out", str(out)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline:
        pointer = out / "checkpoint.json"
        if pointer.is_file() and json.loads(pointer.read_text())["step"] >= 100:
            break
        assert proc.poll() is None, "the run ended before it could be killed"
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (out / "summary.json").exists()

    resumed = subprocess.run([sys.executable, "-m", "airlora.cli", "run", "--out", str(out), "--resume", "--quiet"],
                             capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    same_outputs(tmp_path / "whole", out)
    rows = metrics(out)
    assert [int(r["step"]) for r in rows] == list(range(400))  # none lost, none twice
    assert json.loads((out / "summary.json").read_text()).keys() == \
        json.loads((tmp_path / "whole" / "summary.json").read_text()).keys()
