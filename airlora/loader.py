"""Where a session's inputs come from: read for every run (``Loader``), or kept between the runs of one sweep worker
(``WarmCache``).

A sweep runs many runs of one model on one data source. Built from scratch, every run loads the model, reads and
parses the source, and tokenises and word-splits its splits again. A ``WarmCache`` lives in one worker process and
keeps:

- each model as ``from_pretrained`` left it, never trained; a run gets a deep copy with its own task head;
- each data source as read, keyed by the path, size and modification time of every file it reads;
- each tokenised split, keyed by a hash of its sentences and labels, the tokenizer's model, ``max_length`` and the
  vocabulary (so runs with the same seed, hence the same split, share one);
- each reference vocabulary (the tokenizer's whole words) or word-list file.

A run built from the cache is the run built without it, number for number. The one catch is the task head:
``from_pretrained`` draws it from the global RNG, which the run has just seeded. A copy of the pristine model gets its
head drawn again by transformers' own ``initialize_weights`` with only the head's parameters marked as not loaded,
which is the call ``from_pretrained`` makes, so it takes the same numbers from the same RNG. The first load of each
model checks this: it draws a copy's head under the RNG state the load started from and compares that head, and the
RNG state after, with the load's. Where either differs (another transformers release), that model is loaded from disk
for every run, as without the cache.
"""

from __future__ import annotations

import copy
import hashlib
import itertools
import json
from collections import Counter, OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from airlora.batching import EncodedSplit
from airlora.config import DataConfig
from airlora.data import Source, TextSplit, read_source, source_files
from airlora.models import Pretrained, load_model, load_pretrained, resolve_model_dir
from airlora.textstats import load_vocabulary, reference_vocabulary


class Loader:
    """Reads every input afresh for each session: what one ``airlora run`` does."""

    def model(self, name: str) -> tuple[nn.Module, Any, Path]:
        """(model, tokenizer, folder) of ``RunConfig.model``, as ``airlora.models.load_model``."""
        return load_model(name)

    def source(self, source: str) -> Source:
        """A data source as read (``airlora.data.read_source``); the caller must not change it."""
        return read_source(source)

    def vocabulary(self, data: DataConfig, tokenizer: Any) -> set[str]:
        """The word list of ``data.vocab_file``, else the tokenizer's whole-word tokens (for the OOV rate)."""
        return load_vocabulary(data.vocab_file) if data.vocab_file else reference_vocabulary(tokenizer)

    def encode(self, split: TextSplit, tokenizer: Any, max_length: int, vocabulary: set[str] | None) -> EncodedSplit:
        """``split`` tokenised and word-split; the caller must not change it."""
        return EncodedSplit(split, tokenizer, max_length, vocabulary)


@dataclass
class _Model:
    pristine: Pretrained
    """As ``from_pretrained`` left it; never handed out."""
    exact: bool
    """Whether a copy's head is drawn exactly as ``from_pretrained`` draws it (checked at the first load)."""


