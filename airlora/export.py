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

import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from airlora import bundle, formats
from airlora.bundle import CONFIG_FILE, MANIFEST_FILE, PEFT_PARTS, PEFT_PAYLOAD, PEFT_PREFIX, RECORD_FILE
from airlora.codecs import CODECS, common_bits
from airlora.config import DataConfig, RunConfig, from_dict
from airlora.errors import AirloraError
from airlora.formats import check_format
from airlora.io import atomic_path, write_json_atomic, write_text_atomic
from airlora.model_card import CARD_FILE, model_card
from airlora.ranks import validate_ranks

ADAPTER_FORMAT = "airlora-svd-adapter/1"
"""Metadata 'format' of the adapter.safetensors an `airlora run` writes."""
RECORD_FORMAT = "airlora-delivery-record/1"
REFERENCE_EXAMPLES = 32
"""Test sentences whose cloud logits travel in the record, for the edge's max_abs_logit_diff."""


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
        # precisions: written by runs since the codecs; an older run was budgeted at its one bits_per_param
        default = self.config.channel.bits_per_param
        try:
            precisions = json.loads(meta["precisions"]) if "precisions" in meta else dict.fromkeys(self.ranks, default)
            self.head_bits: int = int(meta.get("head_bits", default))
        except ValueError:
            precisions, self.head_bits = None, 0
        if (not isinstance(precisions, dict) or set(precisions) != set(self.ranks)
                or not all(b in CODECS for b in [*precisions.values(), self.head_bits])):
            raise AirloraError(f"{adapter!r} metadata: precisions or head_bits are not a precision per module from "
                               f"{', '.join(map(str, sorted(CODECS)))}; the file was changed after the run")
        self.precisions: dict[str, int] = {key: int(precisions[key]) for key in self.ranks}
        # num_labels: written by runs since multi-class tasks; every earlier run was binary
        num_labels = meta.get("num_labels", "2")
        if not (num_labels.isascii() and num_labels.isdigit() and int(num_labels) >= 2):
            raise AirloraError(f"{adapter!r} metadata: num_labels {num_labels!r} is not an integer >= 2; the file was "
                               "changed after the run")
        self.num_labels: int = int(num_labels)
        """The classes the task head outputs."""

    def peft_tensors(self) -> dict[str, torch.Tensor]:
        """The adapter under PEFT's on-disk keys, fp32: active triplets of rank > 0 modules, then the head."""
        out = {}
        for key, rank in self.ranks.items():
            if rank:
                for part in PEFT_PARTS:
                    out[f"{PEFT_PREFIX}{self.module_names[key]}.{part}"] = self.tensors[f"{key}.{part}"].float()
        out.update({f"{PEFT_PREFIX}{name}": t.float() for name, t in self.head.items()})
        return out

    def peft_bits(self, keys: list[str], precisions: dict[str, int], head_bits: int) -> dict[str, int]:
        """The precision of each PEFT tensor key (AdaLoRA or LoRA form): its module's, or the head's."""
        module_of = {self.module_names[key]: key for key in self.ranks}
        parts = {name: bundle.factor_part(name.removeprefix(PEFT_PREFIX)) for name in keys}
        return {name: head_bits if part is None else precisions[module_of[owner]]
                for name, (owner, part) in parts.items()}

    def run_tensors(self, peft: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """PEFT-keyed tensors back under the run's own keys (``{key}.lora_A`` …, ``head.{name}``)."""
        key_of = {self.module_names[key]: key for key in self.ranks}
        out = {}
        for name, value in peft.items():
            owner, _, part = name.removeprefix(PEFT_PREFIX).rpartition(".")
            out[f"{key_of[owner]}.{part}" if part in PEFT_PARTS else f"head.{name.removeprefix(PEFT_PREFIX)}"] = value
        return out

    def adapter_config(self, adapter_format: str = "adalora") -> dict[str, Any]:
        """PEFT's AdaLoraConfig (``bundle.adapter_config``) or LoraConfig (``bundle.lora_adapter_config``)."""
        module_ranks = {self.module_names[k]: r for k, r in self.ranks.items()}
        task = "SEQ_CLS" if self.config.data.label_words is None else "CAUSAL_LM"  # PEFT loads it on such a model
        if adapter_format == "lora":
            return bundle.lora_adapter_config(module_ranks, self.model_dir, list(self.head), task)
        return bundle.adapter_config(module_ranks, self.r_max, self.scaling, self.model_dir, list(self.head),
                                     int(self.summary.get("steps", 1)), task)


def cloud_model(run: RunAdapter, tensors: dict[str, torch.Tensor] | None = None) -> tuple[torch.nn.Module, Any]:
    """The cloud model as the run delivered it: the base, our SVD adapters at the delivered ranks and the head,
    with ``tensors`` (run keys, e.g. a payload decoded back) in place of the run's own fp32 values when given."""
    from airlora.adapters import AdapterSet
    from airlora.models import load_model, resolve_modules
    from airlora.session import seed_everything

    values = run.tensors if tensors is None else tensors
    seed_everything(run.config.train.seed)  # weights the checkpoint lacks are drawn exactly as in training
    data = run.config.data
    model, tokenizer, _ = load_model(run.model_dir, run.num_labels, label_words=data.label_words, prompt=data.prompt)
    module_map = resolve_modules(model, run.config.adapter.target_modules)
    adapters = AdapterSet.inject(model, module_map, run.config.adapter, run.config.train.seed)
    adapters.set_ranks(run.ranks)
    with torch.no_grad():
        for key, module in adapters.modules.items():
            if module.rank:
                module.Q[module.active] = values[f"{key}.lora_A"]
                module.P[:, module.active] = values[f"{key}.lora_B"]
                module.lam[module.active] = values[f"{key}.lora_E"].view(-1)
        params = dict(model.named_parameters())
        for name in run.head:
            params[name].copy_(values[f"head.{name}"])
    return model.eval(), tokenizer


def reference_logits(model: torch.nn.Module, tokenizer: Any, sentences: list[str], max_length: int) -> torch.Tensor:
    """Logits (B, classes) of ``model`` on ``sentences`` padded as one batch, the way the edge recomputes them."""
    inputs = tokenizer(sentences, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    with torch.inference_mode():
        return model(**inputs).logits.float()


def _data_dict(run: RunAdapter) -> dict[str, Any]:
    """The run's data config, with a relative source path made absolute so the edge finds it from anywhere."""
    from airlora.data import BUILTIN_SOURCES

    data = run.config.to_dict()["data"]
    source = Path(data["source"])
    if not data["source"].startswith("hf:") and data["source"] not in BUILTIN_SOURCES and source.exists():
        data["source"] = str(source.resolve())
    return data


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


WRITTEN = (CONFIG_FILE, MANIFEST_FILE, RECORD_FILE, CARD_FILE, bundle.PEFT_PAYLOAD, bundle.QUANTISED_PAYLOAD,
           "adapter.gguf", "adapter_model.int8.safetensors")  # the last: the one 8-bit file name of earlier exports
"""Every file an export may write: removed before writing, so none of an earlier export's survives."""


def open_out(out: Path) -> bool:
    """Make ``out`` ready for an export's files (an earlier export's removed); whether it was created."""
    is_export = (out / MANIFEST_FILE).is_file() or (out / RECORD_FILE).is_file()
    clash = [name for name in WRITTEN if (out / name).exists()] if out.is_dir() and not is_export else []
    if clash:  # e.g. --out . in a repository: its README.md is not an earlier export's card
        raise AirloraError(f"--out {out} already holds {', '.join(clash)} and is not an airlora export; choose an "
                           "empty folder or an earlier export's")
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    for stale in WRITTEN:
        (out / stale).unlink(missing_ok=True)  # a manifest that outlives its payload would vouch for the wrong file
    return created


def remove_export(out: Path, created: bool) -> None:
    """Undo a failed export: its files (and temporary files), and ``out`` itself if the export created it."""
    for name in WRITTEN:
        (out / name).unlink(missing_ok=True)
        (out / f".{name}.tmp").unlink(missing_ok=True)
    if created and not any(out.iterdir()):
        out.rmdir()


def delivered_reference(run: RunAdapter, values: dict[str, torch.Tensor]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(the run's data config, the reference the record carries): the cloud model with ``values`` (run keys, the
    delivery decoded back) and its logits on the first test sentences, for the edge's max_abs_logit_diff."""
    from airlora.data import load_splits

    data = _data_dict(run)
    splits = load_splits(from_dict(DataConfig, data, "data."), run.config.train.seed)
    sentences = splits.test.sentences[:REFERENCE_EXAMPLES]
    model, tokenizer = cloud_model(run, values)
    logits = reference_logits(model, tokenizer, sentences, run.config.data.max_length)
    return data, {"sentences": sentences, "max_length": run.config.data.max_length, "logits": logits.tolist()}


def airtime_fields(run: RunAdapter, on_air_bits: int, capacity: float, t_max_s: float) -> dict[str, Any]:
    """The record's channel figures: ``on_air_bits`` on the run's delivery channel, and whether they fit."""
    return {"on_air_bits": on_air_bits, "snr_db": run.summary["snr_db"], "capacity_bps": capacity, "t_max_s": t_max_s,
            "airtime_s": on_air_bits / capacity, "fits_t_max": on_air_bits / capacity <= t_max_s}


def write_json_bytes(path: Path, data: bytes) -> None:
    """A delivery JSON file with exactly the bytes that are counted on the air (written atomically)."""
    write_text_atomic(path, data.decode("ascii"))


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
