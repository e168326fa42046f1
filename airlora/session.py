"""Everything a run needs, built once from a RunConfig: model with adapters, data, channel, allocator."""

from __future__ import annotations

import random
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from airlora import distributed
from airlora.adapters import AdapterSet
from airlora.allocators import Allocator, make_allocator
from airlora.batching import Batch, TrainBatches, eval_batches
from airlora.bundle import overhead_bound_bytes
from airlora.channel import Budget, SnrSchedule, capacity_bps, scale_matched_bandwidth_hz
from airlora.codecs import codec
from airlora.config import RunConfig
from airlora.data import Splits, TextSplit, make_splits
from airlora.dropout import use_fast_dropout
from airlora.errors import AirloraError
from airlora.loader import Loader
from airlora.models import ModuleMap, count_parameters, head_parameters, resolve_modules


def seed_everything(seed: int) -> None:
    """The one place global RNGs are seeded; sampling code takes explicit generators."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def resolve_device(name: str) -> torch.device:
    """'auto' picks CUDA when it is there; asking for CUDA on a machine without it is a clear error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise AirloraError(f"train.device = {name!r} but this machine has no CUDA device; use 'auto' or 'cpu'")
    return torch.device(name)


@dataclass
class Session:
    """The parts of one run, ready for the training loop."""

    config: RunConfig
    model: nn.Module
    tokenizer: object
    model_dir: Path
    module_map: ModuleMap
    adapters: AdapterSet
    head: dict[str, nn.Parameter]
    splits: Splits
    vocabulary: set[str]
    train_batches: TrainBatches
    val_batches: list[Batch]
    test_batches: list[Batch]
    bandwidth_hz: float
    bandwidth_is_scale_matched: bool
    snr: SnrSchedule
    allocator: Allocator
    device: torch.device
    _budgets: dict[tuple[float, float, tuple[int, ...]], Budget] = field(default_factory=dict, repr=False)
    _overhead_bytes: int | None = field(default=None, repr=False)
    _probe_batches: list[Batch] | None = field(default=None, repr=False)

    @property
    def head_params(self) -> int:
        """Parameters of the task head, delivered in full with the adapter."""
        return count_parameters(self.head)

    @property
    def head_bits(self) -> int:
        """The task head's precision: the highest allowed (``channel.bits``)."""
        return self.config.channel.bits_per_param

    @property
    def head_on_air_bits(self) -> int:
        """Bits of the task head at its codec (exact)."""
        c = codec(self.head_bits)
        return sum(c.tensor_bits(tuple(p.shape)) for p in self.head.values())

    @property
    def overhead_bytes(self) -> int:
        """The bytes reserved for the delivery's header, config and manifest (``bundle.overhead_bound_bytes``)."""
        if self._overhead_bytes is None:
            cfg = self.config
            self._overhead_bytes = overhead_bound_bytes(
                self.module_map.names, self.module_map.shapes, {n: tuple(p.shape) for n, p in self.head.items()},
                cfg.channel.bits, cfg.adapter.r_max, cfg.adapter.alpha / cfg.adapter.r_max, str(self.model_dir),
                cfg.train.steps, self.splits.num_labels)
        return self._overhead_bytes

    def budget(self, snr_db: float, t_max_s: float | None = None, bits: tuple[int, ...] | None = None) -> Budget:
        """The airtime budget at ``snr_db``: every module's bits per codec, the head and the overhead reserved first;
        built once per SNR value. ``t_max_s`` and ``bits`` (default the run's) give another latency budget or
        another set of allowed precisions (``train.deliver_t_max_s``); the head stays at the run's highest."""
        ch = self.config.channel
        key = (snr_db, ch.t_max_s if t_max_s is None else t_max_s, ch.bits if bits is None else tuple(sorted(bits)))
        if key in self._budgets:
            return self._budgets[key]
        budget = self._budgets[key] = Budget.for_delivery(
            self.module_map.shapes,
            r_max=self.config.adapter.r_max,
            allowed_bits=key[2],
            capacity_bps=capacity_bps(snr_db, ch, self.bandwidth_hz),
            t_max_s=key[1],
            reserved_params=self.head_params,
            reserved_bits=self.head_on_air_bits + 8 * self.overhead_bytes,
        )
        return budget

    @property
    def probe_batches(self) -> list[Batch]:
        """The probe set of the ``delivery`` regime (``train.probe_examples`` training examples, fixed and seeded),
        built on first use."""
        if self._probe_batches is None:
            self._probe_batches = self.train_batches.probe(self.config.train.probe_examples,
                                                           self.config.data.eval_batch_size)
        return self._probe_batches

    def as_delivered(self, ranks: dict[str, int], precisions: dict[str, int] | None) -> AbstractContextManager[None]:
        """Context in which the model is what the edge gets at these ranks and precisions (``AdapterSet.as_delivered``,
        the head at its codec too)."""
        return self.adapters.as_delivered(ranks, precisions, self.head, self.head_bits)

    def autocast(self) -> torch.autocast:
        """The context of every forward pass: bf16 autocast when ``train.autocast`` asks for it, else a no-op."""
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.config.train.autocast == "bf16")

    def paper_params(self, ranks: dict[str, int]) -> int:
        """The paper's count Σ r·(2·d_h + 1) plus the head (exact only for square matrices)."""
        return sum(r * (2 * self.module_map.hidden_size + 1) for r in ranks.values()) + self.head_params


