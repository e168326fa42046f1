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
