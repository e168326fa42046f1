"""One run as several processes over gloo on the CPU (airlora.distributed): the same numbers as one process, one
decision everywhere, one writer, a resume after kill -9, and a dead process that ends the job instead of hanging.

The jobs are forked from the test process with the environment torchrun gives its workers (RANK, WORLD_SIZE,
MASTER_ADDR …), so each starts in well under a second with everything already imported; one slow test runs the real
``torchrun -m airlora`` command line.
"""

import csv
import json
import multiprocessing
import os
import signal
import socket
import subprocess
import sys
import time
import traceback
from pathlib import Path

import pytest
import torch

from airlora import distributed
from airlora.config import merge
from airlora.distributed import MainDecides
from airlora.errors import AirloraError
from airlora.finetuner import FineTuner
from airlora.runner import run
from tests.tiny_models import save_tiny_bert

LOSS_TOLERANCE = 1e-5
"""|2-process − 1-process| loss bound. The two compute the same rows with the same weights; only the matmul blocking
(4 rows instead of 8) and the gradient sum (DDP's all-reduce of two halves) change the float32 rounding, ~1e-7 on a
loss of ~0.7 per step (measured: at most 6e-8 over 6 steps). 1e-5 leaves room for that to grow over the steps of the
run and is still 100× below the smallest step-to-step change of the loss here (~1e-3)."""


@pytest.fixture(scope="module")
def no_dropout_model(tmp_path_factory):
    """The tiny BERT with dropout off: with it on, each process would draw its own masks for its own rows."""
    folder = save_tiny_bert(tmp_path_factory.mktemp("nodrop") / "model")
    config = json.loads((folder / "config.json").read_text())
    config["hidden_dropout_prob"] = config["attention_probs_dropout_prob"] = 0.0
    (folder / "config.json").write_text(json.dumps(config))
    return folder


@pytest.fixture
def job_config(tiny_config, no_dropout_model):
    return merge(tiny_config, {"model": str(no_dropout_model), "train.report_to": "none", "train.steps": 8,
                               "train.eval_every": 4, "train.dist_timeout_s": 60.0})


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world, port, config, out, record, resume, kill_after_step):
    """One process of the job, as torchrun would start it; writes what it saw to ``record``-{rank}.json."""
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    seen = {"ranks": [], "precisions": [], "writes": [], "allocate_calls": 0, "error": None}
    real_apply, real_replace, real_step = FineTuner.apply, os.replace, FineTuner.step
    real_init, real_place = MainDecides.__init__, distributed.place

    def apply(self, ranks, precisions=None):
        seen["ranks"].append(dict(ranks))
        seen["precisions"].append(precisions)
        return real_apply(self, ranks, precisions)

    def wrap(self, allocator, name):  # count the calls that reach this process's own allocator
        real_init(self, allocator, name)
        allocate = allocator.allocate

        def counted(*args):
            seen["allocate_calls"] += 1
            return allocate(*args)
        allocator.allocate = counted

    def replace(src, dst, *args, **kwargs):  # every atomic write and checkpoint of the run ends in os.replace
        seen["writes"].append(str(dst))
        return real_replace(src, dst, *args, **kwargs)

    def step(self, batch):
        if kill_after_step is not None and len(seen["ranks"]) > kill_after_step and rank == 1:
            Path(f"{record}-killed").write_text(str(time.time()))
            os.kill(os.getpid(), signal.SIGKILL)  # this process dies mid-run, as a crashed worker would
        return real_step(self, batch)

    def place(model, device, strategy):  # how much of the frozen base this process holds
        real_place(model, device, strategy)
        seen["frozen_numel"] = sum(getattr(p, "to_local", lambda p=p: p)().numel() for p in model.parameters()
                                   if not p.requires_grad)

    FineTuner.apply, os.replace, FineTuner.step, MainDecides.__init__ = apply, replace, step, wrap
    distributed.place = place
    try:
        seen["summary"] = run(config, out, resume=resume)
    except BaseException as err:  # noqa: BLE001 - reported to the test
        from airlora.distributed import fault_message

        seen["error"] = fault_message(err) or f"{type(err).__name__}: {err}"
        seen["trace"] = traceback.format_exc()
    finally:
        FineTuner.apply, FineTuner.step = real_apply, real_step
        os.replace = real_replace
    seen["ended_at"] = time.time()
    Path(f"{record}-{rank}.json").write_text(json.dumps(seen, default=str))
    os._exit(0)


