"""llama.cpp's GGUF LoRA adapter (``airlora export --format gguf``), written and read with the ``gguf`` package.

What llama.cpp reads (its ``convert_lora_to_gguf.py`` writes the same; ``src/llama-adapter.cpp`` loads it):
- metadata ``general.type`` = 'adapter', ``general.architecture`` = the base model's ('llama'; llama.cpp refuses an
  adapter of another architecture), ``adapter.type`` = 'lora', ``adapter.lora.alpha`` (float32);
- per adapted weight ``blk.{i}.attn_q.weight`` (the base tensor's GGUF name, from gguf's own tensor-name map) two
  tensors ``{name}.lora_a`` of numpy shape (r, d_in) and ``{name}.lora_b`` (d_out, r); ggml reads them as
  ne = (d_in, r) and (r, d_out), which llama.cpp checks against the base tensor;
- module m is scaled by alpha / r_m, r_m read from its own lora_b, so per-tensor ranks need nothing else.
  ``adapter.lora.alpha`` = ``bundle.LORA_ALPHA`` and the factors are the plain LoRA export's (``airlora.formats``):
  the GGUF is what llama.cpp's converter makes of ``--format lora``.
- Llama's q and k weights are stored with the rows of each head reordered for llama.cpp's rotary embedding
  (the converter's ``permute``: (n_head, 2, d/n_head/2) -> (n_head, d/n_head/2, 2) along the output rows). The
  base GGUF is laid out so, so lora_b of q_proj and k_proj (whose rows are output rows) is permuted the same way;
  k with the key/value head count.

Dtypes: codec 32 -> F32, 16 -> F16, 8 -> Q8_0 (blocks of 32 values with one fp16 scale, 34 bytes), the types
llama.cpp's converter writes (``--outtype f32/f16/q8_0``). A tensor whose rows (numpy's last dimension) are not a
multiple of 32 cannot be Q8_0 and goes as F16, as the converter falls back. int4 is refused: the converter has no
4-bit LoRA type. Q8_0 is not airlora's int8 codec (groups of 64 with bf16 scales): the run's accuracy at int8 is
not this file's; the export measures the cloud model as this file delivers it.

On the air: the tensor data as it is, plus the rest of the file (header, metadata, tensor infos, alignment padding)
and delivery.json as one zlib stream, as for the safetensors formats (``airlora.bundle``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from airlora.bundle import LORA_ALPHA, LORA_SUFFIX, PEFT_PREFIX, factor_part
from airlora.errors import AirloraError

GGUF_FILE = "adapter.gguf"
ROPE_PERMUTED = {"q": "num_attention_heads", "k": "num_key_value_heads"}
"""Canonical modules whose output rows llama.cpp's Llama layout permutes, and the config field of their head count."""


def gguf_package() -> Any:
    """The gguf package; a clear error naming the extra when it is not installed."""
    try:
        import gguf
    except ImportError:
        raise AirloraError("--format gguf needs the gguf package: pip install 'airlora[gguf]'") from None
    return gguf


def qtypes() -> dict[int, Any]:
    """GGML tensor type of each codec llama.cpp takes for LoRA."""
    gguf = gguf_package()
    t = gguf.GGMLQuantizationType
    return {32: t.F32, 16: t.F16, 8: t.Q8_0}


def check_gguf_delivery(model_type: str, head: dict[str, torch.Tensor], precisions: dict[str, int],
                        ranks: dict[str, int]) -> None:
    """A clear error for what a llama.cpp LoRA adapter cannot carry."""
    if model_type != "llama":
        raise AirloraError(f"--format gguf is for Llama-architecture decoders (model_type 'llama'); this run's base "
                           f"is {model_type!r}: use --format lora")
    if head:
        raise AirloraError("--format gguf carries no task head, and this run trained one (a classifier); fine-tune "
                           "the decoder as a language model on label words (data.label_words) to deliver it to "
                           "llama.cpp, or use --format lora")
    bad = sorted({b for key, b in precisions.items() if ranks[key] and b not in qtypes()})
    if bad:
        raise AirloraError(f"--format gguf: modules at {bad} bits; llama.cpp's LoRA adapters take 32 (F32), 16 (F16) "
                           "and 8 (Q8_0) bits: export with --bits 8, 16 or 32")


