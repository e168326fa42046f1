# ruff: noqa: F811  (pytest passes the imported fixture family_run by name)
"""Delivery formats: the plain LoRA export of tiny BERT, OPT and Llama runs loads with nothing but PEFT's LoraConfig
on a fresh base and gives the AdaLoRA delivery's logits; its bytes are the wire format's, one value fewer per
triplet; a tampered file is refused."""

import json
import math
import shutil

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForSequenceClassification

from airlora.cli import main
from airlora.data import load_splits
from airlora.edge import attach, edge_evaluate
from airlora.export import export_adapter
from airlora.exported_run import RunAdapter
from airlora.models import load_model
from tests import reference
from tests.test_architectures import family_run  # noqa: F401  (the fixture: a run per family)

pytestmark = pytest.mark.filterwarnings("ignore:The following rank_pattern keys did not match",
                                        "ignore:.*is_gradient_checkpointing.*is deprecated")


def factor_bits(bits: int, d_in: int, d_out: int) -> int:
    """Bits per unit rank of a plain LoRA module on the wire, written out: a lora_A row and a lora_B column, floats
    cast; integer codes with a bf16 scale per 64 values (int4 two per byte); no λ."""
    if bits in (32, 16):
        return bits * (d_in + d_out)
    row = lambda d: 8 * math.ceil(d * bits / 8) + 16 * math.ceil(d / 64)  # noqa: E731
    return row(d_in) + row(d_out)


def big_triplets(family_run, tmp_path, precisions=None):
    """A copy of the family's run with heterogeneous ranks and large random triplets (so the adapter moves logits)."""
    family, model, run_dir = family_run
    shutil.copytree(run_dir, tmp_path / "run")
    keys = sorted(RunAdapter(tmp_path / "run").ranks)
    ranks = {key: [0, 4, 1, 2, 3, 4][i % 6] for i, key in enumerate(keys)}
    reference.with_ranks(tmp_path / "run", ranks, precisions=precisions)
    return tmp_path / "run", model, ranks


def plain_peft(model_dir, adir):
    """The delivery loaded by PEFT alone on a fresh transformers model (as any LoRA tool would)."""
    base = AutoModelForSequenceClassification.from_pretrained(model_dir)
    base.config.pad_token_id = reference.tokenizer_of(model_dir).pad_token_id
    return PeftModel.from_pretrained(base, str(adir)).eval()