def start_job(config, out, record, world=2, resume=False, kill_after_step=None):
    ctx = multiprocessing.get_context("fork")  # the test process has imported torch and transformers already
    port = free_port()
    procs = [ctx.Process(target=_worker, args=(r, world, port, config, out, record, resume, kill_after_step))
             for r in range(world)]
    for p in procs:
        p.start()
    return procs


def finish_job(procs, record, timeout_s=600.0):
    deadline = time.time() + timeout_s
    for p in procs:
        p.join(max(0.0, deadline - time.time()))
    hung = [p for p in procs if p.is_alive()]
    for p in hung:
        p.kill()
    assert not hung, "the job hung"
    return [json.loads(Path(f"{record}-{r}.json").read_text()) if Path(f"{record}-{r}.json").exists() else None
            for r in range(len(procs))]


def run_job(config, out, record, **kwargs):
    return finish_job(start_job(config, out, record, **kwargs), record)


def losses(out):
    with (out / "metrics.csv").open(newline="") as handle:
        return [(int(r["step"]), float(r["loss"]), r["val_accuracy"], r["budget_ok"]) for r in csv.DictReader(handle)]


@pytest.mark.parametrize(("allocator", "regime"), [("uniform", "paper"), ("adalora", "delivery")])
def test_two_processes_train_as_one_and_only_rank_0_writes(job_config, tmp_path, allocator, regime):
    """paper: the ranks change with the step (rank 0 at -5 dB: DDP's unused parameters); adalora: its observe masks λ
    in place on every process, so the adapters must stay alike."""
    config = merge(job_config, {"allocator": allocator, "train.regime": regime})
    run(config, tmp_path / "one")
    seen = run_job(config, tmp_path / "two", tmp_path / "rec")
    assert all(s["error"] is None for s in seen), [s["trace"] for s in seen if s["error"]]
    one, two = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert [r[0] for r in two] == list(range(8))
    assert max(abs(a[1] - b[1]) for a, b in zip(one, two, strict=True)) < LOSS_TOLERANCE
    assert [r[2:] for r in one] == [r[2:] for r in two]  # the same validation accuracies, budget kept alike
    assert seen[0]["ranks"] == seen[1]["ranks"]
    assert seen[0]["writes"] and not seen[1]["writes"]  # one writer of one run folder
    summary = json.loads((tmp_path / "two" / "summary.json").read_text())
    assert (summary["world_size"], summary["dist_backend"]) == (2, "gloo")
    assert json.loads((tmp_path / "one" / "summary.json").read_text())["world_size"] == 1
    assert summary["test_accuracy"] == json.loads((tmp_path / "one" / "summary.json").read_text())["test_accuracy"]


def test_rank_0_decides_and_every_process_applies_its_decision(job_config, tmp_path):
    """airllm (a policy that samples and learns, on rank 0 alone) in the paper regime, where its decision is what
    trains: if rank 1 decided for itself, its ranks would differ from rank 0's; several precisions make the decision a
    pair."""
    config = merge(job_config, {"allocator": "airllm", "policy.episode_steps": 3, "channel.bits": [4, 8, 16, 32],
                                "channel.bandwidth_hz": 1e5, "train.regime": "paper"})
    seen = run_job(config, tmp_path / "out", tmp_path / "rec")
    assert all(s["error"] is None for s in seen), [s["trace"] for s in seen if s["error"]]
    assert len(seen[0]["ranks"]) == 8 and seen[0]["ranks"] == seen[1]["ranks"]
    assert seen[0]["precisions"] == seen[1]["precisions"]
    assert len({json.dumps(r, sort_keys=True) for r in seen[0]["ranks"]}) > 1  # the decisions do vary
    assert seen[0]["allocate_calls"] > 0 and seen[1]["allocate_calls"] == 0
    assert all(r[3] == "True" for r in losses(tmp_path / "out"))  # every step within its budget


