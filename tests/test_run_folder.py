"""The run folder: --resume needs a run to continue, --overwrite replaces a whole run and nothing else."""

import pytest

from airlora.cli import main
from airlora.errors import AirloraError
from airlora.runner import run

pytestmark = pytest.mark.integration  # end-to-end on the tiny model: see pyproject.toml


def run_flags(tiny_files, out, *extra):
    model, data, config = tiny_files
    return ["run", "--config", str(config), "--model", str(model), "--data", str(data), "--steps", "2",
            "--eval-every", "2", "--quiet", "--out", str(out), *map(str, extra)]


def test_resume_of_a_folder_without_a_run_is_an_error(tiny_files, tiny_config, tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    capsys.readouterr()
    assert main(run_flags(tiny_files, empty, "--resume")) == 2  # flags alone are no run to continue
    err = capsys.readouterr().err.strip()
    assert err == f"airlora: error: --resume: '{empty}' has no config.json; it holds no run to continue"
    assert not list(empty.iterdir())
    assert main(["run", "--out", str(empty), "--resume", "--quiet"]) == 2  # not a fresh default run either
    assert "has no config.json" in capsys.readouterr().err and not list(empty.iterdir())
    assert main(run_flags(tiny_files, tmp_path / "missing", "--resume")) == 2
    assert not (tmp_path / "missing").exists()
    with pytest.raises(AirloraError, match="has no config.json; it holds no run to continue"):
        run(tiny_config, empty, resume=True)
    assert not list(empty.iterdir())


def test_overwrite_replaces_every_file_of_the_old_run(tiny_files, tmp_path, capsys):
    out, fresh = tmp_path / "out", tmp_path / "fresh"
    airllm = ("--allocator", "airllm", "--set", "policy.episode_steps=2")
    assert main(run_flags(tiny_files, out, *airllm)) == 0
    assert (out / "policy.pt").is_file() and (out / "policy_metrics.csv").is_file()
    assert main(run_flags(tiny_files, out, "--allocator", "uniform", "--steps", "3", "--overwrite")) == 0
    assert main(run_flags(tiny_files, fresh, "--allocator", "uniform", "--steps", "3")) == 0
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in fresh.iterdir())  # no policy.pt left
    assert (out / "metrics.csv").read_text().count("\n") == 4  # header + the new run's 3 steps


def test_overwrite_refuses_a_folder_with_files_a_run_does_not_write(tiny_files, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(run_flags(tiny_files, out)) == 0
    (out / "notes.txt").write_text("mine")
    (out / "adapter-int8").mkdir()
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    capsys.readouterr()
    assert main(run_flags(tiny_files, out, "--overwrite")) == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"airlora: error: --overwrite: '{out}' also holds adapter-int8, notes.txt, which an airlora run "
                   "does not write; move them away or choose another folder (--overwrite replaces a run's own files "
                   "only, so the folder never mixes two runs)")
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before  # the old run, untouched
