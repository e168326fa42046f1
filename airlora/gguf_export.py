"""``airlora export --format gguf``: a run's adapter as llama.cpp's GGUF LoRA adapter (``airlora.gguf_adapter``), with
the manifest, the sender's record and a short card, as the other formats (``airlora.export``).

The folder: ``adapter.gguf`` (the payload), ``delivery.json`` (its SHA-256, the ranks, the precisions),
``delivery_record.json`` (not sent: accounting, the cloud model as this file delivers it, the channel) and
``README.md`` (not sent). No adapter_config.json: llama.cpp reads everything from the GGUF's own metadata.

Accounting (checked at every export): the tensor data bytes are exactly what the GGML types hold (F32 4 bytes a
value, F16 2, Q8_0 34 bytes per block of 32 values), and tensor data + the rest of the file are the file's size.
On air: tensor bytes + zlib(the rest of the file + delivery.json). The run budgeted its delivery in the AdaLoRA
form (airlora's own codecs); a GGUF at 32 or 16 bits is smaller (no λ), at 8 bits Q8_0's fp16 scale per 32 values
costs 0.25 bit a value more than airlora's int8: the record says whether it still fits T_max.
"""

from __future__ import annotations

import shutil
import tempfile
import zlib
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from airlora import bundle, formats
from airlora.bundle import MANIFEST_FILE, RECORD_FILE
from airlora.codecs import common_bits
from airlora.errors import AirloraError
from airlora.gguf_adapter import GGUF_FILE, check_gguf_delivery, read_gguf, split_file, write_gguf
from airlora.io import write_json_atomic, write_text_atomic
from airlora.model_card import CARD_FILE

if TYPE_CHECKING:
    from airlora.exported_run import RunAdapter

GGUF_TYPE_TEXT = {32: "F32", 16: "F16", 8: "Q8_0 (blocks of 32 values, one fp16 scale; F16 where a row is not whole "
                                          "blocks)"}


def base_config(model_dir: str) -> Any:
    """The base checkpoint's transformers config (architecture, head counts, layers)."""
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(model_dir)
    except (OSError, ValueError) as err:
        raise AirloraError(f"model {model_dir!r}: config.json could not be read: {err}") from None


def export_gguf(run: RunAdapter, lora: dict[str, torch.Tensor], precisions: dict[str, int], out: Path,
                command: str | None) -> dict[str, Any]:
    """Write ``lora`` (``formats.lora_tensors``) to ``out`` as a GGUF LoRA adapter with its manifest, record and card;
    the manifest and record as one dict. Nothing is left half-written (``open_out`` / ``remove_export``)."""
    from airlora.exported_run import delivered_reference, open_out, remove_export, sha256_file, write_json_bytes
    from airlora.io import atomic_path

    config = base_config(run.model_dir)
    check_gguf_delivery(str(getattr(config, "model_type", "")), run.head, precisions, run.ranks)
    module_names = {key: run.module_names[key] for key, rank in run.ranks.items() if rank}
    with tempfile.TemporaryDirectory(prefix="airlora-gguf-") as tmp:
        staged = Path(tmp) / GGUF_FILE
        write_gguf(staged, lora, module_names, precisions, config)
        decoded = read_gguf(staged, module_names, config)  # the cloud model as this file delivers it
        data, reference = delivered_reference(run, formats.run_tensors_from_lora(run, decoded))
        created = open_out(out)
        try:
            with atomic_path(out / GGUF_FILE) as target:
                shutil.copyfile(staged, target)
            sums = {GGUF_FILE: sha256_file(out / GGUF_FILE)}
            sent = bundle.manifest(GGUF_FILE, sums, run.ranks, precisions, run.head_bits, run.model_dir, run.num_labels,
                                   adapter_format="gguf")
            write_json_bytes(out / MANIFEST_FILE, bundle.json_bytes(sent))
            record = _record(run, out, lora, precisions, data, reference)
            write_json_atomic(out / RECORD_FILE, record)
            write_text_atomic(out / CARD_FILE, _card(run, sent, record, command))
        except BaseException:
            remove_export(out, created)
            raise
    return sent | record


