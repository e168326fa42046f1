"""Independent reference computations for delivery tests: a run's adapter merged into a plain transformers model.

Nothing here goes through airlora's adapters, exporter or edge: the base model is loaded with transformers, each
module's weight gets W + scaling·P·diag(λ)·Q from adapter.safetensors, the head is copied in, and the quantisation
of an export is redone from its definition, in numpy: fp16 a cast; int8/int4 per group of 64 values of each
triplet's Q row and P column (a head tensor: of each row), s = the smallest bfloat16 ≥ max|x|/q_max (q_max 127 or
7), x ≈ round(x/s)·s; λ stays fp32 under an integer codec.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import AutoModelForSequenceClassification, AutoTokenizer


def bf16_at_least(v: np.ndarray) -> np.ndarray:
    """The smallest bfloat16 ≥ v (v ≥ 0, float32): keep the upper 16 bits of the float32, one step up if any lower
    bit was set."""
    bits = v.astype(np.float32).view(np.uint32)
    upper = (bits >> 16) + ((bits & 0xFFFF) != 0)
    return (upper << 16).astype(np.uint32).view(np.float32)


def quantised_rows(x: np.ndarray, bits: int) -> np.ndarray:
    """Rows of ``x`` (n, d) through the integer codec, group by group."""
    q_max = 2 ** (bits - 1) - 1
    out = np.empty_like(x, dtype=np.float32)
    for i, row in enumerate(x.astype(np.float32)):
        for start in range(0, row.size, 64):
            group = row[start:start + 64]
            s = bf16_at_least(np.float32(np.abs(group).max() / np.float32(q_max)))
            out[i, start:start + 64] = 0.0 if s == 0 else np.round(group / s).clip(-q_max, q_max) * s
    return out


def quantised(x: torch.Tensor, bits: int, part: str | None = None) -> torch.Tensor:
    """``x`` as the edge sees it after an export at ``bits``; ``part``: lora_A, lora_B, lora_E, or None (a head
    tensor)."""
    if bits == 32:
        return x
    if bits == 16:
        return x.half().float()
    if part == "lora_E":
        return x
    if part == "lora_B":  # grouped along each column (one triplet's P column)
        return torch.from_numpy(quantised_rows(x.numpy().T, bits).T.copy())
    rows = x.numpy().reshape(-1, x.shape[-1]) if x.dim() > 1 else x.numpy().reshape(1, -1)
    return torch.from_numpy(quantised_rows(rows, bits).reshape(x.shape))


def wire_bits(bits: int, d_in: int, d_out: int) -> int:
    """Bits per unit rank from the wire format, written out: floats cast (λ too); integer codes with a bf16 scale per
    64 values of each Q row and P column (int4 two per byte), λ in fp32."""
    if bits in (32, 16):
        return bits * (d_in + d_out + 1)
    return integer_row_bits(d_in, bits) + integer_row_bits(d_out, bits) + 32


def integer_row_bits(d: int, bits: int) -> int:
    """One row of d integer codes: whole bytes of codes and one bf16 scale per 64 values."""
    return 8 * math.ceil(d * bits / 8) + 16 * math.ceil(d / 64)


def head_tensor_bits(shape: tuple[int, ...], bits: int) -> int:
    """A head tensor at ``bits``: floats cast; integer codes row by row along the last dimension (a bias: one row)."""
    if bits in (32, 16):
        return math.prod(shape) * bits
    return math.prod(shape[:-1]) * integer_row_bits(shape[-1], bits)


def delivered_on_air_bits(run_dir: Path) -> int:
    """What a finished run's delivery puts on the air, counted from its adapter file with the wire format above:
    each module's rank × bits per unit rank at its precision, the head at its bits, and the delivery's header,
    config and manifest (the summary's ``delivery_overhead_bytes``, measured by the run on a real export)."""
    tensors, meta = run_adapter(run_dir)
    ranks, precisions, head_bits = json.loads(meta["ranks"]), json.loads(meta["precisions"]), int(meta["head_bits"])
    modules = sum(rank * wire_bits(precisions[key], tensors[f"{key}.lora_A"].shape[1],
                                   tensors[f"{key}.lora_B"].shape[0]) for key, rank in ranks.items() if rank)
    head = sum(head_tensor_bits(tuple(t.shape), head_bits) for name, t in tensors.items() if name.startswith("head."))
    overhead = json.loads((run_dir / "summary.json").read_text())["delivery_overhead_bytes"]
    return modules + head + 8 * overhead


def assert_delivery_fits(run_dir: Path) -> None:
    """The run's delivery, counted from its files, is the size its summary states and fits T_max at its capacity
    (divided here: neither the run's ``budget_ok`` nor its ``airtime_s`` is trusted)."""
    summary = json.loads((run_dir / "summary.json").read_text())
    bits = delivered_on_air_bits(run_dir)
    assert bits == summary["on_air_bits"]
    assert bits / summary["capacity_bps"] <= summary["t_max_s"] * (1 + 1e-12)


def assert_every_step_fits(rows: list[dict[str, str]], t_max_s: float) -> None:
    """Every step's bits (metrics.csv: ``transmitted_bits``, delivery overhead included) over its capacity fit T_max
    (divided here, not the trainer's ``budget_ok``)."""
    for row in rows:
        assert int(row["transmitted_bits"]) / float(row["capacity_bps"]) <= t_max_s * (1 + 1e-12), row


def run_adapter(run_dir: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The tensors and metadata of a run's adapter.safetensors."""
    with safe_open(str(run_dir / "adapter.safetensors"), "pt") as handle:
        return {key: handle.get_tensor(key) for key in handle.keys()}, handle.metadata()


def tokenizer_of(model_dir: Path):
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    if tokenizer.pad_token is None:  # Llama: pad with eos, as any user of such a model does
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def merged_model(run_dir: Path, bits: int | dict[str, int] = 32, adapter: bool = True,
                 head_bits: int | None = None) -> torch.nn.Module:
    """The base model of ``run_dir`` with its delivered adapter merged into the weights and its head, each module at
    ``bits`` (one for all, or per rank key) and the head at ``head_bits`` (default: ``bits`` if one, else 32)."""
    tensors, meta = run_adapter(run_dir)
    model_dir = Path(meta["model_dir"])
    model = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=2).eval()
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer_of(model_dir).pad_token_id
    scaling, names = float(meta["scaling"]), json.loads(meta["module_names"])
    head_bits = head_bits if head_bits is not None else bits if isinstance(bits, int) else 32
    with torch.no_grad():
        for key, rank in json.loads(meta["ranks"]).items():
            if rank and adapter:
                b = bits if isinstance(bits, int) else bits[key]
                q, p, lam = (quantised(tensors[f"{key}.{part}"], b, part) for part in ("lora_A", "lora_B", "lora_E"))
                model.get_submodule(names[key]).weight += scaling * p @ (lam * q)  # (d_out, r) @ (r, d_in)
        params = dict(model.named_parameters())
        for key, value in tensors.items():
            if key.startswith("head."):
                params[key.removeprefix("head.")].copy_(quantised(value, head_bits))
    return model


def logits(model: torch.nn.Module, model_dir: Path, sentences: list[str], max_length: int = 64) -> torch.Tensor:
    """(B, 2) logits of ``sentences`` padded as one batch."""
    inputs = tokenizer_of(model_dir)(sentences, padding=True, truncation=True, max_length=max_length,
                                     return_tensors="pt")
    with torch.inference_mode():
        return model(**inputs).logits.float()


def with_ranks(run_dir: Path, ranks: dict[str, int], seed: int = 0, precisions: dict[str, int] | None = None,
               head_bits: int = 32) -> None:
    """Rewrite a run's adapter: the given ranks (and precisions the run chose), large random triplets and head, so the
    adapter moves the logits."""
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
    extra = {} if precisions is None else {"precisions": json.dumps(precisions), "head_bits": str(head_bits)}
    save_file(new, str(run_dir / "adapter.safetensors"), metadata=dict(meta, ranks=json.dumps(ranks), **extra))
    summary = json.loads((run_dir / "summary.json").read_text())
    summary["transmitted_params"] = sum(t.numel() for t in new.values())
    (run_dir / "summary.json").write_text(json.dumps(summary))
