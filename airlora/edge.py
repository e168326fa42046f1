"""What the edge device does with a delivery: verify it, attach it to a fresh base model with PEFT, evaluate it.

1. Integrity: the SHA-256 of the payload and of adapter_config.json must match the manifest (and ``--sha256``, the
   value the sender printed, when given); otherwise nothing is attached. A checksum catches corruption, not an
   attacker who rewrites the manifest too: that needs the out-of-band ``--sha256``.
2. The base model is loaded fresh from its own folder (head included, then replaced by the delivered one). Every
   delivered tensor must fit it (same module names and sizes); otherwise it was built for another base model.
3. ``peft.PeftModel.from_pretrained`` attaches the adapter. 8-bit payloads are dequantised first (x = q·s) into a
   temporary PEFT folder, since PEFT cannot load int8 weights; fp16 is loaded as sent (PEFT casts on load).
4. Test accuracy on the run's test split (or ``--data``), and the largest |logit difference| against the cloud
   model's logits on the manifest's fixed batch.
"""

from __future__ import annotations

import json
import tempfile
import warnings
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file

from airlora.config import DataConfig, from_dict
from airlora.errors import AirloraError
from airlora.export import (
    MANIFEST_FILE,
    PEFT_PARTS,
    PEFT_PREFIX,
    copy_for_peft,
    dequantise_int8,
    reference_logits,
    sha256_file,
)

_MANIFEST_FIELDS: dict[str, type | tuple[type, ...]] = {
    "sha256": dict, "payload_file": str, "bits_per_param": int, "seed": int, "data": dict, "reference": dict,
    "cloud_test_accuracy": (int, float), "payload_bytes": int, "overhead_bytes": int, "transmitted_params": int,
    "model_dir": str,
}
"""Manifest entries the edge reads, and their JSON types."""


def verify_delivery(adir: str | Path, expected_sha256: str | None = None) -> dict[str, Any]:
    """The manifest of a delivery folder whose payload and config match their SHA-256; a clear error otherwise."""
    adir = Path(adir)
    try:
        manifest = json.loads((adir / MANIFEST_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        raise AirloraError(f"{str(adir)!r} is not a delivery folder (no readable {MANIFEST_FILE}); "
                           "expected the --out folder of `airlora export`") from None
    lacking = [key for key, kind in _MANIFEST_FIELDS.items()
               if not isinstance(manifest, dict) or not isinstance(manifest.get(key), kind)]
    if lacking:
        raise AirloraError(f"{str(adir / MANIFEST_FILE)!r} lacks a valid {', '.join(lacking)}; the manifest was "
                           "changed after export, so nothing is attached")
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


def check_base(adir: Path, manifest: dict[str, Any], base: torch.nn.Module, base_name: str) -> None:
    """Every delivered tensor must fit ``base``: its module is a linear layer of matching size, its head parameter
    exists with the same shape. Otherwise the delivery was built for another base model."""
    modules, params = dict(base.named_modules()), dict(base.named_parameters())
    with safe_open(str(adir / manifest["payload_file"]), "pt") as handle:
        for key in handle.keys():
            if key.endswith(".scale"):
                continue
            shape = tuple(handle.get_slice(key).get_shape())
            name = key.removeprefix(PEFT_PREFIX)
            owner, _, part = name.rpartition(".")
            if part in PEFT_PARTS:
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
    """``base`` with the delivered adapter attached by ``PeftModel.from_pretrained`` (8-bit dequantised first)."""
    from peft import PeftModel

    with warnings.catch_warnings():
        # PEFT's LoRA-level check reads AdaLoRA's rank_pattern (mask lists) as LoRA rank patterns and warns that they
        # match nothing; AdaLoRA applies them itself right after, when it resizes the modules at load.
        warnings.filterwarnings("ignore", message="The following rank_pattern keys did not match")
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*is deprecated", category=FutureWarning)
        if manifest["bits_per_param"] != 8:
            return PeftModel.from_pretrained(base, str(adir)).eval()
        packed = load_file(str(adir / manifest["payload_file"]))
        weights = {key: dequantise_int8(q, packed[f"{key}.scale"]) for key, q in packed.items()
                   if not key.endswith(".scale")}
        with tempfile.TemporaryDirectory(prefix="airlora-edge-") as tmp:
            copy_for_peft(adir, Path(tmp), weights)
            return PeftModel.from_pretrained(base, tmp).eval()  # weights are copied in: the folder may go


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
    from airlora.batching import eval_batches
    from airlora.data import load_splits
    from airlora.models import load_model
    from airlora.session import seed_everything

    adir = Path(adir)
    manifest = verify_delivery(adir, expected_sha256)
    seed_everything(manifest["seed"])  # weights a checkpoint lacks are drawn as the cloud drew them
    model, tokenizer, _ = load_model(base)
    check_base(adir, manifest, model, base)
    model = attach(adir, manifest, model.eval())

    ref = manifest["reference"]
    edge_logits = reference_logits(model, tokenizer, ref["sentences"], ref["max_length"])
    logit_diff = float((edge_logits - torch.tensor(ref["logits"])).abs().max())

    data_config = dict(manifest["data"], **({"source": data} if data else {}))
    config = from_dict(DataConfig, data_config, "data.")
    splits = load_splits(config, manifest["seed"])
    batches = eval_batches(splits.test, tokenizer, config.eval_batch_size, config.max_length)
    test_accuracy = accuracy(model, batches)
    cloud = manifest["cloud_test_accuracy"]
    return {
        "test_accuracy": test_accuracy,
        "cloud_test_accuracy": cloud,
        "accuracy_drop": cloud - test_accuracy if data is None else None,
        "max_abs_logit_diff": logit_diff,
        "reference_examples": len(ref["sentences"]),
        "test_examples": len(splits.test),
        "bits_per_param": manifest["bits_per_param"],
        "payload_bytes": manifest["payload_bytes"],
        "overhead_bytes": manifest["overhead_bytes"],
        "transmitted_params": manifest["transmitted_params"],
        "sha256": manifest["sha256"][manifest["payload_file"]],
        "checksum_ok": True,
    }
