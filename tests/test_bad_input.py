"""Bad input, category by category: one `airlora: error: …` line naming what is wrong and what is allowed, exit
status 2, no traceback (``--debug`` shows it), and no half-written output. Cases already covered elsewhere (the
config fields in test_config, the data files in test_data, the payload checksum in test_delivery) are not repeated.
"""

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors import safe_open
from safetensors.torch import save_file

from airlora.channel import SnrSchedule
from airlora.cli import main
from airlora.config import ChannelConfig, load_config
from airlora.errors import AirloraError
from airlora.ranks import parse_key, validate_ranks

RESULT_FILES = ("config.json", "metrics.csv", "summary.json", "adapter.safetensors")


def fails(capsys, *args) -> str:
    """Run the CLI in-process: exit status 2, nothing on stdout, one error line on stderr (returned)."""
    capsys.readouterr()  # drop what the test's own set-up printed (save_pretrained's progress bar)
    assert main([str(a) for a in args]) == 2
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert err.startswith("airlora: error: ") and "\n" not in err and captured.out == ""
    return err


def run_args(tiny_files, out, **flags) -> list[str]:
    """`airlora run` on the tiny model and data, two steps; ``flags`` override (--data, --model, --snr-db …)."""
    model, data, config = tiny_files
    given = {"--config": config, "--model": model, "--data": data, "--steps": 2, "--out": out} | flags
    return ["run", "--quiet", *[str(x) for pair in given.items() for x in pair]]


def assert_no_results(out) -> None:
    if out.exists():
        assert not [name for name in RESULT_FILES if (out / name).exists()]


def tokenizer_files(model, folder):
    """Copy the tiny model's tokenizer into ``folder`` (everything but weights and config)."""
    folder.mkdir(parents=True, exist_ok=True)
    for file in model.iterdir():
        if file.name not in ("config.json", "model.safetensors"):
            shutil.copy(file, folder / file.name)
    return folder


@pytest.fixture(scope="module")
def delivery(finished_run, tmp_path_factory):
    """The 32-bit export of the shared finished `random` run (shared: copy it before changing it)."""
    from airlora.export import export_adapter

    out = tmp_path_factory.mktemp("bad-input") / "delivery"
    export_adapter(finished_run(), 32, out)
    return out


@pytest.fixture
def run_copy(finished_run, tmp_path):
    return shutil.copytree(finished_run(), tmp_path / "run")


@pytest.fixture
def delivery_copy(delivery, tmp_path):
    return shutil.copytree(delivery, tmp_path / "delivery")


# ---------------------------------------------------------------------------------------------- configs


@pytest.mark.parametrize(("name", "content", "message"), [
    ("list.yaml", b"- a\n- b\n", "config must be a mapping, got list"),
    ("latin1.yaml", b"model: caf\xe9\n", r"latin1.yaml': byte 10 \(0xe9\) is not valid UTF-8; re-save the file"),
    ("broken.json", b"{bad", "broken.json' is not valid: Expecting property name"),
    ("tab.yaml", b"train:\n\tsteps: 3\n", "tab.yaml' is not valid YAML: found character .* that cannot start any "
                                          "token at line 2, column 1$"),
    ("text.yaml", b"channel:\n  bandwidth_hz: 1e6\n",
     r"channel.bandwidth_hz = '1e6' has the wrong type; expected float \(YAML reads 1e6 as text"),
    ("modules.yaml", b"adapter:\n  target_modules: {q: query}\n",
     "adapter.target_modules = .* expected a mapping with exactly the keys q, k, v, o, fc1, fc2"),
    ("section.yaml", b"channel: 5\n", "channel must be a mapping, got int"),
])
def test_bad_config_files(tmp_path, capsys, name, content, message):
    path = tmp_path / name
    path.write_bytes(content)
    err = fails(capsys, "run", "--config", path, "--out", tmp_path / "out")
    assert re.search(message, err), err
    assert not (tmp_path / "out").exists()  # rejected before --out is made


def test_config_path_that_is_a_folder(tmp_path):
    with pytest.raises(AirloraError, match="is a folder; expected a .yaml, .yml or .json file"):
        load_config(tmp_path)


