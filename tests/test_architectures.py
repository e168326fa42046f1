"""Every supported architecture end to end: tiny BERT, OPT and Llama through run → export (32/16/8/4 bits and a
mixed delivery) → edge.

The references are independent of airlora's adapters and exporter (tests/reference.py): the delivered adapter
merged by hand into a plain transformers model (quantised by hand), each sentence run alone (no padding, so OPT's and
Llama's last-token pooling cannot pick a pad), and the 32/16-bit exports loaded with nothing but
``PeftModel.from_pretrained``.
"""

import json
import shutil

import pytest
import torch
from transformers import AutoModelForSequenceClassification

from airlora.config import load_config, merge
from airlora.data import load_splits
from airlora.edge import edge_evaluate
from airlora.export import export_adapter
from airlora.exported_run import RunAdapter
from airlora.models import resolve_modules
from tests import reference
from tests.tiny_models import save_tiny

pytestmark = pytest.mark.integration  # end-to-end on the tiny model: see pyproject.toml

FAMILIES = ("bert", "opt", "llama")
TOLERANCE = {32: 1e-4, 16: 2e-2, 8: 1e-1, 4: 1.0, "mixed": 1.0}
"""Largest |delivered − fp32 cloud| logit difference allowed, relative to the largest cloud logit (the codec's own
error). At int4 the large random triplets of these tests, and an int4 head, move the logits as much as the adapter
itself: there only edge = cloud as delivered is checked."""


@pytest.fixture(scope="module", params=FAMILIES)
def family_run(request, tmp_path_factory, tiny_files):
    """(family, model folder, run folder): a `random` run with heterogeneous ranks on a generous link."""
    from airlora.runner import run

    family = request.param
    root = tmp_path_factory.mktemp(family)
    model = save_tiny(family, root / "model")
    _, data, config_file = tiny_files
    config = merge(load_config(config_file), {
        "model": str(model), "data.source": str(data), "allocator": "random", "adapter.r_max": 4,
        "train.steps": 10, "train.eval_every": 5, "train.lr": 5e-2, "channel.bandwidth_hz": 1e6,
        "channel.snr_db": [20.0]})
    threads = torch.get_num_threads()
    run(config, root / "run")
    torch.set_num_threads(threads)
    return family, model, root / "run"


def test_the_family_is_recognised_with_its_head(family_run):
    family, model, run_dir = family_run
    config = json.loads((run_dir / "config.json").read_text())
    assert config["resolved"]["architecture_family"] == family
    net = AutoModelForSequenceClassification.from_pretrained(model)
    assert resolve_modules(net).family == family
    head = {k.removeprefix("head.") for k in RunAdapter(run_dir).tensors if k.startswith("head.")}
    assert head == ({"classifier.weight", "classifier.bias"} if family == "bert" else {"score.weight"})


@pytest.mark.filterwarnings("ignore:The following rank_pattern keys did not match",  # AdaLoRA's masks, see edge.py
                            "ignore:.*is_gradient_checkpointing.*is deprecated")
def test_run_export_edge_at_every_precision(family_run, tmp_path, capsys):
    family, model, run_dir = family_run
    summary = json.loads((run_dir / "summary.json").read_text())
    assert len(set(summary["ranks"].values())) >= 3
    test = load_splits(RunAdapter(run_dir).config.data, seed=42).test
    cloud = reference.merged_model(run_dir)
    alone = torch.cat([reference.logits(cloud, model, [s]) for s in test.sentences])
    correct = int((alone.argmax(-1) == torch.as_tensor(test.labels)).sum())
    assert correct / len(test) == summary["test_accuracy"]  # airlora's padded evaluation pooled the right token
    # a few steps move a tiny model's logits little; large triplets make the comparison mean something
    shutil.copytree(run_dir, tmp_path / "run")
    run_dir = tmp_path / "run"
    keys = sorted(summary["ranks"])
    mixed = {key: [32, 16, 8, 4][i % 4] for i, key in enumerate(keys)}
    reference.with_ranks(run_dir, {key: [0, 4, 1, 2, 3, 4][i % 6] for i, key in enumerate(keys)}, precisions=mixed)
    batch = test.sentences[:32]
    want = {bits: reference.logits(reference.merged_model(run_dir, bits), model, batch) for bits in (32, 16, 8, 4)}
    want["mixed"] = reference.logits(reference.merged_model(run_dir, mixed, head_bits=32), model, batch)
    plain = reference.logits(reference.merged_model(run_dir, adapter=False), model, batch)
    assert (want[32] - plain).abs().max() > 0.1 * want[32].abs().max()  # the adapter moves the logits
    merged = reference.merged_model(run_dir)
    alone = torch.cat([reference.logits(merged, model, [s]) for s in batch])
    assert torch.allclose(want[32], alone, atol=1e-5)  # padding in a batch changes nothing (the pooled token is real)

    scale = float(want[32].abs().max())
    for bits in (32, 16, 8, 4, "mixed"):
        adir = tmp_path / f"a{bits}"
        manifest = export_adapter(run_dir, None if bits == "mixed" else bits, adir)
        result = edge_evaluate(adir, str(model), expected_sha256=manifest["sha256"][manifest["payload_file"]])
        # the edge's logits are the cloud's as delivered (after the same codecs, quantised by hand here) ...
        assert result["max_abs_logit_diff"] < 1e-4 * scale
        assert torch.allclose(torch.tensor(manifest["reference"]["logits"]), want[bits], atol=1e-4 * scale)
        # ... which differ from the fp32 cloud's by the codec's own error only
        assert float((want[bits] - want[32]).abs().max()) < TOLERANCE[bits] * scale
        if bits in (32, 16):  # plain PEFT loads 32- and 16-bit deliveries as they are
            from peft import PeftModel

            base = AutoModelForSequenceClassification.from_pretrained(model)
            base.config.pad_token_id = reference.tokenizer_of(model).pad_token_id
            edge = PeftModel.from_pretrained(base, str(adir)).eval()
            got = reference.logits(edge, model, batch)
            assert (got - want[bits]).abs().max() < 1e-4 * scale
        with capsys.disabled():
            print(f"\n{family} {bits}: max |edge - cloud as delivered| logit {result['max_abs_logit_diff']:.3g}, "
                  f"|delivered - fp32| {float((want[bits] - want[32]).abs().max()):.3g} (largest logit {scale:.3g})",
                  end="")
