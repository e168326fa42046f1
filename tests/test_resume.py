"""Resume after a crash or a SIGKILL continues the same run; the same seed gives the same run."""

import csv
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from airlora.config import merge
from airlora.errors import AirloraError
from airlora.finetuner import FineTuner
from airlora.runner import check_same_run, run

pytestmark = pytest.mark.integration  # end-to-end on the tiny model: see pyproject.toml

TIMING = {"step_s", "decision_s", "apply_s", "update_s", "probe_s", "rss_mb"}  # measured, not computed


def metrics(out):
    with (out / "metrics.csv").open(newline="") as handle:
        return [{k: v for k, v in row.items() if k not in TIMING} for row in csv.DictReader(handle)]


def same_outputs(a, b):
    assert metrics(a) == metrics(b)
    sa, sb = (json.loads((d / "summary.json").read_text()) for d in (a, b))
    for key in ("ranks", "final_step_ranks", "test_accuracy", "val_accuracy", "best_step", "transmitted_params",
                "mean_reward", "precisions", "final_step_precisions"):
        assert sa[key] == sb[key], key
    ta, tb = load_file(a / "adapter.safetensors"), load_file(b / "adapter.safetensors")
    assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)


def resumable(tiny_config, allocator, steps=12):
    # "name+joint": every codec allowed (and, for uniform, quantisation-aware training) on a link where they matter;
    # "@paper": in the paper's per-step regime (the default is 'delivery'); "/N": a decision every N steps (the
    # checkpoint of step 8 then falls between two decisions, and the held candidate must survive the resume)
    allocator, _, every = allocator.partition("/")
    allocator, _, regime = allocator.partition("@")
    name, _, joint = allocator.partition("+")
    extra = {"channel.bits": [4, 8, 16, 32], "channel.bandwidth_hz": 1e5} if joint else {}
    if joint and name == "uniform":
        extra["train.quantization_aware"] = True
    return merge(tiny_config, {"allocator": name, "train.steps": steps, "train.checkpoint_every": 4,
                               "policy.episode_steps": 3, "train.regime": regime or "delivery",
                               "train.allocate_every": int(every or 1), **extra})


@pytest.mark.parametrize("allocator", ["airllm", "adalora", "heuristic", "random", "uniform", "heuristic+joint",
                                       "uniform+joint", "adalora+joint", "airllm+joint", "airllm@paper",
                                       "adalora@paper", "uniform+joint@paper", "random@paper", "airllm+joint/3"])
def test_a_crashed_run_resumes_to_the_same_result(tiny_config, tmp_path, crash_run, allocator):
    config = resumable(tiny_config, allocator)
    run(config, tmp_path / "whole")
    crash_run(config, tmp_path / "cut", at_call=11)  # as if the process died after step 9's checkpoint at 8
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


def test_resume_refuses_a_different_run(tiny_config, tmp_path, crash_run):
    config = resumable(tiny_config, "uniform")
    crash_run(config, tmp_path / "r", at_call=1)
    with pytest.raises(AirloraError, match="train.reward_lambda is 0.5 but the run was started with 0.1; resume with "
                                           "the same settings or start a new run .a resume may change train.lr, "):
        run(merge(config, {"train.reward_lambda": 0.5}), tmp_path / "r", resume=True)


def test_resume_refuses_fewer_steps_than_it_has_run_and_adalora_steps(tiny_config, tmp_path, crash_run):
    config = resumable(tiny_config, "uniform")
    crash_run(config, tmp_path / "r", at_call=6)
    with pytest.raises(AirloraError, match="--resume: train.steps = 4 but the run is at step 4 already; give more than "
                                           "4 steps"):
        run(merge(config, {"train.steps": 4}), tmp_path / "r", resume=True)
    assert json.loads((tmp_path / "r" / "config.json").read_text())["history"] == []  # the refused resume wrote nothing
    adalora = resumable(tiny_config, "adalora")
    with pytest.raises(AirloraError, match=r"train.steps is 20 but the run was started with 12 \(the adalora "
                                           r"allocator's schedule is laid out over it\)"):
        check_same_run(adalora, merge(adalora, {"train.steps": 20}))
    assert check_same_run(adalora, merge(adalora, {"train.lr": 1e-3})) == [
        {"setting": "train.lr", "from": 5e-3, "to": 1e-3}]


def test_a_tampered_checkpoint_is_refused(tiny_config, tmp_path, crash_run):
    config = resumable(tiny_config, "uniform")
    crash_run(config, tmp_path / "r", at_call=6)
    path = tmp_path / "r" / "checkpoint-4.pt"
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(AirloraError, match="checksum mismatch"):
        run(config, tmp_path / "r", resume=True)


def recorded_lrs(monkeypatch):
    """{scheduler step: [adapter lr, head lr]} as the optimiser holds them at each training step from now on."""
    used = {}
    real_step = FineTuner.step

    def recording(self, batch):
        used[self.scheduler.last_epoch] = [group["lr"] for group in self.optimizer.param_groups]
        return real_step(self, batch)

    monkeypatch.setattr(FineTuner, "step", recording)
    return used


