"""A decoder fine-tuned as a causal LM on label words (data.label_words): a tiny Llama runs, exports in every format
(AdaLoRA, plain LoRA, GGUF) and reaches the edge with the cloud's accuracy; the scorer's logits are the plain causal
LM's next-token logits; the GGUF's tensors, read back with the gguf package, are the delivered factors."""

import json
import shutil

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from airlora.cli import main
from airlora.config import DataConfig, load_config, merge
from airlora.edge import edge_evaluate
from airlora.errors import AirloraError
from airlora.export import export_adapter
from airlora.exported_run import RunAdapter
from airlora.formats import lora_tensors
from tests import reference
from tests.tiny_models import save_tiny

gguf = pytest.importorskip("gguf")
pytestmark = pytest.mark.filterwarnings("ignore:The following rank_pattern keys did not match",
                                        "ignore:.*is_gradient_checkpointing.*is deprecated")
PROMPT, WORDS = "{sentence} - the film is", [" bad", " good"]


@pytest.fixture(scope="module")
def lm_run(tmp_path_factory, tiny_files):
    """(model folder, run folder): a tiny Llama causal LM fine-tuned on label words with heterogeneous ranks."""
    from airlora.runner import run

    root = tmp_path_factory.mktemp("lm")
    model = save_tiny("llama", root / "model", causal_lm=True)
    _, data, config_file = tiny_files
    config = merge(load_config(config_file), {
        "model": str(model), "data.source": str(data), "data.label_words": WORDS, "data.prompt": PROMPT,
        "allocator": "random", "adapter.r_max": 4, "train.steps": 10, "train.eval_every": 5, "train.lr": 5e-2,
        "channel.bandwidth_hz": 1e6, "channel.snr_db": [20.0]})
    threads = torch.get_num_threads()
    run(config, root / "run")
    torch.set_num_threads(threads)
    return model, root / "run"


def causal_lm_logits(model_dir, run_dir, sentences):
    """(B, 2) next-token logits of the label words' first tokens, each prompt alone, from a plain
    AutoModelForCausalLM with the run's adapter merged in by hand (no airlora scorer, no PEFT)."""
    tensors, meta = reference.run_adapter(run_dir)
    net = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    scaling, names = float(meta["scaling"]), json.loads(meta["module_names"])
    with torch.no_grad():
        for key, rank in json.loads(meta["ranks"]).items():
            if rank:
                q, p, lam = (tensors[f"{key}.{part}"] for part in ("lora_A", "lora_B", "lora_E"))
                net.get_submodule(names[key]).weight += scaling * p @ (lam * q)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    ids = tokenizer.convert_tokens_to_ids(["▁bad", "▁good"])  # the tiny SentencePiece vocabulary has both words
    assert tokenizer.unk_token_id not in ids
    rows = []
    with torch.inference_mode():
        for sentence in sentences:
            inputs = tokenizer(PROMPT.format(sentence=sentence), return_tensors="pt")
            rows.append(net(**inputs).logits[0, -1, ids])
    return torch.stack(rows)


def test_the_lm_run_has_no_head_and_scores_the_causal_lms_own_logits(lm_run, tmp_path):
    model, run_dir = lm_run
    summary = json.loads((run_dir / "summary.json").read_text())
    run = RunAdapter(run_dir)
    assert summary["head_params"] == 0 and run.head == {}  # nothing but the adapter travels
    assert len(set(summary["ranks"].values())) >= 3
    shutil.copytree(run_dir, tmp_path / "run")  # large triplets, so the adapter moves the logits
    keys = sorted(run.ranks)
    reference.with_ranks(tmp_path / "run", {key: [0, 4, 1, 2, 3, 4][i % 6] for i, key in enumerate(keys)})
    m = export_adapter(tmp_path / "run", 32, tmp_path / "a")
    sentences = [s.removesuffix(PROMPT.format(sentence="")) for s in m["reference"]["sentences"]]
    assert all(PROMPT.format(sentence=s) == t for s, t in zip(sentences, m["reference"]["sentences"], strict=True))
    want = causal_lm_logits(model, tmp_path / "run", sentences)
    plain = causal_lm_logits(model, run_dir, sentences)
    got = torch.tensor(m["reference"]["logits"])
    scale = float(want.abs().max())
    assert (want - plain).abs().max() > 0.05 * scale  # the big triplets matter
    assert (got - want).abs().max() < 1e-4 * scale  # padded batch of the scorer = each prompt alone, full logits