def rope_permute(b: torch.Tensor, n_head: int, inverse: bool = False) -> torch.Tensor:
    """lora_b (d_out, r) with its output rows in llama.cpp's rotary order (or back, ``inverse``)."""
    d_out = b.shape[0]
    split = (n_head, 2, d_out // n_head // 2) if not inverse else (n_head, d_out // n_head // 2, 2)
    return b.reshape(*split, *b.shape[1:]).swapaxes(1, 2).reshape(b.shape)


def _names(module_names: dict[str, str], num_layers: int) -> dict[str, str]:
    """Rank key -> GGUF base tensor name ('blk.0.attn_q.weight'), from gguf's Llama tensor-name map."""
    gguf = gguf_package()
    mapping = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, num_layers)
    out = {}
    for key, name in module_names.items():
        gguf_name = mapping.get_name(name)
        if gguf_name is None:
            raise AirloraError(f"--format gguf: module {name!r} has no llama.cpp tensor name; the base is not a "
                               "Llama-architecture model")
        out[key] = f"{gguf_name}.weight"
    return out


def _heads(key: str, config: Any) -> int | None:
    """The head count of a q or k module's rotary permutation, None for other modules."""
    field = ROPE_PERMUTED.get(key.rpartition(".")[2])
    if field is None:
        return None
    return int(getattr(config, field, None) or config.num_attention_heads)


def write_gguf(path: Path, lora: dict[str, torch.Tensor], module_names: dict[str, str], precisions: dict[str, int],
               config: Any) -> None:
    """``lora`` (plain LoRA tensors under PEFT keys, ``formats.lora_tensors``) as a GGUF LoRA adapter at ``path``."""
    gguf = gguf_package()
    names, types = _names(module_names, int(config.num_hidden_layers)), qtypes()
    key_of = {name: key for key, name in module_names.items()}
    writer = gguf.GGUFWriter(str(path), arch=gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.LLAMA])
    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, LORA_ALPHA)
    for peft_key, value in sorted(lora.items()):
        owner, part = factor_part(peft_key.removeprefix(PEFT_PREFIX))
        key = key_of[owner]
        heads = _heads(key, config)
        if part == "lora_B" and heads is not None:
            value = rope_permute(value, heads)
        array = value.detach().float().contiguous().numpy()
        qtype = types[precisions[key]]
        if qtype == gguf.GGMLQuantizationType.Q8_0 and array.shape[-1] % 32:
            qtype = gguf.GGMLQuantizationType.F16  # Q8_0 needs rows of whole 32-value blocks: the converter's fallback
        data = array.astype(np.float16) if qtype == gguf.GGMLQuantizationType.F16 else array
        if qtype == gguf.GGMLQuantizationType.Q8_0:
            data = gguf.quants.quantize(array, qtype)
        suffix = ".lora_a" if part == "lora_A" else ".lora_b"
        writer.add_tensor(names[key] + suffix, data, raw_dtype=qtype if qtype == gguf.GGMLQuantizationType.Q8_0
                          else None)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def read_gguf(path: Path, module_names: dict[str, str], config: Any) -> dict[str, torch.Tensor]:
    """A GGUF LoRA adapter back as plain LoRA tensors under PEFT keys, fp32 (dequantised, q/k rows un-permuted):
    what the device computes with, and what the cloud measures the delivery by."""
    gguf = gguf_package()
    names = _names(module_names, int(config.num_hidden_layers))
    key_of = {name: key for key, name in names.items()}
    reader = gguf.GGUFReader(str(path))
    out = {}
    for tensor in reader.tensors:
        base, _, part = tensor.name.rpartition(".")
        if base not in key_of or part not in ("lora_a", "lora_b"):
            raise AirloraError(f"{str(path)!r}: tensor {tensor.name!r} is not a LoRA factor of this base model")
        key = key_of[base]
        value = torch.from_numpy(np.array(gguf.quants.dequantize(tensor.data, tensor.tensor_type), dtype=np.float32))
        value = value.reshape(tuple(int(n) for n in reversed(tensor.shape)))  # ggml ne -> numpy shape
        heads = _heads(key, config)
        if part == "lora_b" and heads is not None:
            value = rope_permute(value, heads, inverse=True)
        out[f"{PEFT_PREFIX}{module_names[key]}.{'lora_A' if part == 'lora_a' else 'lora_B'}{LORA_SUFFIX}"] = value
    return out


def tensor_spans(path: Path) -> list[tuple[int, int]]:
    """(offset, bytes) of every tensor's data in the file, in file order."""
    reader = gguf_package().GGUFReader(str(path))
    return sorted((int(t.data_offset), int(t.n_bytes)) for t in reader.tensors)


def split_file(path: Path) -> tuple[bytes, int]:
    """(every byte of the file that is not tensor data, the tensor data's byte count): the overhead that goes on the
    air compressed, and the payload that goes as it is."""
    raw, rest, tensor_bytes, at = path.read_bytes(), [], 0, 0
    for offset, size in tensor_spans(path):
        rest.append(raw[at:offset])
        tensor_bytes += size
        at = offset + size
    rest.append(raw[at:])
    return b"".join(rest), tensor_bytes
