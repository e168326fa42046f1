"""Allocator plugins: the example package (examples/airlora-topdown) registered in process and installed with its
entry point, through `airlora run` and a 2-run sweep; a plugin that fails or returns a bad decision gets one line.

How the example is tested, and why this way: the in-process tests import it from its source folder and register it
with ``airlora.allocators.register`` (fast, and they cover the harness: run, sweep workers, errors); one test
installs the folder for real with pip (``--target`` a temporary folder, no build isolation, no network: a few
seconds) and runs `airlora run` and `airlora sweep` as subprocesses that find it only through its entry point.
"""

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from airlora import registry
from airlora.allocators import Allocator, allocator_class, names, register, unregister
from airlora.cli import main
from airlora.config import ALLOCATORS, RunConfig, from_dict
from airlora.errors import AirloraError
from tests import reference

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "airlora-topdown"


@pytest.fixture
def topdown(monkeypatch):
    """The example allocator, importable from its source folder and registered as 'top-down' in this process."""
    monkeypatch.syspath_prepend(str(EXAMPLE))
    from airlora_topdown import TopDownAllocator

    register("top-down", TopDownAllocator, replace=True)
    yield TopDownAllocator
    unregister("top-down")


def run_args(tiny_files, out, allocator, steps=6, *extra):
    model, data, config = tiny_files
    return ["run", "--quiet", "--config", str(config), "--model", str(model), "--data", str(data), "--steps",
            str(steps), "--eval-every", "3", "--snr-db=-5,5", "--bandwidth-hz", "5e4", "--r-max", "4",
            "--allocator", allocator, "--out", str(out), *extra]


def sweep_file(tmp_path, tiny_files, allocator):
    model, data, _ = tiny_files
    path = tmp_path / "sweep.json"
    path.write_text(json.dumps({
        "name": "plugin",
        "base": {"model": str(model), "data": {"source": str(data), "val_size": 20, "test_size": 20, "batch_size": 8},
                 "channel": {"bandwidth_hz": 5e4, "snr_db": [-5.0, 5.0]}, "adapter": {"r_max": 4},
                 "train": {"steps": 4, "eval_every": 2, "warmup_steps": 0, "report_to": "none"}},
        "seeds": [0, 1],
        "experiments": {"plugin": {"allocator": [allocator]}},
    }))
    return path


def assert_top_down(run_dir, r_max=4):
    """Ranks never grow towards the input: every module of layer l at least as many as of layer l - 1; the delivery
    fits."""
    summary = json.loads((run_dir / "summary.json").read_text())
    ranks = summary["ranks"]
    layers = sorted({int(k.split(".")[1]) for k in ranks})
    per_layer = [{ranks[k] for k in ranks if int(k.split(".")[1]) == layer} for layer in layers]
    assert all(len(values) == 1 for values in per_layer)  # one rank per layer
    values = [v.pop() for v in per_layer]
    assert values == sorted(values) and max(values) <= r_max
    assert summary["allocator"] == "top-down"
    reference.assert_delivery_fits(run_dir)


def test_the_built_in_names_are_the_registry_s_and_the_config_s():
    assert sorted(ALLOCATORS) == sorted(registry.BUILTIN)
    assert set(ALLOCATORS) <= set(names())


def test_a_registered_allocator_is_a_valid_config_name_and_an_unknown_one_lists_the_choices(topdown):
    assert from_dict(RunConfig, {"allocator": "top-down"}).allocator == "top-down"
    assert allocator_class("top-down") is topdown and "top-down" in names()
    with pytest.raises(AirloraError) as err:
        from_dict(RunConfig, {"allocator": "nope"})
    message = str(err.value)
    assert message.startswith("allocator = 'nope' is not allowed; expected one of adalora, airllm, compress, "
                              "heuristic, random, uniform (built in) or top-down")
    assert "entry-point group 'airlora.allocators'" in message


@pytest.mark.parametrize("name, target, message", [
    ("uniform", Allocator, "allocator name 'uniform' is built in; register yours under another name"),
    ("two words", Allocator, "allocator name 'two words' is not allowed"),
    ("mine", 42, "allocator 'mine': register an Allocator subclass or a 'module:Class' path, not 42"),
])
def test_registering_a_bad_name_or_target_is_refused(name, target, message):
    with pytest.raises(AirloraError, match=message):
        register(name, target)