def build_session(config: RunConfig, loader: Loader | None = None) -> Session:
    """Load and wire up every part of a run; errors in any input surface here, before training.

    ``loader``: where the model, data and tokenised splits come from (``airlora.loader``; a sweep worker passes its
    ``WarmCache``); by default they are read afresh. The session is the same either way.
    """
    loader = loader or Loader()
    torch.set_num_threads(config.train.threads or distributed.default_threads())
    seed = config.train.seed
    data = config.data
    # the data first: the head is sized by its classes (and a bad data file fails before a model is read); the splits
    # draw from generators of their own, so the global RNG the head is drawn from is as it was
    splits = make_splits(loader.source(data.source), data, seed)
    seed_everything(seed)
    model, tokenizer, model_dir = loader.model(config.model, splits.num_labels, config.data)
    module_map = resolve_modules(model, config.adapter.target_modules)
    adapters = AdapterSet.inject(model, module_map, config.adapter, seed)
    if config.train.fast_dropout:
        use_fast_dropout(model)
    device = resolve_device(config.train.device)
    if config.train.autocast == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise AirloraError("train.autocast = 'bf16' but this GPU has no bfloat16 support; use 'off'")
    head = head_parameters(model, module_map)
    for p in head.values():
        p.requires_grad_(True)
    distributed.place(model, device, config.train.distributed)  # after the head is trainable: fsdp shards the rest

    vocabulary = loader.vocabulary(data, tokenizer)
    train_batches = TrainBatches(loader.encode(splits.train, tokenizer, data.max_length, vocabulary), data.batch_size,
                                 seed, data.bucket_batches)
    validation = validation_subset(splits.validation, data.val_subset, seed)
    val_batches = eval_batches(loader.encode(validation, tokenizer, data.max_length, None), data.eval_batch_size)
    test_batches = eval_batches(loader.encode(splits.test, tokenizer, data.max_length, None), data.eval_batch_size)

    scale_matched = config.channel.bandwidth_hz is None
    bandwidth = scale_matched_bandwidth_hz(module_map.shapes) if scale_matched else config.channel.bandwidth_hz
    return Session(
        config=config, model=model, tokenizer=tokenizer, model_dir=model_dir, module_map=module_map,
        adapters=adapters, head=head, splits=splits, vocabulary=vocabulary, train_batches=train_batches,
        val_batches=val_batches, test_batches=test_batches, bandwidth_hz=float(bandwidth),
        bandwidth_is_scale_matched=scale_matched, snr=SnrSchedule(config.channel, seed),
        allocator=make_allocator(config), device=device,
    )


VALIDATION_SUBSET_STREAM = 0x76616C  # "val"


def validation_subset(split: TextSplit, size: int | None, seed: int) -> TextSplit:
    """The examples every validation pass uses: ``data.val_subset`` of the validation split, a seeded draw (the same
    at every pass, so checkpoints are compared on the same examples), or all of it."""
    if size is None or size >= len(split):
        return split
    # a stream of its own: not the global RNG, and not [seed, k], which the training batches' epoch k draws from
    rows = np.random.default_rng([seed, VALIDATION_SUBSET_STREAM]).permutation(len(split))[:size]
    return split.take(np.sort(rows))


def resolved_config(session: Session) -> dict[str, Any]:
    """The config as run, with derived values (model folder, bandwidth actually used) filled in."""
    data = session.config.to_dict()
    data["resolved"] = {
        "model_dir": str(session.model_dir),
        "bandwidth_hz": session.bandwidth_hz,
        "bandwidth_is_scale_matched": session.bandwidth_is_scale_matched,
        "architecture_family": session.module_map.family,
        "num_layers": session.module_map.num_layers,
        "dataset_sizes": session.splits.sizes(),
        "num_labels": session.splits.num_labels,
    }
    return data
