"""Independent reference computations for delivery tests: a run's adapter merged into a plain transformers model.

Nothing here goes through airlora's adapters, exporter or edge: the base model is loaded with transformers, each
module's weight gets W + scaling·P·diag(λ)·Q from adapter.safetensors, the head is copied in, and the quantisation
of an export is redone from its definition (int8: s = max|x|/127, x ≈ round(x/s)·s; fp16: a cast).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import AutoModelForSequenceClassification, AutoTokenizer


def quantised(x: torch.Tensor, bits: int) -> torch.Tensor:
    """``x`` as the edge sees it after an export at ``bits``."""
    if bits == 32:
        return x
    if bits == 16:
        return x.half().float()
    scale = torch.tensor(float(x.abs().max()) / 127.0, dtype=torch.float32)  # the scale as stored, in fp32
    return x if scale == 0 else torch.clamp(torch.round(x / scale), -127, 127) * scale


def run_adapter(run_dir: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The tensors and metadata of a run's adapter.safetensors."""
    with safe_open(str(run_dir / "adapter.safetensors"), "pt") as handle:
        return {key: handle.get_tensor(key) for key in handle.keys()}, handle.metadata()


def tokenizer_of(model_dir: Path):
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    if tokenizer.pad_token is None:  # Llama: pad with eos, as any user of such a model does
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def merged_model(run_dir: Path, bits: int = 32, adapter: bool = True) -> torch.nn.Module:
    """The base model of ``run_dir`` with its delivered adapter merged into the weights and its head (at ``bits``)."""
    tensors, meta = run_adapter(run_dir)
    model_dir = Path(meta["model_dir"])
    model = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=2).eval()
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer_of(model_dir).pad_token_id
    scaling, names = float(meta["scaling"]), json.loads(meta["module_names"])
    with torch.no_grad():
        for key, rank in json.loads(meta["ranks"]).items():
            if rank and adapter:
                q, p, lam = (quantised(tensors[f"{key}.{part}"], bits) for part in ("lora_A", "lora_B", "lora_E"))
                model.get_submodule(names[key]).weight += scaling * p @ (lam * q)  # (d_out, r) @ (r, d_in)
        params = dict(model.named_parameters())
        for key, value in tensors.items():
            if key.startswith("head."):
                params[key.removeprefix("head.")].copy_(quantised(value, bits))
    return model


def logits(model: torch.nn.Module, model_dir: Path, sentences: list[str], max_length: int = 64) -> torch.Tensor:
    """(B, 2) logits of ``sentences`` padded as one batch."""
    inputs = tokenizer_of(model_dir)(sentences, padding=True, truncation=True, max_length=max_length,
                                     return_tensors="pt")
    with torch.inference_mode():
        return model(**inputs).logits.float()


def with_ranks(run_dir: Path, ranks: dict[str, int], seed: int = 0) -> None:
    """Rewrite a run's adapter: the given ranks, large random triplets and head, so the adapter moves the logits."""
    tensors, meta = run_adapter(run_dir)
    names = json.loads(meta["module_names"])
    base = AutoModelForSequenceClassification.from_pretrained(meta["model_dir"], num_labels=2)
    g = torch.Generator().manual_seed(seed)
    new = {k: torch.randn(v.shape, generator=g) for k, v in tensors.items() if k.startswith("head.")}
    for key, rank in ranks.items():
        if rank:
            d_out, d_in = base.get_submodule(names[key]).weight.shape
            new[f"{key}.lora_A"] = torch.randn(rank, d_in, generator=g) / d_in ** 0.5
            new[f"{key}.lora_B"] = torch.randn(d_out, rank, generator=g) / rank ** 0.5
            new[f"{key}.lora_E"] = 2 * torch.randn(rank, 1, generator=g)
    save_file(new, str(run_dir / "adapter.safetensors"), metadata=dict(meta, ranks=json.dumps(ranks)))
    summary = json.loads((run_dir / "summary.json").read_text())
    summary["transmitted_params"] = sum(t.numel() for t in new.values())
    (run_dir / "summary.json").write_text(json.dumps(summary))