def ggml_bytes(qtype_name: str, values: int) -> int:
    """Bytes of ``values`` values of a GGML type, from its definition (not gguf's tables): F32 4, F16 2, Q8_0 34 per
    32-value block."""
    return {"F32": 4 * values, "F16": 2 * values, "Q8_0": 34 * values // 32}[qtype_name]


def _record(run: RunAdapter, out: Path, lora: dict[str, torch.Tensor], precisions: dict[str, int],
            data: dict[str, Any], reference: dict[str, Any]) -> dict[str, Any]:
    """delivery_record.json of the GGUF just written; the byte accounting must add up exactly."""
    from airlora.exported_run import RECORD_FORMAT, airtime_fields
    from airlora.gguf_adapter import gguf_package

    path = out / GGUF_FILE
    rest, tensor_bytes = split_file(path)
    tensors = gguf_package().GGUFReader(str(path)).tensors
    expected = sum(ggml_bytes(t.tensor_type.name, int(t.n_elements)) for t in tensors)
    scale_bytes = sum(2 * int(t.n_elements) // 32 for t in tensors if t.tensor_type.name == "Q8_0")
    file_bytes = path.stat().st_size
    if tensor_bytes != expected or len(rest) + tensor_bytes != file_bytes:
        raise AirloraError(f"GGUF accounting does not add up ({tensor_bytes} tensor bytes, {expected} by the GGML "
                           f"types, {len(rest)} other bytes, a {file_bytes}-byte file); not delivered")
    sent = (out / MANIFEST_FILE).read_bytes()
    overhead = len(zlib.compress(rest + sent, 9))
    capacity, t_max_s = float(run.summary["capacity_bps"]), float(run.summary["t_max_s"])
    on_air_bits = 8 * (tensor_bytes + overhead)
    exact = all(b == 32 for key, b in precisions.items() if run.ranks[key]) and precisions == run.precisions
    return {
        "format": RECORD_FORMAT,
        "run_dir": str(run.run_dir),
        "bits_per_param": common_bits(run.ranks, precisions, run.head_bits),
        "precisions_of_run": precisions == run.precisions,
        "quantisation": {str(b): GGUF_TYPE_TEXT[b] for b in sorted({precisions[k] for k, r in run.ranks.items() if r})},
        "transmitted_params": sum(t.numel() for t in lora.values()),
        "payload_bytes": tensor_bytes - scale_bytes,
        "scale_bytes": scale_bytes,
        "header_bytes": len(rest),
        "config_bytes": 0,
        "manifest_bytes": len(sent),
        "overhead_raw_bytes": len(rest) + len(sent),
        "overhead_bytes": overhead,
        "reserved_overhead_bytes": None,
        "file_bytes": file_bytes,
        **airtime_fields(run, on_air_bits, capacity, t_max_s),
        "cloud_test_accuracy": run.summary["test_accuracy"],
        "cloud_test_accuracy_is_of_this_delivery": exact,  # fp32 factors: the run's model up to float rounding
        "data": data,
        "seed": run.config.train.seed,
        "reference": reference,
    }


def _card(run: RunAdapter, sent: dict[str, Any], record: dict[str, Any], command: str | None) -> str:
    """README.md of a GGUF delivery: what it is, how llama.cpp loads it, what it cost on the air."""
    used = sorted({b for k, b in sent["precisions"].items() if run.ranks[k]})
    return "\n".join([
        f"# GGUF LoRA adapter for {Path(run.model_dir).name}",
        "",
        f"A llama.cpp LoRA adapter (`{GGUF_FILE}`) fine-tuned by airlora over a wireless link: "
        f"{sum(1 for r in run.ranks.values() if r)} modules at their own ranks, at "
        f"{', '.join(GGUF_TYPE_TEXT[b].split(' ')[0] for b in used) or '-'}.",
        "",
        "```",
        f"llama-cli -m BASE.gguf --lora {GGUF_FILE}",
        "airlora edge THIS_FOLDER --base BASE --runtime llama.cpp",
        "```",
        "",
        f"- {record['transmitted_params']:,} parameters: tensor data "
        f"{record['payload_bytes'] + record['scale_bytes']:,} bytes + header and manifest "
        f"{record['overhead_bytes']:,} (zlib) = {record['on_air_bits']:,} bits",
        f"- airtime {record['airtime_s']:.4f} s at {record['snr_db']:g} dB of T_max {record['t_max_s']:g} s: "
        f"{'fits' if record['fits_t_max'] else 'OVER T_max'}",
        f"- cloud test accuracy {record['cloud_test_accuracy']:.4f} (the run's)",
        f"- SHA-256 `{sent['sha256'][GGUF_FILE]}`",
        f"- export: `{command}`" if command else "- export: from Python",
        f"- run: `{run.summary.get('command', 'not recorded')}`",
        "",
    ])