def test_unreadable_config_and_data_files(tmp_path, monkeypatch):
    from airlora.config import DataConfig
    from airlora.data import load_splits

    config, data = tmp_path / "c.yaml", tmp_path / "d.csv"
    config.write_text("{}")
    data.write_text("sentence,label\n")

    def denied(self):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(Path, "read_bytes", denied)  # chmod does not stop root, who may run the tests
    with pytest.raises(AirloraError, match=r"config file '.*c.yaml' cannot be read \(Permission denied\)"):
        load_config(config)
    with pytest.raises(AirloraError, match=r"d.csv cannot be read \(Permission denied\)"):
        load_splits(DataConfig(source=str(data)), seed=0)


# ---------------------------------------------------------------------------------------------- CLI arguments


@pytest.mark.parametrize(("args", "message"), [
    (["channel", "--snr-db", "nan"], r"channel.snr_db = \(nan,\) is not allowed; expected one or more finite numbers"),
    (["channel", "--snr-db", ""], "--snr-db '': expected a number, a comma-separated list"),
    (["channel", "--t-max-s", "0"], "channel.t_max_s = 0.0 is not allowed; expected a positive number of seconds"),
    (["channel", "--t-max-s", "-1"], "channel.t_max_s = -1.0 is not allowed; expected a positive number of seconds"),
    (["channel", "--bandwidth-hz", "0"], "channel.bandwidth_hz = 0.0 is not allowed; expected a positive number of Hz"),
    (["channel", "--bandwidth-hz", "nan"], "channel.bandwidth_hz = nan is not allowed"),
    (["channel", "--r-max", "0"], r"adapter.r_max = 0 is not allowed; expected an integer in \[1, 4096\]"),
    (["channel", "--bits", "0"], r"channel.bits = \[0\] is not allowed; expected a non-empty list of values from 4, "
                                 "8, 16, 32 \\(the precisions airlora export delivers\\)"),
    (["run", "--out", "{tmp}/o", "--bits", "3"], r"channel.bits = \[3\] is not allowed; expected a non-empty list "
                                                 "of values from 4, 8, 16, 32"),
    (["run", "--out", "{tmp}/o", "--bits", "4,8,12"], r"channel.bits = \[4, 8, 12\] is not allowed"),
    (["run", "--out", "{tmp}/o", "--bits", "8bit"], "--bits '8bit': expected a number of bits or a comma-separated "
                                                    "list, e.g. --bits 8 or --bits 4,8,16,32"),
    (["run", "--out", "{tmp}/o", "--set", "channel.bits_per_param=3"], r"channel.bits_per_param = 3 is not allowed; "
     r"expected one of 4, 8, 16, 32 \(bits_per_param is the old name of channel.bits, a list of those\)"),
    (["run", "--out", "{tmp}/o", "--lambda", "-1"], "train.reward_lambda = -1.0 is not allowed; expected a number >="),
    (["run", "--out", "{tmp}/o", "--seed", "-1"], r"train.seed = -1 is not allowed; expected an integer in \[0, 2"),
    (["run", "--out", "{tmp}/o", "--resume", "--overwrite"], "--resume continues the run .* choose one"),
    (["run", "--out", "{tmp}/o", "--match-bits-of", "{tmp}"], r"allocator is 'uniform' \(add --allocator adalora\)"),
    (["sweep", "s.yaml", "--out", "{tmp}/o", "--workers", "0"], "--workers 0: expected an integer >= 1"),
    (["sweep", "s.yaml", "--out", "{tmp}/o", "--set", "steps"], "--set 'steps': expected PATH=VALUE"),
    (["run", "--out", "{tmp}/o", "--set", "train.lr"], "--set 'train.lr': expected PATH=VALUE"),
    (["run", "--out", "{tmp}/o", "--set", "nope.x=1"], "'nope.x' is not a config path: the config has no section "
                                                      "'nope'; sections: adalora, adapter, channel"),
    (["run", "--out", "{tmp}/o", "--set", "train.lr.x=1"], "'train.lr.x' is not a config path: train has no section "
                                                          "'lr'"),
    (["run", "--out", "{tmp}/o", "--set", "train.lr=-1"], r"train.lr = -1.0 is not allowed; expected a positive"),
    (["run", "--out", "{tmp}/o", "--resume"], "--resume: '.*/o' has no config.json; it holds no run to continue"),
])
def test_bad_flag_values(tmp_path, capsys, args, message):
    err = fails(capsys, *[a.format(tmp=tmp_path) for a in args])
    assert re.search(message, err), err
    assert not list(tmp_path.iterdir())  # nothing written


