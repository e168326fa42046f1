"""Export to PEFT format and the edge's load: round trips at 32/16/8 bits, exact byte accounting, checksums."""

import json
import shutil

import pytest
import torch

from airlora.cli import main
from airlora.config import load_config, merge
from airlora.data import load_splits
from airlora.edge import attach, edge_evaluate, verify_delivery
from airlora.errors import AirloraError
from airlora.export import RunAdapter, cloud_model, dequantise_int8, export_adapter, quantise_int8
from airlora.models import load_model
from tests import reference


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, tiny_files):
    """A short in-process `random` run on a generous link, so ranks differ per module."""
    from airlora.run import run

    root = tmp_path_factory.mktemp("delivery")
    model, data, config_file = tiny_files
    config = merge(load_config(config_file), {
        "model": str(model), "data.source": str(data), "allocator": "random", "adapter.r_max": 4,
        "train.steps": 6, "train.eval_every": 6, "channel.bandwidth_hz": 1e6, "channel.snr_db": [20.0],
        "train.lr": 5e-2})
    threads = torch.get_num_threads()
    run(config, root / "run")
    torch.set_num_threads(threads)  # the run set it from its config
    return root


@pytest.mark.parametrize("bits, tolerance", [(32, 1e-5), (16, 5e-3), (8, 5e-2)])
def test_round_trip_through_peft_for_ranks_0_to_r_max(finished_run, tmp_path, bits, tolerance):
    run_dir = tmp_path / "run"
    shutil.copytree(finished_run / "run", run_dir)
    keys = sorted(RunAdapter(run_dir).ranks)
    ranks = {key: [0, 4, 1, 2, 3, 4][i % 6] for i, key in enumerate(keys)}
    reference.with_ranks(run_dir, ranks)
    manifest = export_adapter(run_dir, bits, tmp_path / "adir")

    run = RunAdapter(run_dir)
    cloud, tokenizer = cloud_model(run)
    edge = attach(tmp_path / "adir", manifest, load_model(run.model_dir)[0].eval())
    inputs = tokenizer(["the film was great fun", "a dull bad movie", "very good"], padding=True, return_tensors="pt")
    with torch.inference_mode():
        want, got = cloud(**inputs).logits, edge(**inputs).logits
        plain = load_model(run.model_dir)[0].eval()
        plain.classifier.load_state_dict({k.removeprefix("classifier."): v for k, v in run.head.items()})
        head_only = plain(**inputs).logits
    scale = want.abs().max()
    assert (want - head_only).abs().max() > 0.1 * scale  # the adapter matters, so agreement means something
    assert (got - want).abs().max() < tolerance * scale
    # PEFT's modules: rank 0 not wrapped at all, the others resized to exactly their rank
    for key, rank in ranks.items():
        module = edge.base_model.model.get_submodule(run.module_names[key])
        if rank == 0:
            assert not hasattr(module, "lora_A")
        else:
            assert module.lora_A["default"].shape[0] == rank == module.lora_E["default"].shape[0]
    # exact accounting: the parameter tensors are params × b / 8 bytes; the rest of the file is overhead
    params = run.summary["transmitted_params"]
    assert manifest["transmitted_params"] == params
    assert manifest["payload_bytes"] * 8 == params * bits
    assert manifest["scale_bytes"] == (4 * (3 * sum(1 for r in ranks.values() if r) + 2) if bits == 8 else 0)
    payload = tmp_path / "adir" / manifest["payload_file"]
    assert payload.stat().st_size == manifest["header_bytes"] + manifest["payload_bytes"] + manifest["scale_bytes"]
    config = json.loads((tmp_path / "adir" / "adapter_config.json").read_text())
    assert config["peft_type"] == "ADALORA" and config["init_r"] == 4
    assert len(config["target_modules"]) == sum(1 for r in ranks.values() if r)


