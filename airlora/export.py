"""Export a run's delivered adapter as a PEFT AdaLoRA adapter at 32, 16 or 8 bits per parameter.

The export folder (ADIR):
- ``adapter_model.safetensors`` (32 and 16 bits): the tensors under PEFT's on-disk keys, in float32 or float16;
  ``PeftModel.from_pretrained`` loads it as is.
- ``adapter_model.int8.safetensors`` (8 bits) instead: every tensor as int8 under the same key, plus its fp32 scale
  under ``{key}.scale``. Symmetric per-tensor quantisation: s = max|x| / 127, q = round(x / s) in [−127, 127],
  x ≈ q·s (s = 0 for an all-zero tensor). PEFT cannot load int8 weights, so the edge dequantises before attaching;
  the different file name keeps PEFT from ever loading the raw integers as if they were weights.
- ``adapter_config.json``: PEFT's AdaLoraConfig carrying the heterogeneous ranks (below).
- ``delivery.json``: the manifest: SHA-256 of the payload and of the config, the exact accounting, the run's
  channel, the cloud model's test accuracy, and its logits on a fixed batch for the edge to compare against.

PEFT format. Keys ``base_model.model.{module}.lora_A`` (r, d_in) = Q_a, ``.lora_B`` (d_out, r) = P_a,
``.lora_E`` (r, 1) = λ_a for every module of rank r > 0, and ``base_model.model.{name}`` for each task-head
parameter (PEFT's on-disk form of ``modules_to_save``). Rank-0 modules carry nothing: they are left out of
``target_modules``, so PEFT does not wrap them at all. The ranks travel in ``rank_pattern``: PEFT builds every
targeted module at init_r = r_max (AdaLoraConfig's rank_pattern is ignored at construction), then, at load,
``resize_modules_by_rank_pattern`` shrinks each one to the number of True entries of its mask, keeping
ranknum = r_max, and only then loads the r sent triplets. The mask marks the first r positions: after the export
only the kept triplets exist, so positions carry no meaning.

Scaling. PEFT's AdaLoRA computes ΔW = B·(A ⊙ E)·lora_alpha / (ranknum + 1e-5); ours is P·diag(λ)·Q·scaling with
scaling = alpha / r_max. Since ranknum stays r_max, lora_alpha = scaling · float32(r_max + 1e-5) makes the two
equal up to float rounding, with no tensor changed (so payload bytes stay transmitted params × b / 8 exactly).

Accounting. Payload bytes are the bytes of the parameter tensors, = transmitted_params × b / 8 exactly (the
adapter Σ r·(d_in + d_out + 1) plus the head). The safetensors header, the 8-bit scales and adapter_config.json are
overhead, reported separately, and so is the airtime they add.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from airlora.config import DataConfig, RunConfig, from_dict
from airlora.errors import AirloraError
from airlora.io import write_json_atomic
from airlora.ranks import validate_ranks

EXPORT_BITS = (32, 16, 8)
ADAPTER_FORMAT = "airlora-svd-adapter/1"
"""Metadata 'format' of the adapter.safetensors an `airlora run` writes."""
CONFIG_FILE = "adapter_config.json"
MANIFEST_FILE = "delivery.json"
PAYLOAD_FILES = {32: "adapter_model.safetensors", 16: "adapter_model.safetensors", 8: "adapter_model.int8.safetensors"}
REFERENCE_EXAMPLES = 32
"""Test sentences whose cloud logits travel in the manifest, for the edge's max_abs_logit_diff."""
PEFT_PREFIX = "base_model.model."
"""Prefix of every tensor key in a PEFT adapter file."""
PEFT_PARTS = ("lora_A", "lora_B", "lora_E")
"""Tensor names of one adapted module in PEFT's AdaLoRA: Q_a, P_a and λ_a."""


def _read_json(path: Path) -> Any:
    """A run folder's JSON file; a clear error when it is not valid JSON."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise AirloraError(f"{str(path)!r} is not valid JSON ({err}); it was changed after the run") from None


def _held_rank(tensors: dict[str, torch.Tensor], key: str) -> int | None:
    """The rank the lora_A (r, d_in), lora_B (d_out, r), lora_E (r, 1) tensors of ``key`` hold; 0 when all are absent,
    None when they disagree."""
    shapes = [tuple(tensors[f"{key}.{part}"].shape) if f"{key}.{part}" in tensors else None for part in PEFT_PARTS]
    if shapes == [None, None, None]:
        return 0
    if None in shapes or any(len(shape) != 2 for shape in shapes):
        return None
    (r_a, _), (_, r_b), (r_e, one) = shapes
    return r_a if r_a == r_b == r_e and one == 1 else None


def sha256_file(path: Path) -> str:
    """Hex SHA-256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def safetensors_header_bytes(path: Path) -> int:
    """Bytes before the tensor data: the 8-byte length and the JSON header (with its padding)."""
    with open(path, "rb") as handle:
        return 8 + struct.unpack("<Q", handle.read(8))[0]


