"""What the edge device does with a delivery: verify it, attach it to a fresh base model with PEFT, evaluate it.

1. Integrity: the SHA-256 of the payload and of adapter_config.json must match the manifest (and ``--sha256``, the
   value the sender printed, when given); otherwise nothing is attached. A checksum catches corruption, not an
   attacker who rewrites the manifest too: that needs the out-of-band ``--sha256``.
2. The base model is loaded fresh from its own folder with a head for the manifest's number of classes (then
   replaced by the delivered head). Every delivered tensor must fit it (same module names and sizes); otherwise it
   was built for another base model.
3. ``peft.PeftModel.from_pretrained`` attaches the adapter. A payload with integer codecs (int8, int4, possibly
   mixed with floats, one codec per module) is dequantised first (``airlora.codecs``: x = q·s) into a temporary
   PEFT folder, since PEFT cannot load integer weights; a float-only payload is loaded as sent (PEFT casts fp16).
4. Test accuracy on the run's test split (or ``--data``), and the largest |logit difference| against the cloud
   model's logits (as delivered, after the same codecs) on a fixed batch. Both come from the sender's record
   (delivery_record.json), the test harness's part of the folder: a device in the field gets neither.
"""

from __future__ import annotations

import json
import tempfile
import warnings
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from airlora import bundle
from airlora.bundle import MANIFEST_FILE, PEFT_PREFIX, RECORD_FILE
from airlora.codecs import common_bits
from airlora.config import DataConfig, from_dict
from airlora.errors import AirloraError
from airlora.export import copy_for_peft
from airlora.exported_run import reference_logits, sha256_file

_MANIFEST_FIELDS: dict[str, type | tuple[type, ...]] = {
    "sha256": dict, "payload_file": str, "ranks": dict, "precisions": dict, "head_bits": int, "model_dir": str,
}
"""Manifest entries the edge reads, and their JSON types."""
_RECORD_FIELDS: dict[str, type | tuple[type, ...]] = {
    "seed": int, "data": dict, "reference": dict, "cloud_test_accuracy": (int, float), "payload_bytes": int,
    "scale_bytes": int, "overhead_bytes": int, "transmitted_params": int, "on_air_bits": int,
}
"""Record entries the edge's evaluation reads."""


def _read_fields(path: Path, fields: dict[str, type | tuple[type, ...]], what: str) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        raise AirloraError(f"{str(path.parent)!r} is not a delivery folder (no readable {path.name}); "
                           "expected the --out folder of `airlora export`") from None
    lacking = [key for key, kind in fields.items() if not isinstance(data, dict) or not isinstance(data.get(key), kind)]
    if lacking:
        raise AirloraError(f"{str(path)!r} lacks a valid {', '.join(lacking)}; the {what} was changed after export, "
                           "so nothing is attached")
    return data


def verify_delivery(adir: str | Path, expected_sha256: str | None = None) -> dict[str, Any]:
    """The manifest of a delivery folder whose payload and config match their SHA-256; a clear error otherwise."""
    adir = Path(adir)
    manifest = _read_fields(adir / MANIFEST_FILE, _MANIFEST_FIELDS, "manifest")
    sums, payload_file = manifest["sha256"], manifest["payload_file"]
    if payload_file not in sums or any(not isinstance(n, str) or Path(n).name != n for n in sums):
        raise AirloraError(f"{str(adir / MANIFEST_FILE)!r}: sha256 must list the payload file {payload_file!r} and "
                           "only plain file names in the delivery folder; nothing attached")
    if expected_sha256 is not None and expected_sha256.lower() != sums.get(payload_file):
        raise AirloraError(f"--sha256 {expected_sha256} does not match the manifest's {sums.get(payload_file)} for "
                           f"{payload_file}; this is not the payload the sender announced")
    for name, expected in sums.items():
        path = adir / name
        if not path.is_file():
            raise AirloraError(f"delivery {str(adir)!r} lacks {name}; nothing attached")
        actual = sha256_file(path)
        if actual != expected:
            raise AirloraError(f"checksum mismatch for {name}: SHA-256 {actual}, the manifest says {expected}; the "
                               "file was changed or corrupted after export, so it is not attached")
    return manifest


def delivered_num_labels(manifest: dict[str, Any]) -> int:
    """The classes the delivered head outputs: the manifest's num_labels, absent for a binary task."""
    num_labels = manifest.get("num_labels", 2)
    if type(num_labels) is not int or num_labels < 2:  # bool is an int subclass, and no count of classes
        raise AirloraError(f"delivery.json: num_labels {num_labels!r} is not an integer >= 2; the manifest was "
                           "changed after export, so nothing is attached")
    return num_labels


