"""Noise networks f_ψ of the refiner (paper Eq. 15): a residual MLP and a 1-D U-Net over the action vector.

Dimension letters: B batch, D action dim (6L), C condition dim (state S + coarse action A), E embedding width,
N timesteps, P padded action length, K guidance branches (conditional / unconditional) sharing one x.

Each network splits its forward pass into three verbs so the sampler can compute the parts that stay fixed
during one decision only once: `embed_time(t)` for every reverse step at once, `embed_cond(cond, null_mask)`
once per decision, and `denoise(x, t_emb, c_emb)` per step. Leading dimensions of the three inputs broadcast,
so one call evaluates x under both guidance branches: x (B, D), c_emb (K, B, E) -> (K, B, D).
`forward(x, t, cond, null_mask)` chains them for training. The sampler asks for `guided_fn`, the guided output
of one reverse step; the MLP overrides it with a fused form, and `cached` keeps what depends on the weights only
(the time embeddings of a schedule, the MLP's rearranged weights) until the weights change.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Hashable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def timestep_embedding(t: Tensor, dim: int, max_period: float = 10_000.0) -> Tensor:
    """Sinusoidal embedding e_τ of integer timesteps (DDPM, after Vaswani et al.): (N,) -> (N, dim)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32) / half)  # (dim/2,)
    angles = t.to(torch.float32)[:, None] * freqs[None, :]  # (N, dim/2)
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)


class Denoiser(nn.Module):
    """What every f_ψ shares: time and condition embeddings, the learned null condition, `forward`."""

    def __init__(self, action_dim: int, cond_dim: int, hidden: int, time_embed_dim: int) -> None:
        super().__init__()
        if action_dim < 1 or cond_dim < 1:
            raise ValueError(f"action_dim and cond_dim must be >= 1, got {action_dim} and {cond_dim}")
        self.action_dim, self.cond_dim, self.time_embed_dim = action_dim, cond_dim, time_embed_dim
        self.time_mlp = nn.Sequential(nn.Linear(time_embed_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden))
        self.cond_mlp = nn.Sequential(nn.Linear(cond_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden))
        # The "unconditional" input of classifier-free guidance is a learned embedding, not a zero condition:
        # zero is an ordinary, in-distribution condition here (standardised state features and the Gaussian
        # coarse action are centred at 0), so a zero null would make the unconditional model the conditional
        # model at a real state. A free vector cannot collide with a real condition and learns its own place.
        self.null_embedding = nn.Parameter(0.02 * torch.randn(hidden))
        self._cache: dict[Hashable, Any] = {}
        self._cache_key: tuple[tuple[int, int], ...] | None = None

    def cached(self, key: Hashable, make: Callable[[], Any]) -> Any:
        """`make()`, computed once while the weights stay as they are: the parts of sampling that fix per policy.

        Values are kept while every parameter is the same tensor at the same version counter, which each in-place
        change bumps (optimiser steps, load_state_dict), so an older weight's value is never served. They are
        computed without autograd and outside inference mode, so they are ordinary constant tensors.
        """
        weights = tuple((id(p), p._version) for p in self.parameters())
        if weights != self._cache_key:
            self._cache, self._cache_key = {}, weights
        if key not in self._cache:
            with torch.inference_mode(False), torch.no_grad():
                self._cache[key] = make()
        return self._cache[key]

    def embed_time(self, t: Tensor) -> Tensor:
        """Timestep embedding after the time MLP: (N,) long -> (N, E)."""
        return self.time_mlp(timestep_embedding(t, self.time_embed_dim))

    def embed_cond(self, cond: Tensor, null_mask: Tensor | None = None) -> Tensor:
        """Condition embedding; rows where null_mask is True get the learned null embedding: (B, C) -> (B, E)."""
        emb = self.cond_mlp(cond)
        if null_mask is None:
            return emb
        return torch.where(null_mask[:, None], self.null_embedding.to(emb.dtype), emb)

    def denoise(self, x: Tensor, t_emb: Tensor, c_emb: Tensor) -> Tensor:
        """The network proper on embedded inputs: x (..., D), t_emb (..., E), c_emb (..., E) -> (..., D)."""
        raise NotImplementedError

    def denoise_fn(self) -> Callable[[Tensor, Tensor, Tensor], Tensor]:
        """`denoise` with the weights bound once, for the sampler's many calls in one decision.

        The callable stays valid while the parameters are updated in place (optimiser steps, load_state_dict).
        """
        return self.denoise

    def guided_fn(self, t_embs: Tensor, c_emb: Tensor, weights: Sequence[float]) -> Callable[[int, Tensor], Tensor]:
        """The guided output Σ_k weights[k]·f_ψ(x, τ_i, c_k) of reverse step i, as a function (i, x) -> (B, D).

        t_embs (N, E) from `embed_time`, one row per reverse step; c_emb (K, B, E), one condition embedding per
        guidance branch (K = 1 or 2); weights (K,). Classifier-free guidance uncond + w·(cond − uncond) is
        weights (w, 1 − w) on branches (cond, null). One network call per step evaluates every branch.
        For sampling: an override may use constant copies of the weights, through which no gradient flows.
        """
        _check_branches(c_emb.shape[0], weights)
        denoise, steps = self.denoise_fn(), t_embs.unbind(0)
        if len(weights) == 1:
            return lambda i, x: denoise(x, steps[i], c_emb)[0]
        w_cond = torch.tensor(weights[0], dtype=c_emb.dtype)  # lerp(null, cond, w) = w·cond + (1 − w)·null

        def guided(i: int, x: Tensor) -> Tensor:
            out_cond, out_null = denoise(x, steps[i], c_emb).unbind(0)
            return torch.lerp(out_null, out_cond, w_cond)

        return guided

    def forward(self, x: Tensor, t: Tensor, cond: Tensor, null_mask: Tensor | None = None) -> Tensor:
        """f_ψ(x_τ, τ, cond): (B, D), (B,) long, (B, C), optional (B,) bool -> (B, D) in the prediction type's units."""
        return self.denoise(x, self.embed_time(t), self.embed_cond(cond, null_mask))