def quantise_int8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-tensor int8: (q, s) with q = round(x / s) in [−127, 127], s = max|x| / 127 as fp32 (1,)."""
    amax = float(x.detach().abs().max()) if x.numel() else 0.0
    scale = torch.tensor([amax / 127.0], dtype=torch.float32)
    if amax == 0.0:
        return torch.zeros_like(x, dtype=torch.int8), torch.zeros(1, dtype=torch.float32)
    return torch.round(x.float() / scale).clamp_(-127, 127).to(torch.int8), scale


def dequantise_int8(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x ≈ q·s in float32."""
    return q.to(torch.float32) * scale.to(torch.float32)


class RunAdapter:
    """A finished run's delivered adapter (adapter.safetensors), its resolved config and its summary."""

    def __init__(self, run_dir: str | Path) -> None:
        self.run_dir = Path(run_dir).resolve()
        files = {name: self.run_dir / name for name in ("adapter.safetensors", "config.json", "summary.json")}
        missing = [name for name, path in files.items() if not path.is_file()]
        if missing:
            raise AirloraError(f"run folder {str(run_dir)!r} lacks {', '.join(missing)}; expected a finished "
                               "`airlora run --out` folder")
        adapter = str(files["adapter.safetensors"])
        try:
            with safe_open(adapter, "pt") as handle:
                meta = handle.metadata() or {}
                if meta.get("format") != ADAPTER_FORMAT:
                    raise AirloraError(f"{adapter!r} is not an airlora adapter (format {meta.get('format')!r}); "
                                       f"expected {ADAPTER_FORMAT!r}")
                self.tensors = {key: handle.get_tensor(key) for key in handle.keys()}
        except SafetensorError as err:  # truncated or overwritten: the header or a tensor cannot be read
            raise AirloraError(f"{adapter!r} is not a readable safetensors file ({err}); it was truncated or "
                               "damaged after the run; rerun or restore it") from None
        entries = {}
        for entry, parse, kind in (("ranks", json.loads, dict), ("module_names", json.loads, dict),
                                   ("scaling", float, float), ("r_max", int, int), ("model_dir", str, str)):
            try:
                entries[entry] = parse(meta[entry])
            except (KeyError, ValueError):
                entries[entry] = None
            if not isinstance(entries[entry], kind):
                raise AirloraError(f"{adapter!r}: metadata entry {entry!r} is missing or malformed; expected ranks, "
                                   "module_names, scaling, r_max and model_dir as written by `airlora run`")
        self.module_names: dict[str, str] = entries["module_names"]
        self.scaling: float = entries["scaling"]
        self.r_max: int = entries["r_max"]
        self.model_dir: str = entries["model_dir"]
        try:
            self.ranks: dict[str, int] = validate_ranks(entries["ranks"], list(self.module_names), self.r_max)
        except AirloraError as err:
            raise AirloraError(f"{adapter!r} metadata: {err}; the file was changed after the run") from None
        for key, rank in self.ranks.items():
            if _held_rank(self.tensors, key) != rank:
                raise AirloraError(f"{adapter!r}: the tensors of {key!r} do not hold rank {rank} as its metadata "
                                   "says; the file was changed after the run")
        resolved = _read_json(files["config.json"])
        if isinstance(resolved, dict):
            resolved.pop("resolved", None)
            resolved.pop("history", None)
        try:
            self.config: RunConfig = from_dict(RunConfig, resolved)
        except AirloraError as err:
            raise AirloraError(f"{str(files['config.json'])!r}: {err}") from None
        self.summary: dict[str, Any] = _read_json(files["summary.json"])
        needed = ("transmitted_params", "capacity_bps", "t_max_s", "snr_db", "test_accuracy")
        lacking = [key for key in needed if not isinstance(self.summary, dict) or key not in self.summary]
        if lacking:
            raise AirloraError(f"{str(files['summary.json'])!r} lacks {', '.join(lacking)}; expected the summary of "
                               "a finished `airlora run`")
        self.head = {key.removeprefix("head."): t for key, t in self.tensors.items() if key.startswith("head.")}

    def peft_tensors(self) -> dict[str, torch.Tensor]:
        """The adapter under PEFT's on-disk keys, fp32: active triplets of rank > 0 modules, then the head."""
        out = {}
        for key, rank in self.ranks.items():
            if rank:
                for part in PEFT_PARTS:
                    out[f"{PEFT_PREFIX}{self.module_names[key]}.{part}"] = self.tensors[f"{key}.{part}"].float()
        out.update({f"{PEFT_PREFIX}{name}": t.float() for name, t in self.head.items()})
        return out

    def peft_config(self) -> Any:
        """AdaLoraConfig for PEFT: rank-0 modules untargeted, rank_pattern masks, head as modules_to_save."""
        from peft import AdaLoraConfig

        targeted = {self.module_names[key]: rank for key, rank in self.ranks.items() if rank}
        return AdaLoraConfig(
            task_type="SEQ_CLS",
            base_model_name_or_path=self.model_dir,
            init_r=self.r_max,
            target_r=max(1, round(np.mean(list(self.ranks.values())))),
            lora_alpha=self.scaling * float(np.float32(self.r_max) + np.float32(1e-5)),
            lora_dropout=0.0,
            target_modules=sorted(targeted),
            rank_pattern={f"{name}.lora_E": [i < rank for i in range(self.r_max)] for name, rank in targeted.items()},
            modules_to_save=sorted({name.rpartition(".")[0] for name in self.head}),
            total_step=max(1, int(self.summary.get("steps", 1))),
            inference_mode=True,
        )


