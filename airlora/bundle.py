"""A delivery's files, the bytes the edge receives over the air, and the bound the budget reserves for its overhead.

What is sent: the payload file's tensors (the active triplets and the task head, each module at its codec, with
scales) as they are, and its safetensors header, ``adapter_config.json`` and ``delivery.json`` (the manifest: ranks,
precisions, checksums, and the number of classes where it is not two) as one zlib stream (level 9). On-air bytes =
tensor bytes + that stream's length. The sender's record (``delivery_record.json``: accounting, the channel, the
cloud model's logits and accuracy for the edge's checks) stays with the sender and is not counted: a device in the
field needs none of it.

The budget cannot measure a delivery before it exists, so it reserves ``overhead_bound_bytes``: the compressed
overhead of template deliveries for the model (every module at r_max at each allowed codec, and seeded random mixes
of ranks and codecs), plus a margin. The export measures the real one and refuses a delivery above the reserve;
the tests check that random deliveries stay within it.

Payload tensors: ``base_model.model.{module}.lora_A`` (Q_a, r × d_in), ``.lora_B`` (P_a, d_out × r), ``.lora_E``
(λ_a, r × 1) and ``base_model.model.{head parameter}``. Float codecs store them as PEFT does (so PEFT loads a
float-only payload, ``adapter_model.safetensors``, as is). Integer codecs store codes and ``{key}.scale`` row by row
along the last dimension, with lora_B triplet-major (its transpose, r × d_out: row j is P's column j), so every row
is one triplet's; such a payload is ``adapter_model.quantised.safetensors``, which PEFT never picks up by mistake.
Its metadata ``airlora_codecs`` names each tensor's codec and original shape: {key: [bits, *shape]}. (safetensors
keeps metadata in a Rust HashMap, so its two entries can come out in either order: the same delivery's header, and
so its SHA-256, may differ between two exports, by order only.)
"""

from __future__ import annotations

import json
import math
import struct
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import torch

from airlora.codecs import CODECS, codec, decode, encode, lambda_codec

PEFT_PREFIX = "base_model.model."
"""Prefix of every tensor key in a PEFT adapter file."""
PEFT_PARTS = ("lora_A", "lora_B", "lora_E")
"""Tensor names of one adapted module in PEFT's AdaLoRA: Q_a, P_a and λ_a."""
LORA_ALPHA = 1.0
"""lora_alpha of a plain LoRA delivery: module m is scaled by LORA_ALPHA / r_m, its rank (``lora_adapter_config``)."""
LORA_SUFFIX = ".weight"
"""PEFT's plain LoRA keeps lora_A and lora_B as linear layers: its keys end ``.lora_A.weight``, ``.lora_B.weight``."""
PEFT_PAYLOAD = "adapter_model.safetensors"
QUANTISED_PAYLOAD = "adapter_model.quantised.safetensors"
CONFIG_FILE = "adapter_config.json"
MANIFEST_FILE = "delivery.json"
RECORD_FILE = "delivery_record.json"
MANIFEST_FORMAT = "airlora-delivery/2"
CODECS_METADATA = "airlora_codecs"
OVERHEAD_MARGIN = (1.10, 256)
"""The reserve is ceil(1.10 × the largest template overhead) + 256 bytes."""
TEMPLATE_MIXES = 8
"""Seeded random (rank, codec) mixes among the templates, besides every module at r_max at each codec."""
_ITEMSIZE = {"F32": 4, "BF16": 2, "F16": 2, "I8": 1, "U8": 1}
_DTYPE_ORDER = {"U8": 0, "I8": 1, "F16": 2, "BF16": 3, "F32": 4}
"""safetensors writes tensors by dtype (this order, descending), then by name."""


def factor_part(key: str) -> tuple[str, str | None]:
    """(module, part) of a payload key: part 'lora_A', 'lora_B' or 'lora_E' for an adapter factor, in the AdaLoRA
    (``{module}.lora_A``) or the plain LoRA (``{module}.lora_A.weight``) form; None for a head parameter."""
    for name in (key.removesuffix(LORA_SUFFIX), key):
        owner, _, part = name.rpartition(".")
        if part in PEFT_PARTS and (name == key or part != "lora_E"):
            return owner, part
    return key, None


def _layout(bits: int, shape: tuple[int, ...], part: str | None) -> tuple[tuple[int, ...], int]:
    """(shape the codec rows are taken from, codec bits) of one tensor: lora_B goes triplet-major, λ by its codec."""
    c = codec(bits)
    if part == "lora_E":
        return shape, lambda_codec(c).bits
    if part == "lora_B" and c.integer:
        return (shape[1], shape[0]), bits
    return shape, bits


def encode_tensor(key: str, value: torch.Tensor, bits: int) -> tuple[dict[str, torch.Tensor], list[int]]:
    """The payload tensors carrying ``value`` under ``key`` at ``bits`` and its ``airlora_codecs`` entry."""
    part = factor_part(key)[1]
    rows_shape, used = _layout(bits, tuple(value.shape), part)
    rows = value.T if rows_shape != tuple(value.shape) else value
    return ({f"{key}{suffix}": t for suffix, t in encode(CODECS[used], rows.contiguous()).items()},
            [bits, *value.shape])


