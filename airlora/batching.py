"""Batches for training and evaluation: each split tokenised and word-split once, then dynamic padding.

A training batch is a pure function of (seed, step); each batch carries the data complexity of its sentences
(normalised lexical entropy H and word-level OOV rate ρ), the data part of the policy's state.
Shapes: B batch size, L longest tokenised sentence in the batch.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from airlora.data import TextSplit
from airlora.errors import AirloraError
from airlora.textstats import entropy_from_counts, normalise_entropy, words


@dataclass
class Batch:
    """One padded batch and the data complexity of its sentences."""

    inputs: dict[str, torch.Tensor]
    """input_ids, attention_mask (and token_type_ids if the tokenizer makes them), each (B, L) int64."""
    labels: torch.Tensor
    """(B,) int64 labels."""
    lexical_entropy: float
    """Normalised lexical entropy H / ln(n) of the batch's n words."""
    oov_rate: float
    """Share of the batch's words outside the reference vocabulary (NaN when no vocabulary was given)."""
    indices: np.ndarray
    """(B,) positions of the examples in their split, to put predictions back in order."""

    def to(self, device: torch.device | str) -> Batch:
        """The same batch with its tensors on ``device``."""
        inputs = {k: v.to(device, non_blocking=True) for k, v in self.inputs.items()}
        return Batch(inputs, self.labels.to(device, non_blocking=True), self.lexical_entropy, self.oov_rate,
                     self.indices)


def ensure_pad_token(tokenizer: Any) -> int:
    """The tokenizer's pad id; tokenizers without one (Llama, some BPE models) get pad_token = eos_token, in place."""
    if tokenizer.pad_token_id is None:
        if tokenizer.eos_token is None:
            raise AirloraError("the model's tokenizer has neither a pad token nor an eos token to pad with")
        # Padding positions are masked out, so reusing eos is safe; the model's config.pad_token_id must be set to
        # the same id where sequence classifiers use it to find the last real token (OPT, Llama).
        tokenizer.pad_token = tokenizer.eos_token
    return int(tokenizer.pad_token_id)


class EncodedSplit:
    """A split tokenised and split into words once: flat arrays plus row offsets, so a batch is only slicing.

    Nothing changes it after it is built, so runs may share one (``airlora.loader.WarmCache``)."""

    def __init__(self, split: TextSplit, tokenizer: Any, max_length: int, vocabulary: set[str] | None):
        self.pad_id = ensure_pad_token(tokenizer)
        self.pad_type_id = int(getattr(tokenizer, "pad_token_type_id", 0) or 0)
        self.left_padding = tokenizer.padding_side == "left"
        encoded = tokenizer(list(split.sentences), truncation=True, max_length=max_length, return_attention_mask=False)
        self.lengths = np.array([len(ids) for ids in encoded["input_ids"]], dtype=np.int64)
        self.offsets = np.concatenate([[0], np.cumsum(self.lengths)])
        self.ids = np.fromiter(itertools.chain.from_iterable(encoded["input_ids"]), np.int64, int(self.offsets[-1]))
        self.type_ids = None
        if "token_type_ids" in encoded:
            flat = itertools.chain.from_iterable(encoded["token_type_ids"])
            self.type_ids = np.fromiter(flat, np.int64, int(self.offsets[-1]))
        word_index: dict[str, int] = {}
        per_sentence = [[word_index.setdefault(w, len(word_index)) for w in words(s)] for s in split.sentences]
        self.word_offsets = np.concatenate([[0], np.cumsum([len(ws) for ws in per_sentence])])
        self.word_ids = np.fromiter(itertools.chain.from_iterable(per_sentence), np.int64, int(self.word_offsets[-1]))
        self.word_is_oov = None if vocabulary is None else np.array([w not in vocabulary for w in word_index], bool)
        self.labels = torch.from_numpy(np.array(split.labels, dtype=np.int64))  # a copy: the split's may be read-only
        for array in (self.lengths, self.offsets, self.ids, self.type_ids, self.word_offsets, self.word_ids,
                      self.word_is_oov):
            if array is not None:
                array.flags.writeable = False  # shared between runs: a write would be a bug, so it raises

    def __len__(self) -> int:
        return len(self.lengths)

    def collate(self, rows: np.ndarray) -> Batch:
        """Pad the examples at ``rows`` to the longest of them, on the tokenizer's padding side."""
        lengths = self.lengths[rows]
        width = max(int(lengths.max()), 1)
        input_ids = np.full((len(rows), width), self.pad_id, dtype=np.int64)  # (B, L)
        mask = np.zeros((len(rows), width), dtype=np.int64)  # (B, L)
        type_ids = None if self.type_ids is None else np.full((len(rows), width), self.pad_type_id, dtype=np.int64)
        for i, (row, n) in enumerate(zip(rows, lengths, strict=True)):
            cols = slice(width - n, width) if self.left_padding else slice(0, n)
            tokens = slice(self.offsets[row], self.offsets[row + 1])
            input_ids[i, cols], mask[i, cols] = self.ids[tokens], 1
            if type_ids is not None:
                type_ids[i, cols] = self.type_ids[tokens]
        inputs = {"input_ids": torch.from_numpy(input_ids), "attention_mask": torch.from_numpy(mask)}
        if type_ids is not None:
            inputs["token_type_ids"] = torch.from_numpy(type_ids)
        batch_words = np.concatenate([self.word_ids[self.word_offsets[r]:self.word_offsets[r + 1]] for r in rows])
        entropy = entropy_from_counts(np.unique(batch_words, return_counts=True)[1])
        if self.word_is_oov is None:
            oov = float("nan")
        else:
            oov = float(self.word_is_oov[batch_words].mean()) if len(batch_words) else 0.0
        return Batch(inputs, self.labels[torch.from_numpy(rows)], normalise_entropy(entropy, len(batch_words)), oov,
                     rows)