@pytest.mark.parametrize(("args", "message"), [
    (["run", "--out", "o", "--steps", "x"], "airlora run: error: argument --steps: invalid int value: 'x'"),
    (["export", "r", "--out", "o", "--bits", "12"], "argument --bits: invalid choice: 12 (choose from 32, 16, 8, 4)"),
    (["channel", "--steps", "3"], "airlora: error: unrecognized arguments: --steps 3"),
    (["run", "--steps", "3"], "the following arguments are required: --out"),
])
def test_argparse_errors_exit_2_with_usage(capsys, args, message):
    with pytest.raises(SystemExit) as exit_:
        main(args)
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert message in err and err.startswith("usage: airlora") and "Traceback" not in err


@pytest.mark.parametrize(("text", "message"), [("{not json", "config.json' is not valid JSON"),
                                              ("[1, 2]", "config.json' is not a run's config")])
def test_resume_of_a_damaged_config_json(tmp_path, capsys, text, message):
    (tmp_path / "o").mkdir()
    (tmp_path / "o" / "config.json").write_text(text)
    assert message in fails(capsys, "run", "--out", tmp_path / "o", "--resume")


def test_debug_flag_raises_instead_of_printing(tmp_path, capsys):
    with pytest.raises(AirloraError, match="channel.t_max_s"):
        main(["--debug", "channel", "--t-max-s", "0"])
    assert capsys.readouterr().err == ""