def test_edge_matches_an_independently_merged_cloud_model(finished_run, tmp_path, tiny_files):
    """A run's adapter merged by hand into a plain transformers model is the cloud model, and the edge's logits and
    accuracy at 32 and 8 bits are that model's (8 bits: quantised by hand)."""
    run_dir, base = finished_run / "run", tiny_files[0]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert len(set(summary["ranks"].values())) >= 3  # the random allocator delivered heterogeneous ranks
    test = load_splits(RunAdapter(run_dir).config.data, seed=42).test
    labels = torch.as_tensor(test.labels)

    def accuracy(logits):
        return int((logits.argmax(-1) == labels).sum()) / len(labels)

    assert accuracy(reference.logits(reference.merged_model(run_dir), base, test.sentences)) == summary["test_accuracy"]
    # 6 steps leave the tiny model's logits almost the same for every sentence; large triplets make them differ
    shutil.copytree(run_dir, tmp_path / "run")
    run_dir = tmp_path / "run"
    reference.with_ranks(run_dir, {key: [0, 4, 1, 2, 3, 4][i % 6] for i, key in enumerate(sorted(summary["ranks"]))})
    want = {bits: reference.logits(reference.merged_model(run_dir, bits), base, test.sentences) for bits in (32, 8)}
    head_only = reference.logits(reference.merged_model(run_dir, adapter=False), base, test.sentences)
    assert (want[32] - head_only).abs().max() > 0.1 * want[32].abs().max()  # the adapter moves the logits
    assert len({tuple(row) for row in want[32].tolist()}) == len(set(test.sentences))  # one per distinct sentence
    for bits in (32, 8):
        manifest = export_adapter(run_dir, bits, tmp_path / f"a{bits}")
        ref = manifest["reference"]
        n = len(ref["sentences"])
        assert ref["sentences"] == test.sentences[:n]
        assert torch.allclose(torch.tensor(ref["logits"]), want[32][:n], atol=1e-4)
        result = edge_evaluate(tmp_path / f"a{bits}", str(base))
        expected_diff = float((want[bits] - want[32])[:n].abs().max())
        assert result["max_abs_logit_diff"] == pytest.approx(expected_diff, abs=1e-4)
        assert result["test_accuracy"] == accuracy(want[bits]) and result["checksum_ok"]
        assert result["accuracy_drop"] == pytest.approx(summary["test_accuracy"] - accuracy(want[bits]))
    assert expected_diff > 1e-2  # int8 really changed the logits, and the edge saw exactly that change


def test_int8_quantisation_is_within_half_a_step():
    x = torch.randn(50, 7, generator=torch.Generator().manual_seed(0))
    q, s = quantise_int8(x)
    assert q.dtype == torch.int8 and int(q.abs().max()) == 127
    assert (dequantise_int8(q, s) - x).abs().max() <= s.item() / 2 + 1e-7
    q0, s0 = quantise_int8(torch.zeros(3, 2))
    assert torch.equal(dequantise_int8(q0, s0), torch.zeros(3, 2))


def test_tampered_delivery_fails_its_checksum(finished_run, tmp_path, capsys, tiny_files):
    adir = tmp_path / "adir"
    assert main(["export", str(finished_run / "run"), "--bits", "16", "--out", str(adir)]) == 0
    out = capsys.readouterr().out
    assert "payload" in out and "accounted bits" in out and "airtime" in out
    sha = out.split("sha256 ")[1].split()[0]
    verify_delivery(adir, sha)  # intact: passes, also against the printed value
    with pytest.raises(AirloraError, match="--sha256"):
        verify_delivery(adir, "0" * 64)
    payload = adir / "adapter_model.safetensors"
    data = bytearray(payload.read_bytes())
    data[-5] ^= 0x01  # one bit of one parameter
    payload.write_bytes(bytes(data))
    assert main(["edge", str(adir), "--base", str(tiny_files[0])]) == 2
    captured = capsys.readouterr()
    assert "checksum mismatch for adapter_model.safetensors" in captured.err and captured.out == ""


def test_export_refuses_a_folder_that_is_not_a_run(tmp_path):
    with pytest.raises(AirloraError, match="adapter.safetensors"):
        export_adapter(tmp_path, 32, tmp_path / "out")