class WarmCache(Loader):
    """A worker's inputs kept between its runs (see the module docstring); ``counts`` says what was reused."""

    def __init__(self, max_models: int = 2, max_sources: int = 4, max_splits: int = 24) -> None:
        self.limits = {"models": max_models, "sources": max_sources, "splits": max_splits}
        """How many of each are kept, the least recently used dropped first (a pristine 1.3B model is 5 GB; a seed
        of a sweep has three splits)."""
        self.counts: Counter[str] = Counter()
        """model_loads, model_copies, source_reads, source_hits, encodes, encode_hits."""
        self._models: OrderedDict[tuple, _Model] = OrderedDict()
        self._sources: OrderedDict[tuple, Source] = OrderedDict()
        self._vocabularies: dict[tuple, set[str]] = {}
        self._encoded: OrderedDict[tuple, EncodedSplit] = OrderedDict()
        self._keys: dict[int, tuple] = {}
        """id() of a tokenizer or vocabulary this cache handed out -> the key it was made from. Entries are never
        dropped, so the objects stay alive and their ids are never reused."""
        self._alive: list[Any] = []

    def model(self, name: str) -> tuple[nn.Module, Any, Path]:
        path = resolve_model_dir(name)
        key = ("model", str(path.resolve()), _signature(sorted(p for p in path.iterdir() if p.is_file())))
        entry = self._models.get(key)
        if entry is None:
            before = torch.get_rng_state()
            loaded = load_pretrained(name)
            after = torch.get_rng_state()
            pristine = Pretrained(copy.deepcopy(loaded.model), loaded.tokenizer, loaded.path, loaded.new_keys)
            torch.set_rng_state(before)
            replay = dict(with_new_head(pristine).named_parameters())
            drawn = dict(loaded.model.named_parameters())
            exact = torch.equal(torch.get_rng_state(), after) and all(
                torch.equal(replay[k], drawn[k]) for k in loaded.new_keys if k in drawn)
            torch.set_rng_state(after)
            _keep(self._models, key, _Model(pristine, exact), self.limits["models"])
            self._remember(loaded.tokenizer, key)
            self.counts["model_loads"] += 1
            return loaded.model, loaded.tokenizer, loaded.path
        self._models.move_to_end(key)
        if not entry.exact:  # a copy would not be this run's model: load it as a run without the cache does
            self.counts["model_loads"] += 1
            return load_pretrained(name).model, entry.pristine.tokenizer, entry.pristine.path
        self.counts["model_copies"] += 1
        return with_new_head(entry.pristine), entry.pristine.tokenizer, entry.pristine.path

    def source(self, source: str) -> Source:
        files = source_files(source)
        if files is None:  # a dataset in the Hugging Face cache: its files are datasets' business
            self.counts["source_reads"] += 1
            return read_source(source)
        key = ("source", source, _signature(files))
        if key in self._sources:
            self.counts["source_hits"] += 1
            self._sources.move_to_end(key)
            return self._sources[key]
        read = read_source(source)
        for split in read[1].values():
            if split is not None:
                split.labels.flags.writeable = False  # shared between runs
        _keep(self._sources, key, read, self.limits["sources"])
        self.counts["source_reads"] += 1
        return read

    def vocabulary(self, data: DataConfig, tokenizer: Any) -> set[str]:
        if data.vocab_file:
            file = Path(data.vocab_file)
            key = ("vocabulary", str(file.resolve()), _signature([file])) if file.is_file() else None
        else:
            key = ("vocabulary", self._keys.get(id(tokenizer)))
            key = None if key[1] is None else key
        if key is None:  # not from this cache, or a missing file (whose error the plain load gives)
            return super().vocabulary(data, tokenizer)
        if key not in self._vocabularies:
            self._vocabularies[key] = super().vocabulary(data, tokenizer)
            self._remember(self._vocabularies[key], key)
        return self._vocabularies[key]

    def encode(self, split: TextSplit, tokenizer: Any, max_length: int, vocabulary: set[str] | None) -> EncodedSplit:
        tokenizer_key = self._keys.get(id(tokenizer))
        vocabulary_key = None if vocabulary is None else self._keys.get(id(vocabulary))
        if tokenizer_key is None or (vocabulary is not None and vocabulary_key is None):
            return super().encode(split, tokenizer, max_length, vocabulary)
        key = (tokenizer_key, max_length, vocabulary_key, split_digest(split))
        if key in self._encoded:
            self.counts["encode_hits"] += 1
            self._encoded.move_to_end(key)
            return self._encoded[key]
        encoded = super().encode(split, tokenizer, max_length, vocabulary)
        _keep(self._encoded, key, encoded, self.limits["splits"])
        self.counts["encodes"] += 1
        return encoded

    def _remember(self, handed_out: Any, key: tuple) -> None:
        """Key what this cache handed out by its id; holding it keeps the id from being reused by another object."""
        self._keys[id(handed_out)] = key
        self._alive.append(handed_out)


def _keep(store: OrderedDict, key: tuple, value: Any, limit: int) -> None:
    """Put ``value`` in ``store`` as the most recent, dropping the least recently used beyond ``limit``."""
    store[key] = value
    store.move_to_end(key)
    while len(store) > limit:
        store.popitem(last=False)


def with_new_head(pretrained: Pretrained) -> nn.Module:
    """A deep copy of ``pretrained.model`` whose ``new_keys`` are drawn again, as ``from_pretrained`` drew them: its
    ``initialize_weights`` re-initialises exactly the tensors not marked ``_is_hf_initialized``."""
    model = copy.deepcopy(pretrained.model)
    for name, tensor in itertools.chain(model.named_parameters(), model.named_buffers()):
        tensor._is_hf_initialized = name not in pretrained.new_keys
    for module in model.modules():
        module.__dict__.pop("_is_hf_initialized", None)
    model.initialize_weights()
    return model


def split_digest(split: TextSplit) -> str:
    """A hash of a split's sentences and labels, in order."""
    digest = hashlib.blake2b(json.dumps(split.sentences).encode(), digest_size=16)
    digest.update(split.labels.astype("<i8").tobytes())
    return digest.hexdigest()


def _signature(files: list[Path]) -> tuple[tuple[str, int, int], ...]:
    """Path, size and modification time of each file: a file rewritten since has another signature."""
    out = []
    for file in files:
        stat = file.stat()
        out.append((str(file), stat.st_size, stat.st_mtime_ns))
    return tuple(out)