def test_every_format_reaches_the_edge_with_the_clouds_accuracy(lm_run, tmp_path, capsys):
    model, run_dir = lm_run
    summary = json.loads((run_dir / "summary.json").read_text())
    for adapter_format in ("adalora", "lora", "gguf"):
        adir = tmp_path / adapter_format
        assert main(["export", str(run_dir), "--format", adapter_format, "--out", str(adir)]) == 0
        m = json.loads((adir / "delivery.json").read_text())
        assert m["adapter_format"] == adapter_format
        if adapter_format != "gguf":
            assert json.loads((adir / "adapter_config.json").read_text())["task_type"] == "CAUSAL_LM"
        result = edge_evaluate(adir, str(model))
        scale = float(np.abs(json.loads((adir / "delivery_record.json").read_text())["reference"]["logits"]).max())
        assert result["max_abs_logit_diff"] < 1e-4 * max(scale, 1.0)
        assert result["test_accuracy"] == summary["test_accuracy"]
    capsys.readouterr()


def gguf_permuted(b: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's Llama q/k row order, written out: within each head, rows [0, 2, 4, …, 1, 3, 5, …] of the HF
    layout's halves interleaved: new row (h, j, s) = old row (h, s, j)."""
    d = b.shape[0] // n_head
    out = np.empty_like(b)
    for h in range(n_head):
        for j in range(d // 2):
            for s in range(2):
                out[h * d + 2 * j + s] = b[h * d + s * (d // 2) + j]
    return out


@pytest.mark.parametrize("bits", [32, 8])
def test_the_gguf_holds_the_delivered_factors_counted_exactly(lm_run, tmp_path, bits):
    model, run_dir = lm_run
    shutil.copytree(run_dir, tmp_path / "run")
    keys = sorted(RunAdapter(run_dir).ranks)
    ranks = {key: [0, 4, 1, 2, 3, 4][i % 6] for i, key in enumerate(keys)}
    reference.with_ranks(tmp_path / "run", ranks)
    run = RunAdapter(tmp_path / "run")
    m = export_adapter(tmp_path / "run", bits, tmp_path / "g", adapter_format="gguf")
    path = tmp_path / "g" / "adapter.gguf"
    reader = gguf.GGUFReader(str(path))
    field = lambda k: reader.fields[k].contents()  # noqa: E731
    assert (field("general.type"), field("general.architecture"), field("adapter.type")) == ("adapter", "llama", "lora")
    alpha = field("adapter.lora.alpha")
    folded = lora_tensors(run)
    config = json.loads((model / "config.json").read_text())
    heads = {"q": config["num_attention_heads"], "k": config["num_key_value_heads"]}
    suffix = {"q": "attn_q", "k": "attn_k", "v": "attn_v", "o": "attn_output", "fc1": "ffn_up", "fc2": "ffn_down"}
    by_name = {t.name: t for t in reader.tensors}
    assert len(by_name) == 2 * sum(1 for r in ranks.values() if r)
    tensor_bytes = 0
    adapter = json.loads((tmp_path / "run" / "config.json").read_text())["adapter"]
    scaling = adapter["alpha"] / adapter["r_max"]
    for key, rank in ranks.items():
        if not rank:
            continue
        layer, module = key.split(".")[1], key.split(".")[2]
        factors = {}
        for part, ggml in (("lora_A", "lora_a"), ("lora_B", "lora_b")):
            want = folded[f"base_model.model.{run.module_names[key]}.{part}.weight"].numpy()
            if part == "lora_B" and module in heads:
                want = gguf_permuted(want, heads[module])
            t = by_name[f"blk.{layer}.{suffix[module]}.weight.{ggml}"]
            got = factors[part] = gguf.quants.dequantize(t.data, t.tensor_type).reshape(want.shape)
            assert tuple(reversed([int(n) for n in t.shape])) == want.shape  # ggml ne is numpy's shape reversed
            if bits == 32:
                assert t.tensor_type.name == "F32" and np.array_equal(got, want)
                tensor_bytes += 4 * want.size
            elif want.shape[-1] % 32 == 0:
                assert t.tensor_type.name == "Q8_0"
                # half a step, plus the fp16 rounding of the block's scale
                assert np.abs(got - want).max() <= np.abs(want).max() / 127 * 0.6 + 1e-6
                tensor_bytes += want.size // 32 * 34
            else:  # rows not whole 32-value blocks: F16, as llama.cpp's converter falls back
                assert t.tensor_type.name == "F16" and np.allclose(got, want, rtol=1e-3, atol=1e-6)
                tensor_bytes += 2 * want.size
        if bits == 32:  # what llama.cpp computes, (alpha / r)·lora_b·lora_a, is the run's scaling·P·diag(λ)·Q
            q, p, lam = (run.tensors[f"{key}.{part}"].numpy() for part in ("lora_A", "lora_B", "lora_E"))
            delta = scaling * p @ (lam * q)
            delta = gguf_permuted(delta, heads[module]) if module in heads else delta
            assert np.allclose(alpha / rank * factors["lora_B"] @ factors["lora_A"], delta, rtol=1e-5, atol=1e-6)
    assert m["payload_bytes"] + m["scale_bytes"] == tensor_bytes
    assert m["on_air_bits"] == 8 * (tensor_bytes + m["overhead_bytes"])
    assert m["file_bytes"] == path.stat().st_size and m["sha256"]["adapter.gguf"] == __import__("hashlib").sha256(
        path.read_bytes()).hexdigest()
    assert m["transmitted_params"] == sum(t.numel() for t in folded.values())


def test_a_tampered_gguf_and_what_gguf_cannot_carry_are_refused(lm_run, tmp_path, capsys):
    model, run_dir = lm_run
    with pytest.raises(AirloraError, match="8, 16 or 32"):
        export_adapter(run_dir, 4, tmp_path / "g4", adapter_format="gguf")
    assert not (tmp_path / "g4").exists()
    from airlora.gguf_adapter import check_gguf_delivery

    with pytest.raises(AirloraError, match="no task head"):
        check_gguf_delivery("llama", {"score.weight": torch.zeros(2, 4)}, {}, {})
    with pytest.raises(AirloraError, match="Llama-architecture"):
        check_gguf_delivery("opt", {}, {}, {})
    adir = tmp_path / "g"
    assert main(["export", str(run_dir), "--format", "gguf", "--out", str(adir)]) == 0
    data = bytearray((adir / "adapter.gguf").read_bytes())
    data[-3] ^= 0x01
    (adir / "adapter.gguf").write_bytes(bytes(data))
    capsys.readouterr()
    assert main(["edge", str(adir), "--base", str(model)]) == 2
    assert "checksum mismatch for adapter.gguf" in capsys.readouterr().err


def test_label_words_are_checked(tmp_path):
    from airlora.causal_lm import label_token_ids
    from airlora.config import from_dict

    with pytest.raises(AirloraError, match="data.label_words"):
        from_dict(DataConfig, {"label_words": [" good"]}, "data.")
    with pytest.raises(AirloraError, match="data.prompt"):
        from_dict(DataConfig, {"prompt": "no sentence here"}, "data.")
    model = save_tiny("llama", tmp_path / "m", causal_lm=True)
    tokenizer = AutoTokenizer.from_pretrained(model)
    assert label_token_ids(tokenizer, PROMPT, WORDS) == tokenizer.convert_tokens_to_ids(["▁bad", "▁good"])
    with pytest.raises(AirloraError, match="begin with the same token"):
        label_token_ids(tokenizer, PROMPT, [" good", " good fun"])


@pytest.mark.parametrize("family", ["llama", "opt"])
def test_the_scorer_is_the_causal_lms_next_token_logits_on_a_padded_batch(tmp_path, family):
    """No training: the scorer's (B, 2) logits on a padded batch equal the full (B, L, V) logits of the plain causal
    LM at each prompt's last token, each prompt run alone (OPT's decoder ends in its own final norm)."""
    from airlora.models import load_model

    model = save_tiny(family, tmp_path / family, causal_lm=True)
    scorer, tokenizer, _ = load_model(str(model), label_words=WORDS, prompt=PROMPT)
    prompts = [PROMPT.format(sentence=s) for s in ("the movie was very good", "bad", "a not very fun film was dull")]
    net = AutoModelForCausalLM.from_pretrained(model).eval()
    ids = [tokenizer(PROMPT.format(sentence="a") + w, add_special_tokens=False)["input_ids"][-1] for w in WORDS]
    with torch.inference_mode():
        got = scorer(**tokenizer(prompts, padding=True, return_tensors="pt")).logits
        want = torch.stack([net(**tokenizer(p, return_tensors="pt")).logits[0, -1, ids] for p in prompts])
    assert got.shape == (3, 2) and torch.allclose(got, want, atol=1e-5)
    assert len({tuple(row) for row in want.tolist()}) == 3  # different prompts, different logits