def cloud_model(run: RunAdapter) -> tuple[torch.nn.Module, Any]:
    """The cloud model as the run delivered it: the base, our SVD adapters at the delivered ranks and the head."""
    from airlora.adapters import AdapterSet
    from airlora.models import load_model, resolve_modules
    from airlora.session import seed_everything

    seed_everything(run.config.train.seed)  # weights the checkpoint lacks are drawn exactly as in training
    model, tokenizer, _ = load_model(run.model_dir)
    module_map = resolve_modules(model, run.config.adapter.target_modules)
    adapters = AdapterSet.inject(model, module_map, run.config.adapter, run.config.train.seed)
    adapters.set_ranks(run.ranks)
    with torch.no_grad():
        for key, module in adapters.modules.items():
            if module.rank:
                module.Q[module.active] = run.tensors[f"{key}.lora_A"]
                module.P[:, module.active] = run.tensors[f"{key}.lora_B"]
                module.lam[module.active] = run.tensors[f"{key}.lora_E"].view(-1)
        params = dict(model.named_parameters())
        for name, value in run.head.items():
            params[name].copy_(value)
    return model.eval(), tokenizer


def reference_logits(model: torch.nn.Module, tokenizer: Any, sentences: list[str], max_length: int) -> torch.Tensor:
    """Logits (B, classes) of ``model`` on ``sentences`` padded as one batch, the way the edge recomputes them."""
    inputs = tokenizer(sentences, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    with torch.inference_mode():
        return model(**inputs).logits.float()


def _data_dict(run: RunAdapter) -> dict[str, Any]:
    """The run's data config, with a relative source path made absolute so the edge finds it from anywhere."""
    data = run.config.to_dict()["data"]
    source = Path(data["source"])
    if not data["source"].startswith("hf:") and data["source"] != "tweets" and source.exists():
        data["source"] = str(source.resolve())
    return data


def export_adapter(run_dir: str | Path, bits: int, out: str | Path, overwrite: bool = False) -> dict[str, Any]:
    """Write the run's adapter to ``out`` in PEFT format at ``bits`` per parameter; return the delivery manifest.

    Everything that can fail on bad input (run folder, model, data) is read before the first file is written, and a
    failure while writing removes what was written: ``out`` never holds a half-written export.
    """
    if bits not in EXPORT_BITS:
        raise AirloraError(f"--bits {bits!r} is not allowed; expected one of {', '.join(map(str, EXPORT_BITS))}")
    run = RunAdapter(run_dir)
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise AirloraError(f"--out {str(out)!r} is a file; expected a folder (new or empty) for the export")
    if (out / MANIFEST_FILE).exists() and not overwrite:
        raise AirloraError(f"--out {str(out)!r} already holds an export; choose another folder or --overwrite")
    tensors = run.peft_tensors()
    params = sum(t.numel() for t in tensors.values())
    if params != run.summary.get("transmitted_params"):
        raise AirloraError(f"{run.run_dir}/adapter.safetensors holds {params:,} parameters but summary.json reports "
                           f"transmitted_params = {run.summary.get('transmitted_params')!r}; the run folder is "
                           "inconsistent")
    # 1. the payload at the chosen precision (8 bits: int8 tensors and their fp32 scales)
    scales = {}
    if bits == 32:
        payload = tensors
    elif bits == 16:
        payload = {key: t.to(torch.float16) for key, t in tensors.items()}
        if not all(torch.isfinite(t).all() for t in payload.values()):
            raise AirloraError("a value of the adapter overflows float16; export it at --bits 32")
    else:
        payload = {}
        for key, t in tensors.items():
            payload[key], scales[f"{key}.scale"] = quantise_int8(t)

    # 2. the cloud model's logits on a fixed batch, for the edge to compare against
    from airlora.data import load_splits

    data = _data_dict(run)
    splits = load_splits(from_dict(DataConfig, data, "data."), run.config.train.seed)
    sentences = splits.test.sentences[:REFERENCE_EXAMPLES]
    model, tokenizer = cloud_model(run)
    logits = reference_logits(model, tokenizer, sentences, run.config.data.max_length)
    reference = {"sentences": sentences, "max_length": run.config.data.max_length, "logits": logits.tolist()}

    # 3. the files, the manifest last: a failure removes what was written
    payload_file = PAYLOAD_FILES[bits]
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    for stale in {CONFIG_FILE, MANIFEST_FILE, *PAYLOAD_FILES.values()}:
        (out / stale).unlink(missing_ok=True)  # a manifest that outlives its payload would vouch for the wrong file
    try:
        tmp = out / f".{payload_file}.tmp"
        save_file({**payload, **scales}, str(tmp), metadata={"format": "pt", "airlora_bits": str(bits)})
        os.replace(tmp, out / payload_file)
        run.peft_config().save_pretrained(str(out))
        manifest = _manifest(run, out, bits, payload, scales, params, data, reference)
        write_json_atomic(out / MANIFEST_FILE, manifest)
    except BaseException:
        for name in (CONFIG_FILE, MANIFEST_FILE, payload_file, f".{payload_file}.tmp"):
            (out / name).unlink(missing_ok=True)
        if created and not any(out.iterdir()):
            out.rmdir()
        raise
    return manifest


def _manifest(run: RunAdapter, out: Path, bits: int, payload: dict[str, torch.Tensor], scales: dict[str, torch.Tensor],
              params: int, data: dict[str, Any], reference: dict[str, Any]) -> dict[str, Any]:
    """delivery.json for the files just written to ``out``; the byte accounting must add up exactly."""
    payload_file = PAYLOAD_FILES[bits]
    # tensor bytes = params × b / 8 exactly; everything else is overhead
    payload_bytes = sum(t.numel() * t.element_size() for t in payload.values())
    scale_bytes = sum(t.numel() * t.element_size() for t in scales.values())
    header_bytes = safetensors_header_bytes(out / payload_file)
    file_bytes = (out / payload_file).stat().st_size
    config_bytes = (out / CONFIG_FILE).stat().st_size
    if payload_bytes * 8 != params * bits or header_bytes + payload_bytes + scale_bytes != file_bytes:
        raise AirloraError(f"export accounting does not add up ({payload_bytes} + {scale_bytes} + {header_bytes} "
                           f"bytes vs a {file_bytes}-byte file for {params} params at {bits} bits); not delivered")
    capacity = float(run.summary["capacity_bps"])
    t_max_s = float(run.summary["t_max_s"])
    accounted_bits = params * bits
    overhead_bytes = header_bytes + scale_bytes + config_bytes
    return {
        "format": "airlora-delivery/1",
        "run_dir": str(run.run_dir),
        "bits_per_param": bits,
        "payload_file": payload_file,
        "sha256": {payload_file: sha256_file(out / payload_file), CONFIG_FILE: sha256_file(out / CONFIG_FILE)},
        "quantisation": ("int8 symmetric per tensor: s = max|x|/127 (fp32, key + '.scale'), q = round(x/s), x ≈ q·s"
                         if bits == 8 else None),
        "transmitted_params": params,
        "payload_bytes": payload_bytes,
        "scale_bytes": scale_bytes,
        "header_bytes": header_bytes,
        "config_bytes": config_bytes,
        "overhead_bytes": overhead_bytes,
        "file_bytes": file_bytes,
        "accounted_bits": accounted_bits,
        "snr_db": run.summary["snr_db"],
        "capacity_bps": capacity,
        "t_max_s": t_max_s,
        "airtime_s": accounted_bits / capacity,
        "airtime_with_overhead_s": (accounted_bits + 8 * overhead_bytes) / capacity,
        "fits_t_max": accounted_bits / capacity <= t_max_s,
        "ranks": run.ranks,
        "model_dir": run.model_dir,
        "cloud_test_accuracy": run.summary["test_accuracy"],
        "data": data,
        "seed": run.config.train.seed,
        "reference": reference,
    }


def copy_for_peft(adir: Path, target: Path, tensors: dict[str, torch.Tensor]) -> None:
    """A PEFT-loadable folder: ``tensors`` as adapter_model.safetensors beside a copy of the adapter config."""
    target.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(target / PAYLOAD_FILES[32]), metadata={"format": "pt"})
    shutil.copyfile(adir / CONFIG_FILE, target / CONFIG_FILE)