def decode_tensors(tensors: dict[str, torch.Tensor], codecs: dict[str, list[int]]) -> dict[str, torch.Tensor]:
    """The fp32 PEFT tensors of a payload (the edge's dequantisation), under their PEFT keys and shapes."""
    out = {}
    for key, (bits, *shape) in codecs.items():
        part = factor_part(key)[1]
        rows_shape, used = _layout(bits, tuple(shape), part)
        parts = {suffix: tensors[f"{key}{suffix}"] for suffix in ("", ".scale") if f"{key}{suffix}" in tensors}
        value = decode(CODECS[used], parts, rows_shape)
        out[key] = (value.T if rows_shape != tuple(shape) else value).contiguous()
    return out


def stored_specs(key: str, shape: tuple[int, ...], bits: int) -> list[tuple[str, str, tuple[int, ...]]]:
    """(tensor key, safetensors dtype, stored shape) of what ``encode_tensor`` writes, without any data (templates)."""
    part = factor_part(key)[1]
    rows_shape, used = _layout(bits, shape, part)
    c = CODECS[used]
    if not c.integer:
        return [(key, "F32" if used == 32 else "F16", shape)]
    n, d = (math.prod(rows_shape[:-1]), rows_shape[-1]) if len(rows_shape) > 1 else (1, math.prod(rows_shape))
    codes = (n, math.ceil(d / 2)) if used == 4 else (n, d)
    return [(key, "U8" if used == 4 else "I8", codes), (f"{key}.scale", "BF16", (n, math.ceil(d / 64)))]


def render_header(specs: list[tuple[str, str, tuple[int, ...]]], metadata: dict[str, str]) -> bytes:
    """The first bytes of a safetensors file holding tensors of these specs: 8-byte length, JSON header, padding."""
    ordered = sorted(specs, key=lambda s: (-_DTYPE_ORDER[s[1]], s[0].encode()))
    header: dict[str, Any] = {"__metadata__": metadata}
    offset = 0
    for key, dtype, shape in ordered:
        size = math.prod(shape) * _ITEMSIZE[dtype]
        header[key] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text


def payload_metadata(codecs: dict[str, list[int]]) -> dict[str, str]:
    """The payload file's safetensors metadata."""
    return {"format": "pt", CODECS_METADATA: json.dumps(codecs, separators=(",", ":"))}


def payload_file(codecs: dict[str, list[int]]) -> str:
    """PEFT's own file name when every tensor is a float, else the quantised one."""
    return PEFT_PAYLOAD if all(not CODECS[bits].integer for bits, *_ in codecs.values()) else QUANTISED_PAYLOAD


def adapter_config(module_ranks: dict[str, int], r_max: int, scaling: float, model_dir: str,
                   head_names: list[str], total_step: int, task_type: str = "SEQ_CLS") -> dict[str, Any]:
    """PEFT's AdaLoraConfig as JSON, with only the fields that differ from PEFT's defaults (PEFT fills the rest).

    Written here rather than by ``AdaLoraConfig.save_pretrained`` so the budget knows its bytes before training
    without importing PEFT (seconds), and so no default travels on the air. ``module_ranks``: PEFT module name ->
    rank; rank-0 modules are left out of target_modules, so PEFT does not wrap them. See ``airlora.export`` for why
    the mask and lora_alpha are what they are.
    """
    targeted = {name: rank for name, rank in module_ranks.items() if rank}
    return {
        "peft_type": "ADALORA",
        "task_type": task_type,
        "base_model_name_or_path": model_dir,
        "init_r": r_max,
        "target_r": max(1, round(float(np.mean(list(module_ranks.values()))))) if module_ranks else 1,
        "lora_alpha": scaling * float(np.float32(r_max) + np.float32(1e-5)),
        "lora_dropout": 0.0,
        "target_modules": sorted(targeted),
        "rank_pattern": {f"{name}.lora_E": [i < rank for i in range(r_max)] for name, rank in sorted(targeted.items())},
        "modules_to_save": sorted({name.rpartition(".")[0] for name in head_names}),
        "total_step": max(1, int(total_step)),
        "inference_mode": True,
    }


def lora_adapter_config(module_ranks: dict[str, int], model_dir: str, head_names: list[str],
                        task_type: str = "SEQ_CLS") -> dict[str, Any]:
    """PEFT's LoraConfig as JSON for factors with λ and the scaling folded in (``airlora.formats``), only the fields
    that differ from PEFT's defaults.

    Each targeted module's rank r_m is in ``rank_pattern``; one ``lora_alpha`` = ``LORA_ALPHA`` for all, so a tool
    scales module m by lora_alpha / r_m, PEFT and llama.cpp alike (its converter reads one lora_alpha and divides by
    each tensor's rank; it ignores an ``alpha_pattern``, which is why none is sent). The factors carry r_m / lora_alpha
    to match (``formats.lora_tensors``), so ΔW is the run's whatever the tool.
    """
    targeted = {name: rank for name, rank in sorted(module_ranks.items()) if rank}
    return {
        "peft_type": "LORA",
        "task_type": task_type,
        "base_model_name_or_path": model_dir,
        "r": max(targeted.values(), default=1),
        "lora_alpha": LORA_ALPHA,
        "lora_dropout": 0.0,
        "target_modules": sorted(targeted),
        "rank_pattern": targeted,
        "modules_to_save": sorted({name.rpartition(".")[0] for name in head_names}),
        "inference_mode": True,
    }


