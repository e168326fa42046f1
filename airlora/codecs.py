"""The codecs a module's adapter is sent with on the air: fp32, fp16, int8 and int4, with their exact sizes.

One table (``CODECS``, by bits per value) is used by the budget, the trainer's evaluation (the codec round trip),
the exporter and the edge, so what the run budgets, what it validates and what the device receives are the same.

What is sent for one module of rank r (the active triplets j = 1..r: P's column j, λ_j, Q's row j):
- fp32 / fp16: every value cast, λ included: r·(d_in + d_out + 1)·b bits.
- int8 / int4: P's columns and Q's rows quantised symmetrically in groups of ``GROUP`` = 64 consecutive values
  (along d_out for a column of P, along d_in for a row of Q), each group with one bf16 scale; int4 packs two
  values per byte (per row, a last odd value padded). λ goes as fp32: r numbers against r·(d_in + d_out) for P and
  Q (0.6 % of a MiniLM module at int4), each the scale of its whole rank-one term, so an error in λ_j would scale
  triplet j's entire contribution; sending it exactly costs almost nothing and keeps the top triplets exact in scale.
Every piece belongs to one triplet (no per-tensor scale), so a module's bits are exactly r × ``unit_bits``: the
budget's projection can work on integer costs per unit rank, with no per-module constant.

Quantisation of a group x with q_max = 2^(b−1) − 1 (127 or 7): s = max|x| / q_max rounded *up* to a bf16 (so
|x / s| ≤ q_max and nothing clips), q = round(x / s) in [−q_max, q_max], x̂ = q·s in fp32. Error |x − x̂| ≤ s/2,
s < max|x|·(1 + 2^−7)/q_max. bf16 scales keep fp32's exponent range (no overflow or underflow of a scale).

Why plain tensor ops and not a library: torch.ao's fake-quant and ``torch.fake_quantize_per_channel_affine`` are
per tensor or per channel with fp32 scales, not per group of 64 with bf16 scales rounded up; bitsandbytes (not
installed here) quantises base weights, not adapters for a wire format; PEFT loads adapter weights in float only.
The export must reproduce the run's round trip bit for bit, so one small implementation serves both.

Letters: n rows, d values per row, g = ceil(d / GROUP) groups per row.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from airlora.errors import AirloraError

GROUP = 64
"""Values per scale of the integer codecs (along each triplet's P column and Q row)."""
SCALE_BITS = 16
"""Bits of one scale (bf16)."""
LAMBDA_BITS_INT = 32
"""Bits of each λ under an integer codec (fp32, see the module docstring)."""


@dataclass(frozen=True)
class Codec:
    """One on-air precision: how many bits a value of P or Q takes, and what comes with it."""

    bits: int
    """Bits per value of P and Q (the key of ``CODECS`` and of a precision mapping)."""
    name: str
    """'fp32', 'fp16', 'int8' or 'int4'."""
    integer: bool
    """Integer codes with a bf16 scale per group of ``GROUP`` values; False: a float cast."""

    @property
    def q_max(self) -> int:
        """Largest integer code, 2^(b−1) − 1 (symmetric, so −q_max..q_max)."""
        return 2 ** (self.bits - 1) - 1

    @property
    def relative_error(self) -> float:
        """Bound on |x − x̂| relative to the largest |value| of x's group (float codecs: of |x| itself)."""
        if not self.integer:
            return {32: 2.0 ** -24, 16: 2.0 ** -11}[self.bits]
        return (1 + 2.0 ** -7) / (2 * self.q_max)  # s/2, s ≤ max|x|·(1 + 2^−7)/q_max

    @property
    def lambda_bits(self) -> int:
        """Bits of one λ: the codec's own float, or fp32 under an integer codec."""
        return LAMBDA_BITS_INT if self.integer else self.bits

    def row_bits(self, d: int) -> int:
        """Bits of one row of d values (a P column or Q row, a head row): payload (whole bytes) + scales."""
        if not self.integer:
            return d * self.bits
        return 8 * math.ceil(d * self.bits / 8) + math.ceil(d / GROUP) * SCALE_BITS

    def unit_bits(self, d_in: int, d_out: int) -> int:
        """Bits per unit rank of a (d_in → d_out) module: one Q row, one P column and one λ. Exact."""
        return self.factor_bits(d_in, d_out) + self.lambda_bits

    def factor_bits(self, d_in: int, d_out: int) -> int:
        """Bits per unit rank of a module sent as plain LoRA factors (λ and the scaling folded into lora_A's row,
        ``airlora.formats``): one lora_A row and one lora_B column, one value fewer per triplet than ``unit_bits``."""
        return self.row_bits(d_in) + self.row_bits(d_out)

    def tensor_bits(self, shape: tuple[int, ...]) -> int:
        """Bits of a whole tensor (the task head), quantised along its last dimension, one row per leading index."""
        if len(shape) == 0:
            return self.row_bits(1)
        rows = math.prod(shape[:-1])
        return rows * self.row_bits(shape[-1])


CODECS: dict[int, Codec] = {
    32: Codec(32, "fp32", False),
    16: Codec(16, "fp16", False),
    8: Codec(8, "int8", True),
    4: Codec(4, "int4", True),
}
"""Every codec, by bits per value; ``airlora.config.CODEC_BITS`` lists the same keys (tested)."""
_FLOAT_DTYPES = {32: torch.float32, 16: torch.float16}


def codec(bits: int) -> Codec:
    """The codec of ``bits`` per value; a clear error for a precision no codec delivers."""
    if bits not in CODECS:
        raise AirloraError(f"{bits!r} bits is not a codec; allowed: {', '.join(map(str, sorted(CODECS)))}")
    return CODECS[bits]


def lambda_codec(c: Codec) -> Codec:
    """The codec λ is sent with under ``c``: fp32 under an integer codec, else ``c`` itself."""
    return CODECS[LAMBDA_BITS_INT] if c.integer else c


def sent_bits(ranks: Mapping[str, int], precisions: Mapping[str, int]) -> list[int]:
    """The precisions of the modules a delivery sends (rank > 0), ascending."""
    return sorted({precisions[k] for k, r in ranks.items() if r})


def common_bits(ranks: Mapping[str, int], precisions: Mapping[str, int], head_bits: int) -> int | None:
    """The one precision of everything sent (modules and head), or None when they differ."""
    used = set(sent_bits(ranks, precisions)) | {head_bits}
    return used.pop() if len(used) == 1 else None


def _rows(x: torch.Tensor) -> torch.Tensor:
    """``x`` as (n, d) rows along its last dimension (a scalar or 1-D tensor is one row)."""
    return x.reshape(1, -1) if x.dim() <= 1 else x.reshape(-1, x.shape[-1])


def _round_up_bf16(s: torch.Tensor) -> torch.Tensor:
    """The smallest bf16 ≥ s for s ≥ 0 (float32 in, bfloat16 out)."""
    s16 = s.to(torch.bfloat16)
    low = s16.float() < s  # those get the next bf16 up: positive finite bf16s are ordered like their bit patterns
    return torch.where(low, (s16.view(torch.int16) + 1).view(torch.bfloat16), s16)  # no .any(): no device sync


def quantise_rows(c: Codec, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Integer codes (n, d) int8 and bf16 scales (n, g) of ``x``'s rows, by groups of ``GROUP`` values."""
    rows = _rows(x.detach()).float()  # (n, d)
    n, d = rows.shape
    g = math.ceil(d / GROUP)
    padded = torch.nn.functional.pad(rows, (0, g * GROUP - d)).view(n, g, GROUP)  # (n, g, G)
    scale = _round_up_bf16(padded.abs().amax(dim=-1) / c.q_max)  # (n, g)
    s = scale.float()[:, :, None]
    q = torch.where(s > 0, torch.round(padded / torch.where(s > 0, s, 1.0)), 0.0).clamp_(-c.q_max, c.q_max)
    return q.view(n, g * GROUP)[:, :d].to(torch.int8), scale


def dequantise_rows(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x̂ = q·s in float32: (n, d) codes, (n, g) scales -> (n, d)."""
    n, d = q.shape
    s = scale.float().repeat_interleave(GROUP, dim=1)[:, :d]  # (n, d)
    return q.float() * s


def round_trip(c: Codec, x: torch.Tensor) -> torch.Tensor:
    """``x`` as the edge gets it after this codec (quantise → dequantise): a new float32 tensor of x's shape, no
    gradient; rows along dim −1."""
    if c.bits == 32:
        return x.detach().float().clone()
    if not c.integer:
        return x.detach().to(_FLOAT_DTYPES[c.bits]).float()
    q, scale = quantise_rows(c, x)
    return dequantise_rows(q, scale).view(x.shape)


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """(n, d) codes in [−7, 7] -> (n, ceil(d/2)) uint8: value 2k in the low nibble, 2k+1 in the high one, as q + 8."""
    n, d = q.shape
    u = (q.to(torch.int16) + 8).to(torch.uint8)
    if d % 2:
        u = torch.cat([u, torch.full((n, 1), 8, dtype=torch.uint8)], dim=1)  # pad with a zero code
    return u[:, 0::2] | (u[:, 1::2] << 4)


def unpack_int4(packed: torch.Tensor, d: int) -> torch.Tensor:
    """Inverse of ``pack_int4``: (n, ceil(d/2)) uint8 -> (n, d) int8 codes."""
    low, high = (packed & 0x0F).to(torch.int16) - 8, (packed >> 4).to(torch.int16) - 8
    return torch.stack([low, high], dim=2).view(packed.shape[0], -1)[:, :d].to(torch.int8)


def encode(c: Codec, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """The tensors that carry ``x`` (rows along its last dim): {'': values} or {'': codes, '.scale': scales}.

    Keys are suffixes of the tensor's own name. Float codecs keep x's shape; integer ones store (n, d) int8 codes
    (int4: (n, ceil(d/2)) uint8, two per byte) and (n, g) bf16 scales; ``decode`` needs the original shape.
    """
    if not c.integer:
        return {"": x.detach().to(_FLOAT_DTYPES[c.bits]).contiguous()}
    q, scale = quantise_rows(c, x)
    return {"": pack_int4(q) if c.bits == 4 else q, ".scale": scale.contiguous()}


def decode(c: Codec, parts: dict[str, torch.Tensor], shape: tuple[int, ...]) -> torch.Tensor:
    """Float32 tensor of ``shape`` from what ``encode`` produced (the edge's dequantisation)."""
    if not c.integer:
        return parts[""].float().reshape(shape)
    d = shape[-1] if shape else 1
    q = unpack_int4(parts[""], d) if c.bits == 4 else parts[""]
    return dequantise_rows(q, parts[".scale"]).reshape(shape)


def fake_quantise(c: Codec, x: torch.Tensor) -> torch.Tensor:
    """``x`` through the codec's round trip in the forward pass, identity in the backward (straight-through)."""
    if c.bits == 32:
        return x
    return x + (round_trip(c, x) - x).detach()
