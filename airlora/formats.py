"""Delivery formats: the one adapter a run trained, in the form the device's tool reads (``airlora export --format``).

- 'adalora' (default): PEFT's AdaLoRA, the triplets as trained: lora_A = Q (r, d_in), lora_B = P (d_out, r),
  lora_E = λ (r, 1), with ranknum and lora_alpha carrying the scaling (``airlora.export``). Only PEFT (or
  ``airlora edge``) loads it.
- 'lora': PEFT's plain LoRA, which serving and on-device tools read (vLLM, llama.cpp's converter, merging tools).
  λ and the scaling are folded into lora_A: lora_A = diag(c·λ)·Q (r, d_in), lora_B = P (d_out, r) with
  c = scaling · r / lora_alpha, so LoRA's ΔW = (lora_alpha / r)·lora_B·lora_A = scaling·P·diag(λ)·Q, the run's
  (its ``SVDLinear`` folds the same way, ``Q * (λ·scaling)``). Each module's rank r goes in ``rank_pattern``, one
  lora_alpha for all (``bundle.lora_adapter_config`` says why). A triplet then costs one value fewer on the air than
  in AdaLoRA form (``Codec.factor_bits``).
- 'gguf': the plain LoRA factors in llama.cpp's GGUF LoRA adapter (``airlora.gguf_adapter``), Llama decoders only.

Why λ goes into lora_A rather than split between the factors: the codecs are relative per row (fp16) or per group
of one row (int8/int4 with a scale per 64 values), so a row's scale does not change its relative error; lora_B
stays P exactly as trained. A float export is then the AdaLoRA delivery up to float rounding; an integer one is
quantised after the folding, so its bf16 scales round differently from the AdaLoRA form's (a difference of the
codec's own size, measured by the tests).

Letters: r rank of a module, d_in / d_out its input and output sizes.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from airlora.bundle import LORA_ALPHA, LORA_SUFFIX, PEFT_PREFIX, factor_part
from airlora.codecs import codec
from airlora.errors import AirloraError

if TYPE_CHECKING:
    from airlora.exported_run import RunAdapter

FORMATS = ("adalora", "lora", "gguf")
"""Every delivery format, the default first."""


def check_format(adapter_format: str) -> str:
    """``adapter_format`` if it is a delivery format; a clear error otherwise."""
    if adapter_format not in FORMATS:
        raise AirloraError(f"--format {adapter_format!r} is not a delivery format; allowed: {', '.join(FORMATS)}")
    return adapter_format


def lora_tensors(run: RunAdapter) -> dict[str, torch.Tensor]:
    """The adapter as plain LoRA under PEFT's keys, fp32: lora_A = diag(c·λ)·Q (r, d_in) with c = scaling·r /
    lora_alpha, lora_B = P (d_out, r) for every module of rank r > 0, then the head (``base_model.model.{name}``)."""
    out = {}
    for key, rank in run.ranks.items():
        if rank:
            name = f"{PEFT_PREFIX}{run.module_names[key]}"
            lam = run.tensors[f"{key}.lora_E"].float().view(-1)  # (r,)
            c = run.scaling * rank / LORA_ALPHA
            out[f"{name}.lora_A{LORA_SUFFIX}"] = run.tensors[f"{key}.lora_A"].float() * (lam * c)[:, None]
            out[f"{name}.lora_B{LORA_SUFFIX}"] = run.tensors[f"{key}.lora_B"].float().clone()
    out.update({f"{PEFT_PREFIX}{name}": t.float() for name, t in run.head.items()})
    return out


def run_tensors_from_lora(run: RunAdapter, peft: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """LoRA-keyed tensors (e.g. a payload decoded back) under the run's keys, for ``cloud_model``: Q = lora_A,
    P = lora_B and λ = lora_alpha / (r·scaling), so the run's scaling·P·diag(λ)·Q is LoRA's (lora_alpha / r)·B·A."""
    key_of = {run.module_names[key]: key for key in run.ranks}
    out = {}
    for name, value in peft.items():
        owner, part = factor_part(name.removeprefix(PEFT_PREFIX))
        if part is None:
            out[f"head.{owner}"] = value
            continue
        out[f"{key_of[owner]}.{part}"] = value
        if part == "lora_A":
            rank = value.shape[0]
            out[f"{key_of[owner]}.lora_E"] = torch.full((rank, 1), LORA_ALPHA / (rank * run.scaling))
    return out


def module_bits(adapter_format: str, bits: int, d_in: int, d_out: int) -> int:
    """Bits per unit rank of a (d_in → d_out) module at codec ``bits`` in ``adapter_format``: the AdaLoRA triplet
    (``Codec.unit_bits``) or the two LoRA factors (``Codec.factor_bits``). Exact."""
    c = codec(bits)
    return c.unit_bits(d_in, d_out) if adapter_format == "adalora" else c.factor_bits(d_in, d_out)


def sent_params(adapter_format: str, ranks: dict[str, int], params_as_trained: int) -> int:
    """Values a delivery in ``adapter_format`` sends, given the run's count in AdaLoRA form: one λ fewer per triplet
    when it is folded."""
    return params_as_trained - (sum(ranks.values()) if adapter_format != "adalora" else 0)