def test_a_nan_loss_stops_at_the_last_checkpoint_and_resumes_with_a_lower_lr(tiny_config, tmp_path, monkeypatch):
    """A NaN at step 5 keeps the checkpoint of step 4; the resume lowers the lr and stretches the run to 20 steps."""
    config = merge(resumable(tiny_config, "uniform"), {"train.warmup_steps": 2})
    out = tmp_path / "n"

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

    def build_poisoned(cfg, loader=None):
        s = build(cfg, loader)
        s.model.forward = poisoned(s.model)
        return s

    monkeypatch.setattr("airlora.runner.build_session", build_poisoned)
    with pytest.raises(AirloraError, match=r"training loss became nan; lower train.lr \(now 0.005\) at step 5; the "
                                           r"run stopped. Continue it from its checkpoint of step 4 with a lower lr: "
                                           f"airlora run --out {out} --resume --set train.lr=<lower>$"):
        run(config, out)
    assert json.loads((out / "checkpoint.json").read_text())["step"] == 4  # the NaN step's own weights are not kept
    assert len(metrics(out)) == 5  # the rows up to the NaN, to look at
    monkeypatch.setattr("airlora.runner.build_session", build)

    used = recorded_lrs(monkeypatch)
    summary = run(merge(config, {"train.lr": 1e-3, "train.head_lr": 2e-3, "train.steps": 20}), out, resume=True)
    # lr(t) = new/old × lr_old(4) × (20 − t)/(20 − 4), lr_old(4) = old lr × (12 − 4)/(12 − 2) (warm-up 2, then decay)
    assert sorted(used) == list(range(4, 20))
    for step, (adapter_lr, head_lr) in used.items():
        factor = (12 - 4) / (12 - 2) * (20 - step) / (20 - 4)
        assert adapter_lr == pytest.approx(1e-3 * factor, rel=1e-12) and head_lr == pytest.approx(2e-3 * factor)
    assert summary["steps"] == 20 and summary["resumed_from_step"] == 4
    assert [int(r["step"]) for r in metrics(out)] == list(range(20))
    saved = json.loads((out / "config.json").read_text())
    assert saved["train"]["lr"] == 1e-3 and saved["history"] == [
        {"step": 4, "setting": "train.head_lr", "from": 5e-3, "to": 2e-3},
        {"step": 4, "setting": "train.lr", "from": 5e-3, "to": 1e-3},
        {"step": 4, "setting": "train.steps", "from": 12, "to": 20},
    ]


def test_sigkill_then_resume_finishes_the_same_run(tiny_files, tmp_path):
    """A real process killed with SIGKILL after a checkpoint, then `airlora run --resume` from that checkpoint."""
    model, data, config = tiny_files
    extra = tmp_path / "extra.yaml"
    extra.write_text(config.read_text() + "  checkpoint_every: 5\nadapter:\n  r_max: 4\n"
                     "channel:\n  bandwidth_hz: 20000.0\n  snr_db: [-5.0, 5.0]\n")
    args = ["--config", extra, "--model", model, "--data", data, "--allocator", "uniform", "--steps", "60",
            "--eval-every", "20", "--quiet"]
    cmd = [sys.executable, "-m", "airlora.cli", "run", *map(str, args)]
    subprocess.run([*cmd, "--out", str(tmp_path / "whole")], check=True, capture_output=True)

    out = tmp_path / "killed"
    pointer = out / "checkpoint.json"
    proc = subprocess.Popen([*cmd, "--out", str(out)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline:
        if pointer.is_file() and json.loads(pointer.read_text())["step"] >= 10:
            break
        assert proc.poll() is None, "the run ended before it could be killed"
        time.sleep(0.005)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (out / "summary.json").exists()
    killed_at = json.loads(pointer.read_text())["step"]  # the checkpoint the resume must start from
    assert 10 <= killed_at < 60

    resumed = subprocess.run([sys.executable, "-m", "airlora.cli", "run", "--out", str(out), "--resume", "--quiet"],
                             capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["resumed_from_step"] == killed_at
    same_outputs(tmp_path / "whole", out)
    assert [int(r["step"]) for r in metrics(out)] == list(range(60))  # none lost, none twice
    assert summary.keys() == json.loads((tmp_path / "whole" / "summary.json").read_text()).keys()


def test_a_nan_from_a_huge_lr_resumes_with_a_lower_lr_and_finishes(tiny_config, tmp_path, monkeypatch):
    """The NaN message's own recovery, from the CLI: lr 1e4 on the tiny model gives a NaN at step 1, before the first
    checkpoint, so the resume with a lower lr starts again from step 0 and the run finishes."""
    from airlora.cli import main

    out = tmp_path / "nan"
    config = merge(tiny_config, {"train.steps": 12, "train.eval_every": 4, "train.checkpoint_every": 4,
                                 "train.lr": 1e4, "train.head_lr": 1e4})
    with pytest.raises(AirloraError, match=r"training loss became nan; lower train.lr \(now 10000.0\) at step 1; the "
                                           r"run stopped. Continue it from step 0 \(no checkpoint yet\) with a lower"):
        run(config, out)
    used = recorded_lrs(monkeypatch)
    assert main(["run", "--out", str(out), "--resume", "--quiet", "--set", "train.lr=0.01",
                 "--set", "train.head_lr=0.01"]) == 0
    assert used[0] == [0.01, 0.01] and used[11] == pytest.approx([0.01 / 12, 0.01 / 12])
    rows = metrics(out)
    assert [int(r["step"]) for r in rows] == list(range(12)) and all(np.isfinite(float(r["loss"])) for r in rows)
    saved = json.loads((out / "config.json").read_text())
    assert [(h["step"], h["setting"], h["to"]) for h in saved["history"]] == [(0, "train.head_lr", 0.01),
                                                                             (0, "train.lr", 0.01)]
    assert not (out / "checkpoint.json").exists() and (out / "summary.json").is_file()
