"""A finished run as every export format reads it (its delivered adapter, config and summary), and what the formats
share: the cloud model as a delivery leaves it, its reference logits, the output folder, the record's airtime
figures. ``airlora.export`` (AdaLoRA and LoRA), ``airlora.formats`` and ``airlora.gguf_export`` build on it.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from airlora import bundle
from airlora.bundle import CONFIG_FILE, MANIFEST_FILE, PEFT_PARTS, PEFT_PREFIX, RECORD_FILE
from airlora.codecs import CODECS
from airlora.config import DataConfig, RunConfig, from_dict
from airlora.errors import AirloraError
from airlora.io import write_text_atomic
from airlora.model_card import CARD_FILE
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