def read_record(adir: str | Path) -> dict[str, Any]:
    """The sender's record of a delivery (reference logits, test data, accounting)."""
    return _read_fields(Path(adir) / RECORD_FILE, _RECORD_FIELDS, "record")


def payload_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """Every delivered tensor's PEFT shape (before its codec), by PEFT key: what the base model must fit."""
    with safe_open(str(path), "pt") as handle:
        codecs = json.loads((handle.metadata() or {}).get(bundle.CODECS_METADATA, "null"))
        if isinstance(codecs, dict):
            return {key: tuple(entry[1:]) for key, entry in codecs.items()}
        return {key: tuple(handle.get_slice(key).get_shape()) for key in handle.keys()}


def check_base(adir: Path, manifest: dict[str, Any], base: torch.nn.Module, base_name: str) -> None:
    """Every delivered tensor must fit ``base``: its module is a linear layer of matching size, its head parameter
    exists with the same shape. Otherwise the delivery was built for another base model."""
    modules, params = dict(base.named_modules()), dict(base.named_parameters())
    shapes = ({key: tuple(t.shape) for key, t in _gguf_lora(adir, manifest, base).items()}
              if manifest.get("adapter_format") == "gguf" else payload_shapes(adir / manifest["payload_file"]))
    for key, shape in shapes.items():
        name = key.removeprefix(PEFT_PREFIX)
        owner, part = bundle.factor_part(name)
        if part is not None:
            module = modules.get(owner)
            if not isinstance(module, torch.nn.Linear):
                problem = f"has no linear layer {owner!r}"
            else:
                r = shape[0] if part != "lora_B" else shape[1]
                fits = {"lora_A": (r, module.in_features), "lora_B": (module.out_features, r), "lora_E": (r, 1)}
                if shape == fits[part]:
                    continue
                problem = (f"has {owner!r} as a {module.in_features} -> {module.out_features} linear layer, "
                           f"which {part} of shape {shape} does not fit")
        elif name not in params:
            problem = f"has no parameter {name!r}"
        elif tuple(params[name].shape) != shape:
            problem = f"has {name!r} of shape {tuple(params[name].shape)}, the delivery {shape}"
        else:
            continue
        raise AirloraError(f"the delivery was built for another base model ({manifest['model_dir']}): --base "
                           f"{base_name!r} {problem}; give the base model the run was trained on")


def attach(adir: Path, manifest: dict[str, Any], base: torch.nn.Module) -> torch.nn.Module:
    """``base`` with the delivered adapter attached by ``PeftModel.from_pretrained`` (integer codecs decoded first).
    A causal LM scored on label words (``airlora.causal_lm``) gets it on its plain causal LM, as any tool would load
    it, and is returned as the scorer."""
    from peft import PeftModel

    from airlora.causal_lm import LabelWordLM

    if isinstance(base, LabelWordLM):
        attach(adir, manifest, base.causal_lm)  # LoRA layers go into the modules the scorer shares
        return base.eval()

    with warnings.catch_warnings():
        # PEFT's LoRA-level check reads AdaLoRA's rank_pattern (mask lists) as LoRA rank patterns and warns that they
        # match nothing; AdaLoRA applies them itself right after, when it resizes the modules at load.
        warnings.filterwarnings("ignore", message="The following rank_pattern keys did not match")
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*is deprecated", category=FutureWarning)
        path = adir / manifest["payload_file"]
        if manifest.get("adapter_format") == "gguf" and not any(manifest["ranks"].values()):
            return base.eval()  # a GGUF adapter carries no head: with every rank 0 it changes nothing
        if not any(manifest["ranks"].values()):
            return _head_only(base, path)
        if manifest.get("adapter_format") == "gguf":  # read back into plain LoRA, as llama.cpp computes with it
            weights = _gguf_lora(adir, manifest, base)
            config = bundle.lora_adapter_config({name.removeprefix(PEFT_PREFIX).removesuffix(".lora_A.weight"):
                                                 t.shape[0] for name, t in weights.items() if ".lora_A." in name},
                                                manifest["model_dir"], [], "CAUSAL_LM")
            with tempfile.TemporaryDirectory(prefix="airlora-edge-") as tmp:
                save_file(weights, str(Path(tmp) / bundle.PEFT_PAYLOAD))
                (Path(tmp) / bundle.CONFIG_FILE).write_bytes(bundle.json_bytes(config))
                return PeftModel.from_pretrained(base, tmp).eval()
        if manifest["payload_file"] == bundle.PEFT_PAYLOAD:
            return PeftModel.from_pretrained(base, str(adir)).eval()
        weights = _decoded(path)
        with tempfile.TemporaryDirectory(prefix="airlora-edge-") as tmp:
            copy_for_peft(adir, Path(tmp), weights)
            return PeftModel.from_pretrained(base, tmp).eval()  # weights are copied in: the folder may go


