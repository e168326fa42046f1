"""Export a run's delivered adapter as a PEFT AdaLoRA adapter, each module at its codec (``airlora.codecs``).

The export folder (ADIR), as ``airlora.bundle`` lays it out:
- the payload: the active triplets and the task head, each module at its precision (the run's choice, or one
  ``--bits`` for all). ``adapter_model.safetensors`` when every codec is a float (PEFT loads it as is; fp16 is cast
  on load), else ``adapter_model.quantised.safetensors`` (integer codes with bf16 scales, which PEFT cannot load:
  the edge dequantises first).
- ``adapter_config.json``: PEFT's AdaLoraConfig carrying the heterogeneous ranks (below).
- ``delivery.json``: the manifest the device needs (ranks, precisions, SHA-256 of the payload and of the config).
- ``delivery_record.json``: the sender's record, not sent: the exact accounting, the run's channel, the cloud
  model's test accuracy, and its logits (as delivered, after the codecs) on a fixed batch for the edge to compare.
- ``README.md``: the model card (``airlora.model_card``), not sent: base model, task, data, ranks and bits, on-air
  size and airtime, accuracy and the commands that made it, with the YAML front matter a hub upload reads.

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
equal up to float rounding, with no tensor changed.

Accounting (checked at every export, or nothing is delivered): the payload's tensor bytes are exactly
Σ_m r_m·u_m(b_m)/8 + the head's, u_m the codec's bits per unit rank that the run budgeted with; the file is its
header plus those bytes; the header, config and manifest go on the air as one zlib stream, whose length must stay
within the overhead the run reserved. Airtime = (tensor bytes + that stream) · 8 / C.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from airlora import bundle, formats
from airlora.bundle import CONFIG_FILE, MANIFEST_FILE, PEFT_PAYLOAD, RECORD_FILE
from airlora.codecs import CODECS, common_bits
from airlora.errors import AirloraError
from airlora.exported_run import (
    RECORD_FORMAT,
    RunAdapter,
    airtime_fields,
    delivered_reference,
    open_out,
    remove_export,
    sha256_file,
    write_json_bytes,
)
from airlora.formats import check_format
from airlora.io import atomic_path, write_json_atomic, write_text_atomic
from airlora.model_card import CARD_FILE, model_card


def export_adapter(run_dir: str | Path, bits: int | None, out: str | Path, overwrite: bool = False,
                   command: str | None = None, adapter_format: str = "adalora") -> dict[str, Any]:
    """Write the run's adapter to ``out`` in PEFT format with its model card; return the manifest and the record as
    one dict. ``adapter_format``: 'adalora' (default) or 'lora' (``airlora.formats``).

    ``bits`` None delivers every module at the precision the run chose (and budgeted); a number sends every module
    and the head at that codec (e.g. a post-hoc int8 export of an fp32 run). Everything that can fail on bad input
    (run folder, model, data) is read before the first file is written, and a failure while writing removes what
    was written: ``out`` never holds a half-written export. ``command``: the command line of the export, quoted by
    the model card (README.md, ``airlora.model_card``) beside the run's own.
    """
    if bits is not None and bits not in CODECS:
        raise AirloraError(f"--bits {bits!r} is not allowed; expected one of {', '.join(map(str, sorted(CODECS)))}")
    check_format(adapter_format)
    run = RunAdapter(run_dir)
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise AirloraError(f"--out {str(out)!r} is a file; expected a folder (new or empty) for the export")
    if (out / MANIFEST_FILE).exists() and not overwrite:
        raise AirloraError(f"--out {str(out)!r} already holds an export; choose another folder or --overwrite")
    tensors = run.peft_tensors() if adapter_format == "adalora" else formats.lora_tensors(run)
    params = sum(t.numel() for t in tensors.values())
    if params != formats.sent_params(adapter_format, run.ranks, run.summary.get("transmitted_params", -1)):
        raise AirloraError(f"{run.run_dir}/adapter.safetensors holds {params:,} parameters but summary.json reports "
                           f"transmitted_params = {run.summary.get('transmitted_params')!r}; the run folder is "
                           "inconsistent")
    precisions = run.precisions if bits is None else dict.fromkeys(run.ranks, bits)
    head_bits = run.head_bits if bits is None else bits
    if adapter_format == "gguf":
        from airlora.gguf_export import export_gguf

        return export_gguf(run, tensors, precisions, out, command)
    as_run = precisions == run.precisions and head_bits == run.head_bits  # what the run chose and budgeted
    # 1. the payload: each tensor at its module's codec (or the head's)
    payload, codecs = {}, {}
    for key, bits_of_key in run.peft_bits(list(tensors), precisions, head_bits).items():
        encoded, codecs[key] = bundle.encode_tensor(key, tensors[key], bits_of_key)
        payload.update(encoded)
    if not all(torch.isfinite(t).all() for t in payload.values() if t.is_floating_point()):
        raise AirloraError("a value of the adapter overflows float16; export it at --bits 32 (or int8/int4, whose "
                           "bf16 scales have fp32's range)")

    # 2. the cloud model as delivered (the payload decoded back), its logits on a fixed batch for the edge
    decoded = bundle.decode_tensors(payload, codecs)
    data, reference = delivered_reference(run, run.run_tensors(decoded) if adapter_format == "adalora"
                                          else formats.run_tensors_from_lora(run, decoded))

    # 3. the files, the manifest and the record last: a failure removes what was written
    payload_file = bundle.payload_file(codecs)
    created = open_out(out)
    try:
        with atomic_path(out / payload_file) as tmp:
            save_file(payload, str(tmp), metadata=bundle.payload_metadata(codecs))
        write_json_bytes(out / CONFIG_FILE, bundle.json_bytes(run.adapter_config(adapter_format)))
        sums = {payload_file: sha256_file(out / payload_file), CONFIG_FILE: sha256_file(out / CONFIG_FILE)}
        sent = bundle.manifest(payload_file, sums, run.ranks, precisions, head_bits, run.model_dir, run.num_labels,
                               adapter_format)
        write_json_bytes(out / MANIFEST_FILE, bundle.json_bytes(sent))
        record = _record(run, out, payload_file, payload, precisions, head_bits, params, as_run, data, reference,
                         adapter_format)
        write_json_atomic(out / RECORD_FILE, record)
        write_text_atomic(out / CARD_FILE, model_card(run.config, run.summary, run.model_dir, sent, record, command))
    except BaseException:
        remove_export(out, created)
        raise
    return sent | record



def _record(run: RunAdapter, out: Path, payload_file: str, payload: dict[str, torch.Tensor],
            precisions: dict[str, int], head_bits: int, params: int, as_run: bool, data: dict[str, Any],
            reference: dict[str, Any], adapter_format: str) -> dict[str, Any]:
    """delivery_record.json for the files just written to ``out``; the byte accounting must add up exactly."""
    from airlora.codecs import codec

    tensor_bytes = sum(t.numel() * t.element_size() for t in payload.values())
    scale_bytes = sum(t.numel() * t.element_size() for key, t in payload.items() if key.endswith(".scale"))
    expected_bits = sum(codec(head_bits).tensor_bits(tuple(t.shape)) for t in run.head.values())
    for key, rank in run.ranks.items():
        if rank:  # lora_A is (r, d_in), lora_B (d_out, r)
            d_in, d_out = run.tensors[f"{key}.lora_A"].shape[1], run.tensors[f"{key}.lora_B"].shape[0]
            expected_bits += rank * formats.module_bits(adapter_format, precisions[key], d_in, d_out)
    header = bundle.header_bytes_of(out / payload_file)
    config, sent = ((out / name).read_bytes() for name in (CONFIG_FILE, MANIFEST_FILE))
    file_bytes = (out / payload_file).stat().st_size
    if tensor_bytes * 8 != expected_bits or len(header) + tensor_bytes != file_bytes:
        raise AirloraError(f"export accounting does not add up ({tensor_bytes} tensor bytes vs {expected_bits} bits by "
                           f"the codecs, {len(header)} header bytes, a {file_bytes}-byte file); not delivered")
    overhead = bundle.overhead_on_air_bytes(header, config, sent)
    reserved = run.summary.get("delivery_overhead_bytes")
    if as_run and isinstance(reserved, int) and overhead > reserved:
        raise AirloraError(f"the delivery's header, config and manifest take {overhead:,} bytes on the air, more than "
                           f"the {reserved:,} the run reserved for them; not delivered (please report this)")
    capacity, t_max_s = float(run.summary["capacity_bps"]), float(run.summary["t_max_s"])
    on_air_bits = 8 * (tensor_bytes + overhead)
    return {
        "format": RECORD_FORMAT,
        "run_dir": str(run.run_dir),
        "bits_per_param": common_bits(run.ranks, precisions, head_bits),
        "precisions_of_run": as_run,
        "quantisation": {c.name: _CODEC_TEXT[c.name] for c in sorted({codec(b) for b in [*precisions.values(),
                                                                                           head_bits]},
                                                                      key=lambda c: c.bits)},
        "transmitted_params": params,
        "payload_bytes": tensor_bytes - scale_bytes,
        "scale_bytes": scale_bytes,
        "header_bytes": len(header),
        "config_bytes": len(config),
        "manifest_bytes": len(sent),
        "overhead_raw_bytes": len(header) + len(config) + len(sent),
        "overhead_bytes": overhead,
        "reserved_overhead_bytes": reserved if as_run else None,
        "file_bytes": file_bytes,
        **airtime_fields(run, on_air_bits, capacity, t_max_s),
        "cloud_test_accuracy": run.summary["test_accuracy"],
        "cloud_test_accuracy_is_of_this_delivery": as_run,
        "data": data,
        "seed": run.config.train.seed,
        "reference": reference,
    }


_CODEC_TEXT = {
    "fp32": "float32, as trained",
    "fp16": "float16 cast (λ too)",
    "int8": "symmetric int8 per group of 64 values of each triplet's P column and Q row, one bf16 scale per group "
            "(rounded up: s ≥ max|x|/127), x ≈ q·s; λ fp32",
    "int4": "symmetric int4 in [−7, 7], two per byte (low nibble first, stored q + 8), per group of 64 values, one "
            "bf16 scale per group (s ≥ max|x|/7); λ fp32",
}


def copy_for_peft(adir: Path, target: Path, tensors: dict[str, torch.Tensor]) -> None:
    """A PEFT-loadable folder: ``tensors`` as adapter_model.safetensors beside a copy of the adapter config."""
    target.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(target / PEFT_PAYLOAD), metadata={"format": "pt"})
    shutil.copyfile(adir / CONFIG_FILE, target / CONFIG_FILE)
