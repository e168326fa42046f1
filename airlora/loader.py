"""Where a session's inputs come from: read for every run (``Loader``), or kept between the runs of one sweep worker
(``WarmCache``).

A sweep runs many runs of one model on one data source. Built from scratch, every run reads and parses the source,
tokenises and word-splits its splits, and loads the tokenizer again. A ``WarmCache`` lives in one worker process and
keeps, each under a key of what it is made from:

- each data source as read, keyed by the path, size and modification time of every file it reads;
- each tokenizer, and each reference vocabulary (its whole words) or word-list file, keyed the same way;
- each tokenised split, keyed by a hash of its sentences and labels, the tokenizer, ``max_length`` and the
  vocabulary (so the runs of one seed, which have the same splits, share them).

The model itself is loaded by ``from_pretrained`` for every run, on purpose. Its safetensors file is memory-mapped
and, after the first run, in the OS page cache: a second load took 0.06 s for MiniLM and 0.07 s for a model of
OPT-1.3B's shape in fp16, against 0.2 s and 1.3–13 s (one thread) for a deep copy of a model kept in memory
(bench/startup.py). A kept copy would also cost every worker a second model's worth of memory. Loading per run draws
the task head from the run's own seeded RNG exactly as a run without the cache does, so a run's numbers do not depend
on the cache, the worker or the runs before it.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter, OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Any

from torch import nn

from airlora.batching import EncodedSplit
from airlora.config import DataConfig
from airlora.data import Source, TextSplit, read_source, source_files
from airlora.models import load_model, load_task_model, load_tokenizer, resolve_model_dir
from airlora.textstats import load_vocabulary, reference_vocabulary


class Loader:
    """Reads every input afresh for each session: what one ``airlora run`` does."""

    def model(self, name: str, num_labels: int = 2, data: DataConfig | None = None) -> tuple[nn.Module, Any, Path]:
        """(model, tokenizer, folder) of ``RunConfig.model`` with a ``num_labels``-way head, as
        ``airlora.models.load_model`` (a causal LM scoring label words when ``data.label_words`` is set)."""
        words = None if data is None else data.label_words
        return load_model(name, num_labels, label_words=words,
                          prompt=data.prompt if data is not None else "{sentence}")

    def source(self, source: str) -> Source:
        """A data source as read (``airlora.data.read_source``); the caller must not change it."""
        return read_source(source)

    def vocabulary(self, data: DataConfig, tokenizer: Any) -> set[str]:
        """The word list of ``data.vocab_file``, else the tokenizer's whole-word tokens (for the OOV rate); the caller
        must not change it."""
        return load_vocabulary(data.vocab_file) if data.vocab_file else reference_vocabulary(tokenizer)

    def encode(self, split: TextSplit, tokenizer: Any, max_length: int, vocabulary: set[str] | None) -> EncodedSplit:
        """``split`` tokenised and word-split; the caller must not change it."""
        return EncodedSplit(split, tokenizer, max_length, vocabulary)


class WarmCache(Loader):
    """A worker's inputs kept between its runs (see the module docstring); ``counts`` says what was reused."""

    def __init__(self, max_tokenizers: int = 4, max_sources: int = 4, max_vocabularies: int = 4,
                 max_splits: int = 24) -> None:
        self.counts: Counter[str] = Counter()
        """model_loads, tokenizer_loads, tokenizer_hits, source_reads, source_hits, encodes, encode_hits."""
        self._tokenizers = _Kept(max_tokenizers)
        self._sources = _Kept(max_sources)
        self._vocabularies = _Kept(max_vocabularies)
        self._encoded = _Kept(max_splits)
        """A seed of a sweep has three splits."""
        self._keys: dict[int, tuple] = {}
        """id() of a tokenizer or vocabulary this cache holds -> its key. An id is dropped with its object, so an id
        reused by a later object is never taken for it."""

    def model(self, name: str, num_labels: int = 2, data: DataConfig | None = None) -> tuple[nn.Module, Any, Path]:
        """A freshly loaded model (from the page cache after the first run) with the kept tokenizer."""
        path = resolve_model_dir(name)
        words = None if data is None else data.label_words
        lm = words is not None  # a causal LM's tokenizer truncates on the left: kept apart from a classifier's
        key = ("model", str(path.resolve()), _signature(sorted(p for p in path.iterdir() if p.is_file())), lm)
        tokenizer = self._tokenizers.get(key)
        if tokenizer is None:
            tokenizer = load_tokenizer(path, lm)
            self._tokenizers.put(key, tokenizer, self._forget)
            self._keys[id(tokenizer)] = key
            self.counts["tokenizer_loads"] += 1
        else:
            self.counts["tokenizer_hits"] += 1
        self.counts["model_loads"] += 1
        prompt = data.prompt if data is not None else "{sentence}"
        return load_task_model(path, tokenizer, num_labels, label_words=words, prompt=prompt), tokenizer, path

    def source(self, source: str) -> Source:
        """The source as read before, unless one of its files changed since."""
        files = source_files(source)
        if files is None:  # a dataset in the Hugging Face cache: its files are datasets' business
            self.counts["source_reads"] += 1
            return read_source(source)
        key = ("source", source, _signature(files))
        read = self._sources.get(key)
        if read is not None:
            self.counts["source_hits"] += 1
            return read
        read = read_source(source)
        for split in read[1].values():
            if split is not None:
                split.labels.flags.writeable = False  # shared between runs
        self._sources.put(key, read)
        self.counts["source_reads"] += 1
        return read

    def vocabulary(self, data: DataConfig, tokenizer: Any) -> set[str]:
        """The vocabulary made before from the same word-list file or tokenizer."""
        if data.vocab_file:
            file = Path(data.vocab_file)
            key = ("vocabulary", str(file.resolve()), _signature([file])) if file.is_file() else None
        else:
            model_key = self._keys.get(id(tokenizer))
            key = None if model_key is None else ("vocabulary", model_key)
        if key is None:  # not a tokenizer of this cache, or a missing file (whose error the plain load gives)
            return super().vocabulary(data, tokenizer)
        vocabulary = self._vocabularies.get(key)
        if vocabulary is None:
            vocabulary = super().vocabulary(data, tokenizer)
            self._vocabularies.put(key, vocabulary, self._forget)
            self._keys[id(vocabulary)] = key
        return vocabulary

    def encode(self, split: TextSplit, tokenizer: Any, max_length: int, vocabulary: set[str] | None) -> EncodedSplit:
        """The split as tokenised before for the same sentences, labels, tokenizer, max_length and vocabulary."""
        tokenizer_key = self._keys.get(id(tokenizer))
        vocabulary_key = None if vocabulary is None else self._keys.get(id(vocabulary))
        if tokenizer_key is None or (vocabulary is not None and vocabulary_key is None):
            return super().encode(split, tokenizer, max_length, vocabulary)
        key = (tokenizer_key, max_length, vocabulary_key, split_digest(split))
        encoded = self._encoded.get(key)
        if encoded is not None:
            self.counts["encode_hits"] += 1
            return encoded
        encoded = super().encode(split, tokenizer, max_length, vocabulary)
        self._encoded.put(key, encoded)
        self.counts["encodes"] += 1
        return encoded

    def _forget(self, dropped: Any) -> None:
        self._keys.pop(id(dropped), None)


class _Kept:
    """At most ``limit`` values by key, the least recently used dropped first."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._values: OrderedDict[tuple, Any] = OrderedDict()

    def get(self, key: tuple) -> Any:
        if key in self._values:
            self._values.move_to_end(key)
        return self._values.get(key)

    def put(self, key: tuple, value: Any, on_drop: Callable[[Any], None] | None = None) -> None:
        self._values[key] = value
        self._values.move_to_end(key)
        while len(self._values) > self.limit:
            _, dropped = self._values.popitem(last=False)
            if on_drop is not None:
                on_drop(dropped)


def split_digest(split: TextSplit) -> str:
    """A hash of a split's sentences and labels, in order."""
    digest = hashlib.blake2b(json.dumps(split.sentences).encode(), digest_size=16)
    digest.update(split.labels.astype("<i8").tobytes())
    return digest.hexdigest()


def _signature(files: list[Path]) -> tuple[tuple[str, int, int], ...]:
    """Path, size and modification time of each file: a file rewritten since has another signature."""
    return tuple((str(file), (stat := file.stat()).st_size, stat.st_mtime_ns) for file in files)