def _check_branches(k: int, weights: Sequence[float]) -> None:
    """Guidance weights are one per branch and sum to 1: (1,) for one branch, (w, 1 − w) for two."""
    if len(weights) != k or k not in (1, 2) or abs(sum(weights) - 1) > 1e-6:
        raise ValueError(f"guided_fn takes 1 or 2 branches with one weight each, summing to 1; got {k} branches "
                         f"and weights {tuple(weights)}")


class MLPDenoiser(Denoiser):
    """Residual MLP f_ψ(concat[x_τ, e_τ, c]) (paper Eq. 15): the concat's linear map is the sum of three embeddings.

    Blocks are pre-activation residuals h + W·SiLU(h); one LayerNorm sits before the output head. The sampler
    makes 50 sequential calls per decision on a CPU, where each op's fixed cost outweighs its arithmetic: one
    weight matrix per block, and no norm inside the blocks (at batch 2 a LayerNorm costs half a 256x256 matmul;
    per-block norms made a decision ~30 % slower without changing accuracy on the toy targets of the tests).
    """

    def __init__(self, action_dim: int, cond_dim: int, hidden: int = 256, blocks: int = 2,
                 time_embed_dim: int = 128) -> None:
        super().__init__(action_dim, cond_dim, hidden, time_embed_dim)
        self.in_proj = nn.Linear(action_dim, hidden)
        self.blocks = nn.ModuleList(nn.Linear(hidden, hidden) for _ in range(blocks))
        self.out_norm = nn.LayerNorm(hidden)
        self.out_proj = nn.Linear(hidden, action_dim)

    def denoise(self, x: Tensor, t_emb: Tensor, c_emb: Tensor) -> Tensor:
        """x (..., D), t_emb (..., E), c_emb (..., E) -> (..., D); leading dims broadcast."""
        return self.denoise_fn()(x, t_emb, c_emb)

    def denoise_fn(self) -> Callable[[Tensor, Tensor, Tensor], Tensor]:
        # The weights are bound to locals once: a module call and a parameter lookup through nn.Module.__getattr__
        # cost about 2 µs each, a fifth of a step's time at batch 2 when paid 50 times per decision.
        w_in, b_in = self.in_proj.weight, self.in_proj.bias
        blocks = [(block.weight, block.bias) for block in self.blocks]
        norm_shape, norm_w, norm_b, norm_eps = self.out_norm.normalized_shape, self.out_norm.weight, \
            self.out_norm.bias, self.out_norm.eps
        w_out, b_out = self.out_proj.weight, self.out_proj.bias

        def denoise(x: Tensor, t_emb: Tensor, c_emb: Tensor) -> Tensor:
            h = F.linear(x, w_in, b_in) + (t_emb + c_emb)  # (..., E)
            for w, b in blocks:
                h = h + F.linear(F.silu(h), w, b)
            return F.linear(F.silu(F.layer_norm(h, norm_shape, norm_w, norm_b, norm_eps)), w_out, b_out)

        return denoise

    def guided_fn(self, t_embs: Tensor, c_emb: Tensor, weights: Sequence[float]) -> Callable[[int, Tensor], Tensor]:
        # The same network in fewer, cheaper ops (a decision is ~50 steps of ~10 ops on one or two rows, so an op
        # saved per step is worth more than its arithmetic); the rearranged weights are `cached`:
        # - rows hold their K branches side by side, (B, K·E), so one addmm gives x's projection plus every
        #   step's precomputed t_emb + c_emb + bias for all branches; viewed as (B·K, E) for the blocks;
        # - the weights are transposed to contiguous (in, out) once: addmm on them skips F.linear's transpose;
        # - guidance is linear in the last features, Σ_k w_k·(f_k·Wᵀ + b) = [w_1·Wᵀ; w_2·Wᵀ] applied to the
        #   (B, K·E) row, so the output layer and the guidance are one addmm.
        k, batch, width = c_emb.shape
        _check_branches(k, weights)
        w_in, blocks, norm, w_out, b_out = self.cached(("guided", tuple(weights)),
                                                       lambda: self._guided_weights(weights))
        steps = (t_embs[:, None, None, :] + c_emb.transpose(0, 1)[None] + self.in_proj.bias)  # (N, B, K, E)
        steps = steps.reshape(t_embs.shape[0], batch, k * width).unbind(0)  # N × (B, K·E)

        def guided(i: int, x: Tensor) -> Tensor:
            h = torch.addmm(steps[i], x, w_in).view(batch * k, width)
            for w, b in blocks:
                h = torch.addmm(h, F.silu(h), w).add_(b)  # h + SiLU(h)·Wᵀ + b
            return torch.addmm(b_out, F.silu(F.layer_norm(h, *norm)).view(batch, k * width), w_out)

        return guided

    def _guided_weights(self, weights: Sequence[float]) -> tuple[Tensor, list[tuple[Tensor, Tensor]], tuple, Tensor,
                                                                 Tensor]:
        """`guided_fn`'s weights: W_in copied per branch, transposed blocks, the norm, guidance-weighted W_out."""
        w_in = self.in_proj.weight.t().repeat(1, len(weights))  # (D, K·E)
        blocks = [(block.weight.t().contiguous(), block.bias.clone()) for block in self.blocks]
        norm = (self.out_norm.normalized_shape, self.out_norm.weight.clone(), self.out_norm.bias.clone(),
                self.out_norm.eps)
        w_out_t = self.out_proj.weight.t()
        w_out = torch.cat([w_out_t * w for w in weights])  # (K·E, D)
        return w_in, blocks, norm, w_out, self.out_proj.bias.clone()  # the weights sum to 1: b_out as it is


