"""Export to PEFT format and the edge's load: round trips at 32/16/8/4 bits and mixed, exact byte accounting,
checksums."""

import json
import shutil

import pytest
import torch

from airlora.cli import main
from airlora.data import load_splits
from airlora.edge import attach, edge_evaluate, verify_delivery
from airlora.errors import AirloraError
from airlora.export import export_adapter
from airlora.exported_run import RunAdapter, cloud_model
from airlora.models import load_model
from tests import reference

pytestmark = pytest.mark.integration  # end-to-end on the tiny model: see pyproject.toml

MIXED = [32, 16, 8, 4]


@pytest.mark.parametrize("bits", [32, 16, 8, 4, "mixed"])
def test_round_trip_through_peft_for_ranks_0_to_r_max(finished_run, tmp_path, bits):
    run_dir = tmp_path / "run"
    shutil.copytree(finished_run(), run_dir)
    keys = sorted(RunAdapter(run_dir).ranks)
    ranks = {key: [0, 4, 1, 2, 3, 4][i % 6] for i, key in enumerate(keys)}
    precisions = {key: MIXED[i % 4] if bits == "mixed" else bits for i, key in enumerate(keys)}
    head_bits = 32 if bits == "mixed" else bits
    reference.with_ranks(run_dir, ranks, precisions=precisions, head_bits=head_bits)
    manifest = export_adapter(run_dir, None, tmp_path / "adir")  # the precisions the run chose
    assert manifest["precisions"] == precisions and manifest["precisions_of_run"]

    run = RunAdapter(run_dir)
    edge = attach(tmp_path / "adir", manifest, load_model(run.model_dir)[0].eval())
    want_model = reference.merged_model(run_dir, precisions, head_bits=head_bits)  # quantised independently
    tokenizer = reference.tokenizer_of(run.model_dir)
    inputs = tokenizer(["the film was great fun", "a dull bad movie", "very good"], padding=True, return_tensors="pt")
    with torch.inference_mode():
        want, got = want_model(**inputs).logits, edge(**inputs).logits
        head_only = reference.merged_model(run_dir, adapter=False)(**inputs).logits
    scale = want.abs().max()
    assert (want - head_only).abs().max() > 0.1 * scale  # the adapter matters, so agreement means something
    assert (got - want).abs().max() < 1e-5 * scale
    # PEFT's modules: rank 0 not wrapped at all, the others resized to exactly their rank
    for key, rank in ranks.items():
        module = edge.base_model.model.get_submodule(run.module_names[key])
        if rank == 0:
            assert not hasattr(module, "lora_A")
        else:
            assert module.lora_A["default"].shape[0] == rank == module.lora_E["default"].shape[0]
    # exact accounting: the tensor bytes are the wire format's size, the rest of the file is its header
    shapes = {key: (run.tensors[f"{key}.lora_A"].shape[1], run.tensors[f"{key}.lora_B"].shape[0])
              for key, r in ranks.items() if r}
    head = sum(reference.head_tensor_bits(tuple(t.shape), head_bits) for t in run.head.values())
    expected = sum(ranks[k] * reference.wire_bits(precisions[k], *shapes[k]) for k in shapes) + head
    payload = tmp_path / "adir" / manifest["payload_file"]
    raw = payload.read_bytes()
    header = 8 + int.from_bytes(raw[:8], "little")
    assert (len(raw) - header) * 8 == expected == 8 * (manifest["payload_bytes"] + manifest["scale_bytes"])
    assert manifest["transmitted_params"] == run.summary["transmitted_params"]
    assert manifest["payload_file"] == ("adapter_model.safetensors" if bits in (32, 16)
                                        else "adapter_model.quantised.safetensors")
    config = json.loads((tmp_path / "adir" / "adapter_config.json").read_text())
    assert config["peft_type"] == "ADALORA" and config["init_r"] == 4
    assert len(config["target_modules"]) == sum(1 for r in ranks.values() if r)


@pytest.mark.filterwarnings("ignore:The following rank_pattern keys did not match",  # AdaLoRA's masks, see edge.py
                            "ignore:.*is_gradient_checkpointing.*is deprecated")