def json_bytes(data: dict[str, Any]) -> bytes:
    """How the delivery's JSON files are written (and so what is compressed onto the air)."""
    return (json.dumps(data, indent=1) + "\n").encode()


def manifest(payload: str, sha256: dict[str, str], ranks: dict[str, int], precisions: dict[str, int],
             head_bits: int, model_dir: str, num_labels: int = 2, adapter_format: str = "adalora") -> dict[str, Any]:
    """delivery.json: what the device needs besides the payload and its config (sent, so counted).

    ``num_labels``: the classes the head outputs, which the device builds the base model's head with; sent only where
    it is not 2, so a binary delivery keeps its bytes on the air. ``adapter_format``: 'adalora', 'lora' or 'gguf'
    (``airlora.formats``).
    """
    sent = {"format": MANIFEST_FORMAT, "adapter_format": adapter_format, "payload_file": payload, "sha256": sha256,
            "ranks": ranks, "precisions": precisions, "head_bits": head_bits, "model_dir": model_dir}
    return sent if num_labels == 2 else sent | {"num_labels": num_labels}


def overhead_on_air_bytes(header: bytes, config: bytes, manifest_bytes: bytes) -> int:
    """Bytes of the header, config and manifest as they are sent: one zlib stream at level 9."""
    return len(zlib.compress(header + config + manifest_bytes, 9))


def header_bytes_of(path: Path) -> bytes:
    """The first bytes of a safetensors file: the 8-byte length and the JSON header (with its padding)."""
    with open(path, "rb") as handle:
        length = handle.read(8)
        return length + handle.read(struct.unpack("<Q", length)[0])


def template_overhead_bytes(module_names: dict[str, str], shapes: dict[str, tuple[int, int]],
                            head_shapes: dict[str, tuple[int, ...]], ranks: dict[str, int],
                            precisions: dict[str, int], head_bits: int, r_max: int, scaling: float, model_dir: str,
                            total_step: int, rng: np.random.Generator, num_labels: int = 2) -> int:
    """The on-air overhead of a delivery with these ranks and precisions, built from shapes alone (no tensors)."""
    specs, codecs = [], {}
    for key, rank in ranks.items():
        if rank:
            d_in, d_out = shapes[key]
            for part, shape in (("lora_A", (rank, d_in)), ("lora_B", (d_out, rank)), ("lora_E", (rank, 1))):
                name = f"{PEFT_PREFIX}{module_names[key]}.{part}"
                specs += stored_specs(name, shape, precisions[key])
                codecs[name] = [precisions[key], *shape]
    for name, shape in head_shapes.items():
        specs += stored_specs(f"{PEFT_PREFIX}{name}", shape, head_bits)
        codecs[f"{PEFT_PREFIX}{name}"] = [head_bits, *shape]
    header = render_header(specs, payload_metadata(codecs))
    config = json_bytes(adapter_config({module_names[k]: r for k, r in ranks.items()}, r_max, scaling, model_dir,
                                       list(head_shapes), total_step))
    fake = {payload_file(codecs): rng.bytes(32).hex(), CONFIG_FILE: rng.bytes(32).hex()}
    sent = json_bytes(manifest(payload_file(codecs), fake, ranks, precisions, head_bits, model_dir, num_labels))
    return overhead_on_air_bytes(header, config, sent)


def overhead_bound_bytes(module_names: dict[str, str], shapes: dict[str, tuple[int, int]],
                         head_shapes: dict[str, tuple[int, ...]], allowed_bits: tuple[int, ...], r_max: int,
                         scaling: float, model_dir: str, total_step: int, num_labels: int = 2) -> int:
    """The bytes the budget reserves for a delivery's header, config and manifest (see the module docstring);
    ``head_shapes`` and ``num_labels`` are the head's for the task's number of classes."""
    rng = np.random.default_rng(0)
    keys = list(module_names)
    head_bits = max(allowed_bits)
    cases = [(dict.fromkeys(keys, r_max), dict.fromkeys(keys, b)) for b in allowed_bits]
    for _ in range(TEMPLATE_MIXES):
        cases.append((dict(zip(keys, map(int, rng.integers(1, r_max + 1, len(keys))), strict=True)),
                      dict(zip(keys, map(int, rng.choice(allowed_bits, len(keys))), strict=True))))
    worst = max(template_overhead_bytes(module_names, shapes, head_shapes, ranks, precisions, head_bits, r_max,
                                        scaling, model_dir, total_step, rng, num_labels) for ranks, precisions in cases)
    factor, extra = OVERHEAD_MARGIN
    return math.ceil(factor * worst) + extra