def _groups(channels: int) -> int:
    return math.gcd(8, channels)


class _Conv1d(nn.Conv1d):
    """nn.Conv1d (zero padding, any stride) computed as one matmul over unfolded windows (im2col).

    On sequences of a few dozen entries a convolution kernel call costs ~100 µs on a CPU whatever its size,
    two to four times this; the U-Net makes ~27 of them per step.
    """

    def forward(self, h: Tensor) -> Tensor:
        """(B, c_in, L) -> (B, c_out, L')."""
        (kernel,), (stride,), (pad,) = self.kernel_size, self.stride, self.padding
        windows = F.pad(h, (pad, pad)).unfold(2, kernel, stride)  # (B, c_in, L', kernel)
        out = F.linear(windows.transpose(1, 2).flatten(2), self.weight.flatten(1), self.bias)  # (B, L', c_out)
        return out.transpose(1, 2)


class _FiLMConvBlock(nn.Module):
    """h + conv(SiLU(GroupNorm(h)·(1 + scale) + shift)): a pre-activation residual conv block with FiLM."""

    def __init__(self, channels: int, kernel: int) -> None:
        super().__init__()
        self.norm = nn.GroupNorm(_groups(channels), channels)
        self.conv = _Conv1d(channels, channels, kernel, padding=kernel // 2)

    def forward(self, h: Tensor, scale: Tensor, shift: Tensor) -> Tensor:
        """h (B, c, P), scale and shift (B, c, 1) -> (B, c, P)."""
        return h + self.conv(F.silu(self.norm(h) * (1 + scale) + shift))


class UNet1DDenoiser(Denoiser):
    """1-D U-Net over the action vector as a one-channel sequence; FiLM conditioning from concat[e_τ, c].

    The vector is zero-padded to P, a multiple of 2**levels, and cropped back; levels = min(depth, ceil(log2 D))
    (at least 1), so a short vector is not halved below length one. Each level has one residual conv block on the
    way down (then a stride-2 conv) and one on the way up (after nearest upsampling and a conv), joined by additive
    skip connections; channels double per level from `channels` up to `max_channels`. On a CPU every convolution
    call costs tens of microseconds whatever its size, so the blocks hold one convolution each, skips are added
    rather than concatenated (no 1x1 merge convolution) and all FiLM parameters come from one linear layer.
    """

    def __init__(self, action_dim: int, cond_dim: int, hidden: int = 256, depth: int = 6, kernel: int = 3,
                 channels: int = 32, max_channels: int = 128, time_embed_dim: int = 128) -> None:
        super().__init__(action_dim, cond_dim, hidden, time_embed_dim)
        if kernel < 1 or kernel % 2 == 0:
            raise ValueError(f"kernel must be an odd integer >= 1, got {kernel}")
        self.levels = min(depth, max(1, math.ceil(math.log2(action_dim))))
        step = 2 ** self.levels
        self.padded_dim = -(-action_dim // step) * step  # P
        ch = [min(channels * 2 ** i, max(max_channels, channels)) for i in range(self.levels + 1)]
        pad = kernel // 2
        self.in_conv = _Conv1d(1, ch[0], kernel, padding=pad)
        # Convolutions are translation-equivariant, but position i is a fixed (layer, module): a learned
        # per-position embedding tells the network which adapter each entry is.
        self.position = nn.Parameter(0.02 * torch.randn(1, ch[0], self.padded_dim))
        self.down = nn.ModuleList(_FiLMConvBlock(ch[i], kernel) for i in range(self.levels))
        self.downsample = nn.ModuleList(_Conv1d(ch[i], ch[i + 1], kernel, stride=2, padding=pad)
                                        for i in range(self.levels))
        self.mid = _FiLMConvBlock(ch[-1], kernel)
        self.upsample = nn.ModuleList(_Conv1d(ch[i + 1], ch[i], kernel, padding=pad) for i in range(self.levels))
        self.up = nn.ModuleList(_FiLMConvBlock(ch[i], kernel) for i in range(self.levels))
        self.out = nn.Sequential(nn.GroupNorm(_groups(ch[0]), ch[0]), nn.SiLU(),
                                 _Conv1d(ch[0], 1, kernel, padding=pad))
        # FiLM (scale, shift) of every block in the order they run (down, mid, up), from concat[e_τ, c]
        self.film_channels = [*ch[: self.levels], ch[-1], *reversed(ch[: self.levels])]
        self.film = nn.Sequential(nn.Linear(2 * hidden, hidden), nn.SiLU(),
                                  nn.Linear(hidden, 2 * sum(self.film_channels)))

    def denoise(self, x: Tensor, t_emb: Tensor, c_emb: Tensor) -> Tensor:
        """x (..., D), t_emb (..., E), c_emb (..., E) -> (..., D); leading dims broadcast."""
        lead = torch.broadcast_shapes(x.shape[:-1], t_emb.shape[:-1], c_emb.shape[:-1])
        x = x.expand(*lead, x.shape[-1]).reshape(-1, 1, self.action_dim)  # (B', 1, D)
        t_emb = t_emb.expand(*lead, t_emb.shape[-1]).reshape(x.shape[0], -1)
        c_emb = c_emb.expand(*lead, c_emb.shape[-1]).reshape(x.shape[0], -1)
        film = self.film(torch.cat([t_emb, c_emb], dim=-1))[:, :, None]  # (B', 2·Σc, 1)
        scales_shifts = film.split([c for c in self.film_channels for _ in range(2)], dim=1)
        films = iter(zip(scales_shifts[::2], scales_shifts[1::2], strict=True))
        h = self.in_conv(F.pad(x, (0, self.padded_dim - self.action_dim))) + self.position  # (B', ch0, P)
        skips = []
        for block, down in zip(self.down, self.downsample, strict=True):
            h = block(h, *next(films))
            skips.append(h)
            h = down(h)  # length halves, channels grow
        h = self.mid(h, *next(films))
        for i in reversed(range(self.levels)):
            h = self.upsample[i](F.interpolate(h, scale_factor=2, mode="nearest")) + skips[i]
            h = self.up[i](h, *next(films))
        out = self.out(h)[:, 0, : self.action_dim]  # (B', D)
        return out.reshape(*lead, self.action_dim)