@pytest.mark.integration
def test_the_example_plugin_runs_through_airlora_run_registered_in_process(topdown, tiny_files, tmp_path):
    out = tmp_path / "run"
    assert main(run_args(tiny_files, out, "top-down")) == 0
    assert_top_down(out)
    assert json.loads((out / "config.json").read_text())["allocator"] == "top-down"


@pytest.mark.integration
def test_a_plugin_s_state_survives_a_resume(topdown, tiny_files, tmp_path, monkeypatch):
    from airlora import trainer

    out = tmp_path / "run"
    real, calls = trainer.save_checkpoint, []

    def save_then_stop(out_, step, payload):
        real(out_, step, payload)
        calls.append(step)
        raise KeyboardInterrupt  # as a kill right after the checkpoint of step 10

    monkeypatch.setattr(trainer, "save_checkpoint", save_then_stop)
    assert main(run_args(tiny_files, out, "top-down", 12, "--set", "train.checkpoint_every=10")) == 130
    monkeypatch.setattr(trainer, "save_checkpoint", real)
    assert calls == [10]
    assert len(json.loads(json.dumps(torch_load_state(out)["allocator"]["metrics"]))) == 1  # its row of steps 0-9
    assert main(["run", "--quiet", "--out", str(out), "--resume"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["resumed_from_step"] == 10 and summary["steps"] == 12
    assert_top_down(out)


@pytest.mark.integration
def test_the_example_plugin_runs_through_a_two_run_sweep_registered_in_process(topdown, tiny_files, tmp_path):
    out = tmp_path / "sweep"
    assert main(["sweep", str(sweep_file(tmp_path, tiny_files, "top-down")), "--out", str(out), "--workers", "1",
                 "--quiet"]) == 0
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and {r["status"] for r in rows} == {"ok"} and {r["seed"] for r in rows} == {0, 1}
    for row in rows:
        assert_top_down(out / "runs" / row["run_id"])


@pytest.mark.integration
def test_a_sweep_refuses_a_plugin_its_workers_cannot_import(tiny_files, tmp_path, capsys):
    class Local(Allocator):
        def allocate(self, ctx):
            return dict.fromkeys(ctx.budget.keys, 0)

    register("local-one", Local, replace=True)
    try:
        assert main(["sweep", str(sweep_file(tmp_path, tiny_files, "local-one")), "--out", str(tmp_path / "s"),
                     "--quiet"]) == 2
    finally:
        unregister("local-one")
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "which a sweep's worker processes cannot import" in err


def torch_load_state(out):
    from airlora.checkpoint import load_checkpoint

    return load_checkpoint(out)


# ---- plugins that fail: the same one-line error (exit 2) as a built-in ----

class Raises(Allocator):
    def allocate(self, ctx):
        raise RuntimeError("the plugin's own bug")


class ReturnsAList(Allocator):
    def allocate(self, ctx):
        return [1] * len(ctx.budget.keys)


class LacksKeys(Allocator):
    def allocate(self, ctx):
        return {ctx.budget.keys[0]: 1}


class ReturnsNaN(Allocator):
    def allocate(self, ctx):
        return dict.fromkeys(ctx.budget.keys, math.nan)


class BadPrecision(Allocator):
    def allocate(self, ctx):
        return dict.fromkeys(ctx.budget.keys, 1), dict.fromkeys(ctx.budget.keys, 12)


class BadDelivery(Allocator):
    def allocate(self, ctx):
        return dict.fromkeys(ctx.budget.keys, 0)

    def deliver(self, ctx):
        return {"layers.99.q": 1}


class RaisesInObserve(Allocator):
    def allocate(self, ctx):
        return dict.fromkeys(ctx.budget.keys, 0)

    def observe(self, outcome):
        raise KeyError("reward")


class NotAnAllocator:
    pass


@pytest.mark.integration
@pytest.mark.parametrize("target, message", [
    (Raises, "allocator 'bad' failed in allocate at step 0: RuntimeError: the plugin's own bug"),
    (ReturnsAList, "allocator 'bad' returned a bad decision from allocate at step 0: list [1, 1, 1"),
    (LacksKeys, "allocator 'bad' returned a bad decision from allocate at step 0: ranks has key 'layers.0.k' missing "
                "(11 of 12 missing); expected exactly the keys layers.0.q … layers.1.fc2"),
    (ReturnsNaN, "allocator 'bad' returned a bad decision from allocate at step 0: rank of 'layers.0.q' is nan; "
                 "expected a finite number"),
    (BadPrecision, "allocator 'bad' returned a bad decision from allocate at step 0: precision of 'layers.0.q' is 12; "
                   "expected one of 32 (channel.bits)"),
    (BadDelivery, "allocator 'bad' returned a bad decision from deliver at step 3: ranks has unknown key "
                  "'layers.99.q'"),
    (RaisesInObserve, "allocator 'bad' failed in observe at step 0: KeyError: 'reward'"),
    (NotAnAllocator, "allocator 'bad' (registered in process) is <class 'tests.test_plugins.NotAnAllocator'>, not a "
                     "subclass of airlora.allocators.Allocator"),
    ("no_such_module:Thing", "allocator 'bad' (registered in process) cannot be loaded: ModuleNotFoundError: No "
                             "module named 'no_such_module'"),
])
def test_a_plugin_that_fails_gets_one_line_and_exit_2(target, message, tiny_files, tmp_path, capsys):
    register("bad", target, replace=True)
    try:
        capsys.readouterr()
        assert main(run_args(tiny_files, tmp_path / "run", "bad")) == 2
    finally:
        unregister("bad")
    captured = capsys.readouterr()
    assert captured.err.startswith(f"airlora: error: {message}") and captured.err.count("\n") == 1
    assert not (tmp_path / "run" / "summary.json").exists()


@pytest.mark.integration
def test_with_debug_the_plugin_s_own_traceback_is_shown(tiny_files, tmp_path):
    register("bad", Raises, replace=True)
    try:
        with pytest.raises(AirloraError) as err:
            main(["--debug", *run_args(tiny_files, tmp_path / "run", "bad")])
    finally:
        unregister("bad")
    assert isinstance(err.value.__cause__, RuntimeError)


@pytest.mark.integration
def test_the_example_installed_with_pip_is_found_through_its_entry_point(tiny_files, tmp_path):
    """pip installs the example folder into a target folder; fresh processes with it on PYTHONPATH run it by name
    (`airlora run` and a 2-run `airlora sweep`), with no registration in process."""
    target = tmp_path / "site"
    # built from a copy: setuptools writes build/ and *.egg-info next to the sources it builds
    source = shutil.copytree(EXAMPLE, tmp_path / "example", ignore=shutil.ignore_patterns("build", "*.egg-info"))
    install = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
                              "--no-index", "--target", str(target), str(source)], capture_output=True, text=True)
    assert install.returncode == 0, install.stderr[-2000:]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(target), str(ROOT)]))
    run = subprocess.run([sys.executable, "-m", "airlora.cli", *run_args(tiny_files, tmp_path / "run", "top-down")],
                         capture_output=True, text=True, env=env, cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    assert_top_down(tmp_path / "run")
    sweep = subprocess.run([sys.executable, "-m", "airlora.cli", "sweep", str(sweep_file(tmp_path, tiny_files,
                                                                                       "top-down")),
                            "--out", str(tmp_path / "sweep"), "--workers", "1", "--quiet"],
                           capture_output=True, text=True, env=env, cwd=tmp_path)
    assert sweep.returncode == 0, sweep.stderr[-3000:]
    rows = [json.loads(line) for line in (tmp_path / "sweep" / "results.jsonl").read_text().splitlines()]
    assert [r["status"] for r in rows] == ["ok", "ok"] and {r["allocator"] for r in rows} == {"top-down"}
    # without the target folder the name is unknown again
    bare = subprocess.run([sys.executable, "-m", "airlora.cli", *run_args(tiny_files, tmp_path / "other", "top-down")],
                          capture_output=True, text=True, cwd=tmp_path)
    assert bare.returncode == 2 and "allocator = 'top-down' is not allowed" in bare.stderr