def _gguf_lora(adir: Path, manifest: dict[str, Any], base: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A GGUF delivery's factors as plain LoRA tensors under PEFT keys, for ``base`` (``gguf_adapter.read_gguf``)."""
    from airlora.gguf_adapter import read_gguf
    from airlora.models import resolve_modules

    names = resolve_modules(base).names
    ranked = {key: names[key] for key, rank in manifest["ranks"].items() if rank and key in names}
    return read_gguf(adir / manifest["payload_file"], ranked, base.config)


def _decoded(path: Path) -> dict[str, torch.Tensor]:
    """A payload's tensors as fp32 PEFT tensors (integer codecs dequantised)."""
    with safe_open(str(path), "pt") as handle:
        codecs = json.loads((handle.metadata() or {}).get(bundle.CODECS_METADATA, "null"))
    tensors = load_file(str(path))
    return bundle.decode_tensors(tensors, codecs) if isinstance(codecs, dict) else tensors


def _head_only(base: torch.nn.Module, path: Path) -> torch.nn.Module:
    """A delivery with every rank 0 (a link that carried the head alone): PEFT refuses an adapter that targets no
    module, so the head is copied into the base model itself, which is all such an adapter would change."""
    params = dict(base.named_parameters())
    with torch.no_grad():
        for key, value in _decoded(path).items():
            params[key.removeprefix(PEFT_PREFIX)].copy_(value)
    return base.eval()


def accuracy(model: torch.nn.Module, batches: list[Any]) -> float:
    """Share of correct argmax predictions over pre-built batches."""
    correct = total = 0
    with torch.inference_mode():
        for batch in batches:
            correct += int((model(**batch.inputs).logits.argmax(-1) == batch.labels).sum())
            total += int(batch.labels.numel())
    return correct / max(total, 1)


def edge_evaluate(adir: str | Path, base: str, data: str | None = None,
                  expected_sha256: str | None = None) -> dict[str, Any]:
    """Verify, attach and evaluate a delivery as a device would; the JSON-ready result."""
    from airlora.batching import EncodedSplit, eval_batches
    from airlora.data import load_splits
    from airlora.models import load_model
    from airlora.session import seed_everything

    adir = Path(adir)
    manifest = verify_delivery(adir, expected_sha256)
    record = read_record(adir)
    data_config = dict(record["data"], **({"source": data} if data else {}))
    config = from_dict(DataConfig, data_config, "data.")
    seed_everything(record["seed"])  # weights a checkpoint lacks are drawn as the cloud drew them
    model, tokenizer, _ = load_model(base, delivered_num_labels(manifest), label_words=config.label_words,
                                     prompt=config.prompt)
    check_base(adir, manifest, model, base)
    model = attach(adir, manifest, model.eval())

    ref = record["reference"]
    edge_logits = reference_logits(model, tokenizer, ref["sentences"], ref["max_length"])
    logit_diff = float((edge_logits - torch.tensor(ref["logits"])).abs().max())

    splits = load_splits(config, record["seed"])
    if splits.num_labels != delivered_num_labels(manifest):
        raise AirloraError(f"--data {config.source!r} has {splits.num_labels} classes but the delivered head outputs "
                           f"{delivered_num_labels(manifest)}; give data of the task the adapter was trained on")
    batches = eval_batches(EncodedSplit(splits.test, tokenizer, config.max_length, None), config.eval_batch_size)
    test_accuracy = accuracy(model, batches)
    cloud = record["cloud_test_accuracy"]
    return {
        "test_accuracy": test_accuracy,
        "cloud_test_accuracy": cloud,
        "accuracy_drop": cloud - test_accuracy if data is None else None,
        "max_abs_logit_diff": logit_diff,
        "reference_examples": len(ref["sentences"]),
        "test_examples": len(splits.test),
        "bits_per_param": common_bits(manifest["ranks"], manifest["precisions"], manifest["head_bits"]),
        "precisions": manifest["precisions"],
        "payload_bytes": record["payload_bytes"],
        "scale_bytes": record["scale_bytes"],
        "overhead_bytes": record["overhead_bytes"],
        "on_air_bits": record["on_air_bits"],
        "transmitted_params": record["transmitted_params"],
        "sha256": manifest["sha256"][manifest["payload_file"]],
        "checksum_ok": True,
    }