def test_lora_export_loads_as_plain_lora_and_equals_the_adalora_delivery(family_run, tmp_path):
    run_dir, model, ranks = big_triplets(family_run, tmp_path)
    run = RunAdapter(run_dir)
    batch = load_splits(run.config.data, seed=42).test.sentences[:16]
    lora = export_adapter(run_dir, 32, tmp_path / "lora", adapter_format="lora")
    adalora = export_adapter(run_dir, 32, tmp_path / "adalora")
    config = json.loads((tmp_path / "lora" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and lora["adapter_format"] == "lora"

    edge = plain_peft(model, tmp_path / "lora")
    assert edge.peft_config["default"].peft_type.value == "LORA"
    for key, rank in ranks.items():  # every module at its own rank, nothing for rank 0
        module = edge.base_model.model.get_submodule(run.module_names[key])
        assert (not hasattr(module, "lora_A")) if rank == 0 else module.lora_A["default"].weight.shape[0] == rank
        if rank:
            assert module.scaling["default"] == pytest.approx(config["lora_alpha"] / rank)  # alpha / r_m per module
    got = reference.logits(edge, model, batch)
    want = reference.logits(plain_peft(model, tmp_path / "adalora"), model, batch)
    merged = reference.logits(reference.merged_model(run_dir), model, batch)  # by hand, no PEFT
    scale = float(merged.abs().max())
    assert (merged - reference.logits(reference.merged_model(run_dir, adapter=False), model, batch)).abs().max() \
        > 0.1 * scale  # the adapter moves the logits, so agreement means something
    assert (got - want).abs().max() < 1e-4 * scale and (got - merged).abs().max() < 1e-4 * scale
    # one λ fewer per triplet on the air, the rest the same wire format
    assert lora["transmitted_params"] == adalora["transmitted_params"] - sum(ranks.values())
    assert 8 * (adalora["payload_bytes"] - lora["payload_bytes"]) == 32 * sum(ranks.values())
    result = edge_evaluate(tmp_path / "lora", str(model), expected_sha256=lora["sha256"][lora["payload_file"]])
    assert result["max_abs_logit_diff"] < 1e-4 * scale
    assert result["test_accuracy"] == edge_evaluate(tmp_path / "adalora", str(model))["test_accuracy"]


@pytest.mark.parametrize("bits", [16, 8, 4, "mixed"])
def test_lora_export_at_every_codec_is_counted_exactly_and_reaches_the_edge(family_run, tmp_path, bits):
    family = family_run[0]
    if family != "llama" and bits in (4, 16):
        pytest.skip("one family at every codec; the others at int8 and mixed")
    keys = sorted(RunAdapter(family_run[2]).ranks)
    mixed = {key: [32, 16, 8, 4][i % 4] for i, key in enumerate(keys)}
    run_dir, model, ranks = big_triplets(family_run, tmp_path, precisions=mixed if bits == "mixed" else None)
    run = RunAdapter(run_dir)
    precisions = mixed if bits == "mixed" else dict.fromkeys(keys, bits)
    head_bits = 32 if bits == "mixed" else bits
    m = export_adapter(run_dir, None if bits == "mixed" else bits, tmp_path / "lora", adapter_format="lora")
    payload = (tmp_path / "lora" / m["payload_file"]).read_bytes()
    tensor_bytes = len(payload) - 8 - int.from_bytes(payload[:8], "little")
    shapes = {key: (run.tensors[f"{key}.lora_A"].shape[1], run.tensors[f"{key}.lora_B"].shape[0])
              for key, r in ranks.items() if r}
    head = sum((t.shape[0] if t.dim() > 1 else 1) * factor_bits(head_bits, t.shape[-1], 0)  # a row per leading index
               for t in run.head.values())
    assert tensor_bytes * 8 == sum(ranks[k] * factor_bits(precisions[k], *shapes[k]) for k in shapes) + head
    assert tensor_bytes == m["payload_bytes"] + m["scale_bytes"]
    # the edge's logits are the cloud's as delivered in this format; both within the codec's error of fp32
    result = edge_evaluate(tmp_path / "lora", str(model))
    merged = reference.logits(reference.merged_model(run_dir), model, m["reference"]["sentences"])
    scale = float(merged.abs().max())
    assert result["max_abs_logit_diff"] < 1e-4 * scale
    tolerance = {16: 2e-2, 8: 1e-1}.get(bits, 1.0)
    assert (torch.tensor(m["reference"]["logits"]) - merged).abs().max() < tolerance * scale
    edge = attach(tmp_path / "lora", m, load_model(str(model))[0].eval())
    assert edge.peft_config["default"].peft_type.value == "LORA"


def test_a_tampered_or_truncated_lora_delivery_is_refused(family_run, tmp_path, capsys):
    family, model, run_dir = family_run
    if family != "bert":
        pytest.skip("the integrity checks do not depend on the architecture")
    adir = tmp_path / "lora"
    assert main(["export", str(run_dir), "--format", "lora", "--bits", "8", "--out", str(adir)]) == 0
    assert "PEFT LoRA adapter" in capsys.readouterr().out
    payload = adir / "adapter_model.quantised.safetensors"
    intact = payload.read_bytes()
    for damaged in (intact[:-7], intact[:-5] + bytes([intact[-5] ^ 1]) + intact[-4:]):
        payload.write_bytes(damaged)
        assert main(["edge", str(adir), "--base", str(model)]) == 2
        captured = capsys.readouterr()
        assert "checksum mismatch" in captured.err and captured.out == ""
    payload.write_bytes(intact)
    assert main(["edge", str(adir), "--base", str(model)]) == 0