class TrainBatches:
    """Training batches as a pure function of (seed, step), so a resumed run sees exactly the same batches.

    Example position p = step·B + i belongs to epoch p // N and is example order_epoch[p mod N]: every example
    appears exactly once per epoch, and a batch that straddles an epoch boundary takes its tail from the next
    epoch's order. order_epoch is a permutation drawn from ``np.random.default_rng([seed, epoch])``, then
    length-bucketed: cut into chunks of ``bucket_batches``·B examples, each chunk sorted by token length and its
    batches put back in a random order. Batches then hold sentences of similar length and need little padding
    (dynamic padding pads to the longest in the batch), while which examples meet in a chunk stays random.
    """

    def __init__(self, encoded: EncodedSplit, batch_size: int, seed: int, bucket_batches: int = 1):
        if len(encoded) == 0:
            raise ValueError("TrainBatches needs a non-empty split")
        self.batch_size, self.seed, self.bucket_batches = batch_size, seed, bucket_batches
        self._encoded = encoded
        self._permutations: dict[int, np.ndarray] = {}

    def __len__(self) -> int:
        """Number of training examples N."""
        return len(self._encoded)

    def _permutation(self, epoch: int) -> np.ndarray:
        if epoch not in self._permutations:
            if len(self._permutations) >= 2:  # consecutive steps touch at most two epochs
                self._permutations.pop(min(self._permutations))
            rng = np.random.default_rng([self.seed, epoch])
            order = rng.permutation(len(self))
            if self.bucket_batches > 1:
                order = self._bucketed(order, rng)
            self._permutations[epoch] = order
        return self._permutations[epoch]

    def _bucketed(self, order: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """Sort each chunk of ``bucket_batches`` batches by length, then shuffle the batches within it."""
        b, chunk = self.batch_size, self.batch_size * self.bucket_batches
        out = []
        for start in range(0, len(order), chunk):
            rows = order[start:start + chunk]
            rows = rows[np.argsort(self._encoded.lengths[rows], kind="stable")]
            batches = [rows[i:i + b] for i in range(0, len(rows), b)]
            out += [batches[i] for i in rng.permutation(len(batches))]
        return np.concatenate(out)

    def batch(self, step: int) -> Batch:
        """The batch of training step ``step`` (0-based)."""
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        positions = step * self.batch_size + np.arange(self.batch_size)
        epochs = positions // len(self)
        rows = np.empty(self.batch_size, dtype=np.int64)
        for epoch in np.unique(epochs):
            here = epochs == epoch
            rows[here] = self._permutation(int(epoch))[positions[here] % len(self)]
        return self._encoded.collate(rows)


    def probe(self, size: int, batch_size: int) -> list[Batch]:
        """The probe set: a fixed, seeded draw of ``size`` training examples (all of them if fewer), in length-sorted
        batches of ``batch_size``; the same whatever the step, so two deliveries measured on it are paired."""
        # a stream of its own: [seed, epoch] draws the training order, and the probe must not depend on the epoch
        rows = np.random.default_rng([self.seed, PROBE_STREAM]).permutation(len(self))[:size]
        rows = rows[np.argsort(self._encoded.lengths[rows], kind="stable")]
        return [self._encoded.collate(rows[i:i + batch_size]) for i in range(0, len(rows), batch_size)]


PROBE_STREAM = 0x70726F62  # "prob"


def eval_batches(encoded: EncodedSplit, batch_size: int) -> list[Batch]:
    """Validation/test batches sorted by token length to cut padding; ``Batch.indices`` restores the split order.

    Build them once per split and reuse the list for every evaluation.
    """
    order = np.argsort(encoded.lengths, kind="stable")
    return [encoded.collate(order[start:start + batch_size]) for start in range(0, len(order), batch_size)]
