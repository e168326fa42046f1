"""The Python API: ``from airlora import RunConfig, run`` is the command's own code path and returns the summary the
run wrote; ``import airlora`` alone loads neither torch nor the models."""

import csv
import json
import math
import subprocess
import sys

import pytest
from safetensors import safe_open


def test_import_airlora_loads_no_heavy_package():
    code = (
        "import sys, airlora; from airlora import RunConfig, merge; "
        "print(sorted(m for m in ('torch', 'transformers', 'numpy', 'airlora.runner') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


@pytest.mark.integration
def test_a_run_from_python_returns_the_summary_it_wrote(tiny_config, tmp_path):
    import importlib.util
    import pkgutil

    import airlora

    # every submodule loaded first: none may take the place of the function (a submodule airlora/run.py would)
    for module in pkgutil.walk_packages(airlora.__path__, "airlora."):
        importlib.import_module(module.name)
    from airlora import RunConfig, merge, run

    assert importlib.util.find_spec("airlora.run") is None and run is airlora.runner.run
    config = merge(tiny_config, {"train.steps": 4, "allocator": "heuristic", "train.report_to": "none"})
    assert isinstance(config, RunConfig)
    out = tmp_path / "run"
    summary = run(config, out)

    assert summary == json.loads((out / "summary.json").read_text())
    with (out / "metrics.csv").open(newline="") as handle:
        metrics = list(csv.DictReader(handle))
    assert summary["steps"] == len(metrics) == 4
    assert summary["allocator"] == "heuristic"
    assert math.isclose(summary["mean_reward"], sum(float(r["reward"]) for r in metrics) / 4)
    with safe_open(str(out / "adapter.safetensors"), "pt") as handle:
        assert summary["ranks"] == json.loads(handle.metadata()["ranks"])
    assert json.loads((out / "config.json").read_text())["allocator"] == "heuristic"