@pytest.mark.integration
def test_subprocess_exit_2_without_traceback_and_debug_shows_it(tiny_files, tmp_path):
    bad = tmp_path / "labels.csv"
    bad.write_text("sentence,label\ngood,1\nbad,maybe\n")
    command = [sys.executable, "-m", "airlora.cli"]
    args = run_args(tiny_files, tmp_path / "out", **{"--data": bad})
    proc = subprocess.run(command + args, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.strip() == (f"airlora: error: {bad}: column 'label' has 1 value(s) that are not class labels "
                                   "('maybe'); allowed: integers 0..K-1, every class in the train split (or "
                                   "'negative'/'positive' for 0/1)")
    assert_no_results(tmp_path / "out")
    debug = subprocess.run(command + ["--debug"] + args, capture_output=True, text=True, timeout=300)
    assert debug.returncode != 0 and debug.returncode != 2
    assert "Traceback (most recent call last)" in debug.stderr and "airlora.errors.AirloraError" in debug.stderr


# ---------------------------------------------------------------------------------------------- data files


@pytest.mark.integration
@pytest.mark.parametrize(("name", "content", "message"), [
    ("missing.csv", None, "missing.csv': no such file or folder; expected 'tweets'"),
    ("empty.csv", b"", "empty.csv is empty; expected a header 'sentence,label'"),
    ("columns.csv", b"review,stars\ngood,5\n", "missing column 'sentence (or text)' and 'label'; found columns "
                                               "'review', 'stars'"),
    ("labels.csv", b"sentence,label\ngood,1\nok,2.5\n", "column 'label' has 1 value(s) that are not class labels "
                                                      "('2.5')"),
    ("latin1.tsv", b"sentence\tlabel\ncaf\xe9\t1\n", "byte 18 (0xe9) is not valid UTF-8"),
    ("hidden.csv", b"sentence,label\na,-1\nb,-1\n", "every value of column 'label' in its train split is -1"),
])
def test_run_with_a_bad_data_file_writes_no_results(tiny_files, tmp_path, capsys, name, content, message):
    path = tmp_path / name
    if content is not None:
        path.write_bytes(content)
    out = tmp_path / "out"
    err = fails(capsys, *run_args(tiny_files, out, **{"--data": path}))
    assert message in err and str(path) in err
    assert_no_results(out)


@pytest.mark.integration
def test_edge_with_a_bad_data_file(delivery, tiny_files, tmp_path, capsys):
    err = fails(capsys, "edge", delivery, "--base", tiny_files[0], "--data", tmp_path / "gone.csv")
    assert "gone.csv': no such file or folder" in err


@pytest.mark.integration
def test_run_out_that_is_a_file(tiny_files, tmp_path, capsys):
    (tmp_path / "out").write_text("notes")
    err = fails(capsys, *run_args(tiny_files, tmp_path / "out"))
    assert "is a file" in err and (tmp_path / "out").read_text() == "notes"


# ---------------------------------------------------------------------------------------------- model folders


@pytest.mark.integration
def test_model_folder_without_weights(tiny_files, tmp_path, capsys):
    model = tokenizer_files(tiny_files[0], tmp_path / "noweights")
    shutil.copy(tiny_files[0] / "config.json", model / "config.json")
    out = tmp_path / "out"
    err = fails(capsys, *run_args(tiny_files, out, **{"--model": model}))
    assert f"model '{model}' could not be loaded as a sequence classifier" in err and "model.safetensors" in err
    assert_no_results(out)


def test_model_folder_with_a_broken_config(tmp_path, capsys):
    (tmp_path / "config.json").write_text("{oops")
    err = fails(capsys, "channel", "--model", tmp_path)
    assert f"model '{tmp_path}': config.json could not be read" in err and "not a valid JSON file" in err


def test_model_path_that_is_a_file(tmp_path, capsys):
    (tmp_path / "weights.bin").write_bytes(b"x")
    err = fails(capsys, "channel", "--model", tmp_path / "weights.bin")
    assert ("is not a Hugging Face checkpoint folder (no config.json); allowed: 'minilm', 'smollm2-135m' or a local "
            "folder") in err


@pytest.mark.integration
def test_architecture_without_the_six_modules(tiny_files, tmp_path, capsys):
    from transformers import AutoModelForSequenceClassification, DistilBertConfig

    distil = tokenizer_files(tiny_files[0], tmp_path / "distil")
    config = DistilBertConfig(vocab_size=45, dim=32, n_layers=2, n_heads=2, hidden_dim=48, max_position_embeddings=64)
    AutoModelForSequenceClassification.from_config(config).save_pretrained(distil)
    for args in (["channel", "--model", distil], run_args(tiny_files, tmp_path / "out", **{"--model": distil})):
        err = fails(capsys, *args)
        assert "no adapted modules found: the architecture is not BERT-, OPT- or Llama-style" in err
        assert "attention.q_lin" in err and "ffn.lin2" in err and "target_modules" in err
    assert_no_results(tmp_path / "out")


# ---------------------------------------------------------------------------------------------- rank mappings


KEYS = ["layers.0.q", "layers.0.k", "layers.1.q"]


@pytest.mark.parametrize(("ranks", "message"), [
    ({"layers.2.q": 1}, "rank key 'layers.2.q' is not a module of this model; allowed: layers.0.q … layers.1.q"),
    ({"layers.0.q": -1}, r"rank of 'layers.0.q' is -1; allowed: an integer in \[0, 4\]"),
    ({"layers.0.k": 5}, r"rank of 'layers.0.k' is 5; allowed: an integer in \[0, 4\]"),
    ({"layers.0.k": 1.5}, r"rank of 'layers.0.k' is 1.5; allowed: an integer in \[0, 4\]"),
    ({"layers.0.k": True}, r"rank of 'layers.0.k' is True; allowed: an integer in \[0, 4\]"),
])
def test_rank_mapping_checks(ranks, message):
    with pytest.raises(AirloraError, match=message):
        validate_ranks(ranks, KEYS, r_max=4)
    assert validate_ranks({"layers.0.k": 4}, KEYS, r_max=4) == {"layers.0.q": 0, "layers.0.k": 4, "layers.1.q": 0}


def test_rank_key_format():
    with pytest.raises(AirloraError, match=r"rank key 'layer.0.query': expected 'layers.<i>.<module>' with module in "
                                           "q, k, v, o, fc1, fc2"):
        parse_key("layer.0.query")


def rewrite_adapter(run_dir, ranks=None, drop=None):
    """Rewrite a run's adapter.safetensors with other metadata ranks, or without tensor ``drop``."""
    path = run_dir / "adapter.safetensors"
    with safe_open(str(path), "pt") as handle:
        metadata = handle.metadata()
        tensors = {key: handle.get_tensor(key) for key in handle.keys() if key != drop}
    if ranks is not None:
        metadata["ranks"] = json.dumps(json.loads(metadata["ranks"]) | ranks)
    save_file(tensors, str(path), metadata=metadata)


@pytest.mark.integration
def test_export_rejects_a_precision_no_codec_delivers_in_a_run(run_copy, tmp_path, capsys):
    path = run_copy / "adapter.safetensors"
    with safe_open(str(path), "pt") as handle:
        metadata, tensors = handle.metadata(), {key: handle.get_tensor(key) for key in handle.keys()}
    metadata["precisions"] = json.dumps(dict.fromkeys(json.loads(metadata["precisions"]), 3))
    save_file(tensors, str(path), metadata=metadata)
    err = fails(capsys, "export", run_copy, "--out", tmp_path / "adir")
    assert "metadata: precisions or head_bits are not a precision per module from 4, 8, 16, 32; the file was changed " \
           "after the run" in err
    assert not (tmp_path / "adir").exists()


@pytest.mark.integration
def test_export_rejects_ranks_above_r_max_in_a_run(run_copy, tmp_path, capsys):
    rewrite_adapter(run_copy, ranks={"layers.0.q": 9})
    err = fails(capsys, "export", run_copy, "--out", tmp_path / "adir")
    assert r"rank of 'layers.0.q' is 9; allowed: an integer in [0, 4]" in err and "changed after the run" in err
    assert not (tmp_path / "adir").exists()


@pytest.mark.integration
def test_export_rejects_unknown_rank_keys_in_a_run(run_copy, tmp_path, capsys):
    rewrite_adapter(run_copy, ranks={"layers.7.q": 1})
    err = fails(capsys, "export", run_copy, "--out", tmp_path / "adir")
    assert "rank key 'layers.7.q' is not a module of this model; allowed: layers.0.q … layers.1.fc2" in err


# ---------------------------------------------------------------------------------------------- channel settings


def test_trace_file_with_undecodable_bytes(tmp_path):
    trace = tmp_path / "snr.txt"
    trace.write_bytes(b"1.0\n\xff\xfe\n")
    with pytest.raises(AirloraError, match=r"SNR trace '.*snr.txt' cannot be read \(UnicodeDecodeError\); expected "
                                           "one finite SNR in dB per line"):
        SnrSchedule(ChannelConfig(snr_schedule="trace", snr_trace=str(trace)), seed=0)
    with pytest.raises(AirloraError, match=r"cannot be read \(IsADirectoryError\)"):
        SnrSchedule(ChannelConfig(snr_schedule="trace", snr_trace=str(tmp_path)), seed=0)


@pytest.mark.integration
def test_run_with_a_bad_trace_file_writes_no_results(tiny_files, tmp_path, capsys):
    trace = tmp_path / "snr.txt"
    trace.write_text("5\nloud\n")
    out = tmp_path / "out"
    err = fails(capsys, *run_args(tiny_files, out, **{"--snr-db": trace}))
    assert f"SNR trace '{trace}' line 2: 'loud' is not allowed; expected one finite SNR in dB per line" in err
    assert_no_results(out)


@pytest.mark.integration
def test_channel_command_reads_the_trace_file(tiny_files, tmp_path, capsys):
    trace = tmp_path / "snr.txt"
    trace.write_text("5\nloud\n")
    err = fails(capsys, "channel", "--model", tiny_files[0], "--snr-db", trace)
    assert "line 2: 'loud' is not allowed" in err


# ---------------------------------------------------------------------------------------------- adapter files


@pytest.mark.integration
@pytest.mark.parametrize(("damage", "message"), [
    ("truncate", "adapter.safetensors' is not a readable safetensors file (Error while deserializing header"),
    ("format", "adapter.safetensors' is not an airlora adapter (format 'pt'); expected 'airlora-svd-adapter/1'"),
    ("drop", "do not hold rank"),
    ("config", "config.json' is not valid JSON"),
    ("summary", "summary.json' lacks test_accuracy; expected the summary of a finished `airlora run`"),
])
def test_export_rejects_a_damaged_run_folder(run_copy, tmp_path, capsys, damage, message):
    adapter = run_copy / "adapter.safetensors"
    if damage == "truncate":
        adapter.write_bytes(adapter.read_bytes()[:-100])
    elif damage == "format":
        with safe_open(str(adapter), "pt") as handle:
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}
        save_file(tensors, str(adapter), metadata={"format": "pt"})
    elif damage == "drop":
        with safe_open(str(adapter), "pt") as handle:
            key = next(k for k, r in json.loads(handle.metadata()["ranks"]).items() if r)
        rewrite_adapter(run_copy, drop=f"{key}.lora_B")
    elif damage == "config":
        (run_copy / "config.json").write_text('{"model": ')
    else:
        summary = json.loads((run_copy / "summary.json").read_text())
        del summary["test_accuracy"]
        (run_copy / "summary.json").write_text(json.dumps(summary))
    err = fails(capsys, "export", run_copy, "--out", tmp_path / "adir")
    assert message in err
    assert not (tmp_path / "adir").exists()