def test_kill_9_of_the_job_then_resume_loses_and_repeats_no_step(job_config, tmp_path):
    config = merge(job_config, {"train.steps": 20, "train.eval_every": 10, "train.checkpoint_every": 4})
    whole = run_job(config, tmp_path / "whole", tmp_path / "w")
    assert all(s["error"] is None for s in whole)

    out = tmp_path / "killed"
    procs = start_job(config, out, tmp_path / "k")
    pointer = out / "checkpoint.json"
    deadline = time.time() + 600
    while not (pointer.is_file() and json.loads(pointer.read_text())["step"] >= 8):
        assert time.time() < deadline and all(p.is_alive() for p in procs), "the job ended before it was killed"
        time.sleep(0.005)
    for p in procs:
        os.kill(p.pid, signal.SIGKILL)  # the whole job at once
    finish_job(procs, tmp_path / "k", 30)
    assert not (out / "summary.json").exists()
    killed_at = json.loads(pointer.read_text())["step"]

    resumed = run_job(config, out, tmp_path / "r", resume=True)
    assert all(s["error"] is None for s in resumed), [s["trace"] for s in resumed if s["error"]]
    assert resumed[0]["summary"]["resumed_from_step"] == killed_at
    assert [r[0] for r in losses(out)] == list(range(20))  # none lost, none twice
    assert losses(out) == losses(tmp_path / "whole")  # and the same run as one never killed
    assert resumed[0]["ranks"] == resumed[1]["ranks"]


def test_a_killed_worker_ends_the_job_with_one_clear_error(job_config, tmp_path):
    config = merge(job_config, {"train.steps": 400, "train.eval_every": 100, "train.dist_timeout_s": 300.0})
    seen = finish_job(start_job(config, tmp_path / "out", tmp_path / "rec", kill_after_step=5), tmp_path / "rec",
                      timeout_s=600)
    assert seen[1] is None  # rank 1 was killed before it could report
    assert "process 0 of 2 lost the job" in seen[0]["error"], seen[0].get("trace")
    # the peer's death is noticed at the next collective (its socket closes), not waited out: well inside the 300 s
    # timeout, with room for a loaded machine (unloaded it is well under a second)
    assert seen[0]["ended_at"] - float((tmp_path / "rec-killed").read_text()) < 120
    assert "timed out" not in seen[0]["error"].lower()
    assert not (tmp_path / "out" / "summary.json").exists()


def test_asking_for_nccl_without_cuda_is_exit_2(tiny_files, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    model, data, config = tiny_files
    done = subprocess.run([sys.executable, "-m", "airlora", "run", "--config", str(config), "--model", str(model),
                           "--data", str(data), "--steps", "2", "--out", str(tmp_path / "out"),
                           "--set", "train.dist_backend=nccl"], capture_output=True, text=True)
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip().splitlines()[-1].startswith("airlora: error: train.dist_backend = 'nccl' but this "
                                                            "machine has no CUDA device")
    assert not (tmp_path / "out").exists()


def test_a_global_batch_smaller_than_the_job_is_refused(tiny_config, monkeypatch):
    from airlora.distributed import init

    monkeypatch.setenv("WORLD_SIZE", "4")
    with pytest.raises(AirloraError, match=r"data.batch_size = 3 is the global batch, split across the 4"):
        init(tiny_config.train, 3)


def test_fsdp_shards_the_frozen_base_and_trains_as_ddp(job_config, tmp_path):
    config = merge(job_config, {"train.distributed": "fsdp", "train.steps": 4, "train.eval_every": 2})
    ddp = run_job(merge(config, {"train.distributed": "ddp"}), tmp_path / "ddp", tmp_path / "d")
    fsdp = run_job(config, tmp_path / "fsdp", tmp_path / "f")
    assert all(s["error"] is None for s in ddp + fsdp), [s["trace"] for s in ddp + fsdp if s["error"]]
    pairs = zip(losses(tmp_path / "ddp"), losses(tmp_path / "fsdp"), strict=True)
    assert max(abs(a[1] - b[1]) for a, b in pairs) < LOSS_TOLERANCE
    # each process holds half of the frozen base (within the few parameters of odd size)
    assert all(abs(f["frozen_numel"] / d["frozen_numel"] - 0.5) < 0.02 for f, d in zip(fsdp, ddp, strict=True))


@pytest.mark.slow
def test_torchrun_runs_the_cli_as_one_job(tiny_files, tmp_path):
    """The real launcher: ``torchrun --nproc_per_node 2 -m airlora run``; one summary printed, one folder."""
    model, data, config = tiny_files
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "-m", "airlora", "run", "--config", str(config), "--model", str(model), "--data",
                           str(data), "--steps", "4", "--eval-every", "2", "--report-to", "none",
                           "--out", str(tmp_path / "out")], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("test accuracy") == 1
    assert json.loads((tmp_path / "out" / "summary.json").read_text())["world_size"] == 2
