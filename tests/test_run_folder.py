"""The run folder: --resume needs a run to continue, --overwrite replaces a whole run and nothing else."""

import pytest

from airlora.cli import main
from airlora.errors import AirloraError
from airlora.run import run


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