@pytest.mark.integration
def test_export_that_fails_late_leaves_no_partial_folder(run_copy, tmp_path, capsys):
    config = json.loads((run_copy / "config.json").read_text())
    config["data"]["source"] = str(tmp_path / "moved.csv")  # the run's data is gone
    (run_copy / "config.json").write_text(json.dumps(config))
    err = fails(capsys, "export", run_copy, "--out", tmp_path / "adir")
    assert "moved.csv': no such file or folder" in err
    assert not (tmp_path / "adir").exists()


@pytest.mark.integration
def test_export_out_that_is_a_file(finished_run, tmp_path, capsys):
    (tmp_path / "adir").write_text("notes")
    err = fails(capsys, "export", finished_run(), "--out", tmp_path / "adir")
    assert "--out" in err and "is a file; expected a folder (new or empty) for the export" in err
    assert (tmp_path / "adir").read_text() == "notes"


@pytest.mark.integration
@pytest.mark.parametrize(("damage", "message"), [
    ("truncate", "checksum mismatch for adapter_model.safetensors"),
    ("config", "checksum mismatch for adapter_config.json"),
    ("manifest", "is not a delivery folder (no readable delivery.json); expected the --out folder of `airlora export`"),
    ("fields", "delivery.json' lacks a valid sha256, precisions; the manifest was changed after export"),
    ("record", "is not a delivery folder (no readable delivery_record.json); expected the --out folder of"),
    ("outside", "sha256 must list the payload file 'adapter_model.safetensors' and only plain file names"),
])
def test_edge_rejects_a_damaged_delivery(delivery_copy, tiny_files, capsys, damage, message):
    manifest_path = delivery_copy / "delivery.json"
    manifest = json.loads(manifest_path.read_text())
    if damage == "truncate":
        payload = delivery_copy / "adapter_model.safetensors"
        payload.write_bytes(payload.read_bytes()[:200])
    elif damage == "config":
        config = delivery_copy / "adapter_config.json"
        config.write_text(config.read_text().replace('"lora_dropout": 0.0', '"lora_dropout": 0.5'))
    elif damage == "manifest":
        manifest_path.write_text(manifest_path.read_text()[:-10])
    elif damage == "fields":
        manifest["sha256"], manifest["precisions"] = [], "32"
        manifest_path.write_text(json.dumps(manifest))
    elif damage == "record":
        (delivery_copy / "delivery_record.json").unlink()
    else:
        manifest["sha256"]["../run/config.json"] = "0" * 64
        manifest_path.write_text(json.dumps(manifest))
    err = fails(capsys, "edge", delivery_copy, "--base", tiny_files[0])
    assert message in err


@pytest.mark.integration
def test_edge_rejects_a_base_model_of_another_size(delivery, tiny_files, tmp_path, capsys):
    from transformers import AutoModelForSequenceClassification

    from tests.tiny_models import tiny_config

    other = tokenizer_files(tiny_files[0], tmp_path / "other")
    config = tiny_config("bert")
    config.vocab_size, config.hidden_size, config.intermediate_size = 45, 16, 24
    AutoModelForSequenceClassification.from_config(config).save_pretrained(other)
    err = fails(capsys, "edge", delivery, "--base", other)
    assert f"the delivery was built for another base model ({tiny_files[0]}): --base '{other}' has " in err
    assert "as a 16 -> 16 linear layer, which lora_A of shape" in err
    assert "give the base model the run was trained on" in err