def test_a_mixed_delivery_dequantised_loads_with_plain_peft_and_matches_the_cloud(finished_run, tmp_path):
    """The device's whole job with nothing of airlora's but the dequantisation: PEFT loads it on a fresh base."""
    from peft import PeftModel
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    from airlora.bundle import decode_tensors

    run_dir = tmp_path / "run"
    shutil.copytree(finished_run(), run_dir)
    keys = sorted(RunAdapter(run_dir).ranks)
    ranks = {key: [3, 4, 1, 2][i % 4] for i, key in enumerate(keys)}
    precisions = {key: [4, 8, 16, 32, 4, 8][i % 6] for i, key in enumerate(keys)}
    reference.with_ranks(run_dir, ranks, precisions=precisions, head_bits=32)
    manifest = export_adapter(run_dir, None, tmp_path / "adir")
    payload = tmp_path / "adir" / manifest["payload_file"]
    with safe_open(str(payload), "pt") as handle:
        codecs = json.loads(handle.metadata()["airlora_codecs"])
    peft_dir = tmp_path / "peft"
    peft_dir.mkdir()
    save_file(decode_tensors(load_file(str(payload)), codecs), str(peft_dir / "adapter_model.safetensors"))
    shutil.copyfile(tmp_path / "adir" / "adapter_config.json", peft_dir / "adapter_config.json")
    run = RunAdapter(run_dir)
    edge = PeftModel.from_pretrained(load_model(run.model_dir)[0].eval(), str(peft_dir)).eval()
    cloud, tokenizer = cloud_model(run, run.run_tensors(decode_tensors(load_file(str(payload)), codecs)))
    want_model = reference.merged_model(run_dir, precisions, head_bits=32)
    sentences = ["the film was great fun", "a dull bad movie", "very good", "the movie was very awful"]
    inputs = tokenizer(sentences, padding=True, return_tensors="pt")
    with torch.inference_mode():
        got, cloud_logits, want = edge(**inputs).logits, cloud(**inputs).logits, want_model(**inputs).logits
    scale = want.abs().max()
    assert (got - want).abs().max() < 1e-5 * scale and (cloud_logits - want).abs().max() < 1e-5 * scale
    fp32 = reference.merged_model(run_dir)
    with torch.inference_mode():
        assert (fp32(**inputs).logits - want).abs().max() > 1e-3 * scale  # int4 and int8 did change the logits


def test_edge_matches_an_independently_merged_cloud_model(finished_run, tmp_path, tiny_files):
    """A run's adapter merged by hand into a plain transformers model is the cloud model; the edge's logits and
    accuracy at 32, 8 and 4 bits (post-hoc) and mixed (as the run chose) are that model's, quantised by hand."""
    run_dir, base = finished_run(), tiny_files[0]
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
    keys = sorted(summary["ranks"])
    mixed = {key: MIXED[i % 4] for i, key in enumerate(keys)}
    reference.with_ranks(run_dir, {key: [0, 4, 1, 2, 3, 4][i % 6] for i, key in enumerate(keys)}, precisions=mixed)
    want = {bits: reference.logits(reference.merged_model(run_dir, bits), base, test.sentences) for bits in (32, 8, 4)}
    want["mixed"] = reference.logits(reference.merged_model(run_dir, mixed, head_bits=32), base, test.sentences)
    head_only = reference.logits(reference.merged_model(run_dir, adapter=False), base, test.sentences)
    assert (want[32] - head_only).abs().max() > 0.1 * want[32].abs().max()  # the adapter moves the logits
    assert len({tuple(row) for row in want[32].tolist()}) == len(set(test.sentences))  # one per distinct sentence
    for bits in (32, 8, 4, "mixed"):
        manifest = export_adapter(run_dir, None if bits == "mixed" else bits, tmp_path / f"a{bits}")
        ref = manifest["reference"]
        n = len(ref["sentences"])
        assert ref["sentences"] == test.sentences[:n]
        assert torch.allclose(torch.tensor(ref["logits"]), want[bits][:n], atol=1e-4)  # the cloud as delivered
        result = edge_evaluate(tmp_path / f"a{bits}", str(base))
        assert result["max_abs_logit_diff"] < 1e-4
        assert result["test_accuracy"] == accuracy(want[bits]) and result["checksum_ok"]
        assert result["accuracy_drop"] == pytest.approx(summary["test_accuracy"] - accuracy(want[bits]))
        assert float((want[bits] - want[32]).abs().max()) > (1e-2 if bits != 32 else -1)  # the codec mattered


def test_tampered_delivery_fails_its_checksum(finished_run, tmp_path, capsys, tiny_files):
    adir = tmp_path / "adir"
    assert main(["export", str(finished_run()), "--bits", "16", "--out", str(adir)]) == 0
    out = capsys.readouterr().out
    assert "payload" in out and "overhead" in out and "on air" in out and "airtime" in out
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



@pytest.mark.parametrize("bits", [32, 8])
def test_a_head_only_delivery_reaches_the_edge(finished_run, tmp_path, tiny_files, bits):
    """A link that carried only the head (every rank 0): PEFT refuses an adapter targeting nothing; the edge still
    gets the head, and its accuracy is the cloud's with that head."""
    run_dir = tmp_path / "run"
    shutil.copytree(finished_run(), run_dir)
    keys = sorted(RunAdapter(run_dir).ranks)
    reference.with_ranks(run_dir, dict.fromkeys(keys, 0), precisions=dict.fromkeys(keys, bits), head_bits=bits)
    export_adapter(run_dir, None, tmp_path / "adir")
    result = edge_evaluate(tmp_path / "adir", str(tiny_files[0]))
    test = load_splits(RunAdapter(run_dir).config.data, seed=42).test
    want = reference.logits(reference.merged_model(run_dir, bits, adapter=False), tiny_files[0], test.sentences)
    assert result["test_accuracy"] == int((want.argmax(-1) == torch.as_tensor(test.labels)).sum()) / len(test)
    assert result["max_abs_logit_diff"] < 1e-4
