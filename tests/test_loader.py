"""A sweep worker's WarmCache: a run built from it is the run built from disk, and it reuses what it says it does."""

import csv
import json
import os
import time
import warnings

import pytest
import torch
from transformers import AutoModelForSequenceClassification

from airlora.config import merge
from airlora.loader import Loader, WarmCache
from airlora.runner import run
from airlora.session import build_session, seed_everything
from tests.tiny_models import save_tiny

pytestmark = pytest.mark.integration  # end-to-end on the tiny model: see pyproject.toml

TIMING = {"wall_s", "setup_s", "train_s", "eval_s", "mean_step_s", "mean_decision_s", "decision_overhead_ratio",
          "mean_apply_s", "mean_update_s", "policy_decision_ms", "mean_probe_s", "probe_overhead_ratio"}
TIMING_COLUMNS = {"step_s", "decision_s", "apply_s", "update_s", "probe_s", "rss_mb"}


def save_headless(family, folder):
    """A tiny checkpoint of ``family`` without a task head (as a pretrained encoder ships): loading it as a
    classifier draws the head from the global RNG."""
    save_tiny(family, folder)
    full = AutoModelForSequenceClassification.from_pretrained(folder)
    getattr(full, full.base_model_prefix).save_pretrained(folder)
    return folder


def model_state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.fixture(scope="module")
def headless(tmp_path_factory):
    root = tmp_path_factory.mktemp("headless")
    return {family: save_headless(family, root / family) for family in ("bert", "opt", "llama")}


@pytest.mark.parametrize("family", ["bert", "opt", "llama", "minilm"])
def test_a_model_from_the_cache_is_the_model_a_run_loads_for_its_seed(family, headless):
    name = "minilm" if family == "minilm" else str(headless[family])
    cache = WarmCache()
    seed_everything(99)
    first, tokenizer, _ = cache.model(name)  # the first load, under another seed
    for seed in (3, 7):
        seed_everything(seed)
        fresh = model_state(Loader().model(name)[0])
        rng_fresh = torch.get_rng_state()
        seed_everything(seed)
        model, again, _ = cache.model(name)
        assert torch.equal(torch.get_rng_state(), rng_fresh)  # what the run draws next is the same too
        cached = model_state(model)
        assert fresh.keys() == cached.keys() and all(torch.equal(fresh[k], cached[k]) for k in fresh)
        assert model is not first and again is tokenizer  # a model of its own; the tokenizer kept
    assert cache.counts["tokenizer_loads"] == 1 and cache.counts["tokenizer_hits"] == 2


def comparable(out):
    summary = {k: v for k, v in json.loads((out / "summary.json").read_text()).items() if k not in TIMING}
    with (out / "metrics.csv").open(newline="") as handle:
        rows = [{k: v for k, v in row.items() if k not in TIMING_COLUMNS} for row in csv.DictReader(handle)]
    return summary, rows, (out / "ranks.csv").read_text()


@pytest.mark.parametrize("allocator", ["heuristic", "airllm"])
def test_a_run_from_a_warm_worker_equals_a_run_from_disk(tiny_config, tmp_path, allocator):
    config = merge(tiny_config, {"allocator": allocator, "train.report_to": "none"})
    run(config, tmp_path / "cold")
    cache = WarmCache()
    for seed, other in ((1, "random"), (42, "uniform")):  # the worker has run others first, one with this seed
        run(merge(config, {"train.seed": seed, "allocator": other}), tmp_path / f"before-{seed}", loader=cache)
    run(config, tmp_path / "warm", loader=cache)
    assert comparable(tmp_path / "warm") == comparable(tmp_path / "cold")
    assert cache.counts["tokenizer_loads"] == 1 and cache.counts["source_reads"] == 1
    assert cache.counts["encode_hits"] == 3  # this seed's three splits, tokenised by the run before


def test_the_cache_follows_the_files(tiny_config, tmp_path):
    data = tmp_path / "data.csv"
    data.write_text("sentence,label\n" + "".join(f"the movie was {'good' if i % 2 else 'bad'},{i % 2}\n"
                                                 for i in range(60)))
    config = merge(tiny_config, {"data.source": str(data)})
    cache = WarmCache()
    first = build_session(config, cache)
    assert build_session(config, cache).splits.train.sentences == first.splits.train.sentences
    assert cache.counts["source_reads"] == 1 and cache.counts["source_hits"] == 1
    data.write_text(data.read_text().replace("movie", "film"))  # same size: the modification time tells
    os.utime(data, ns=(time.time_ns(), time.time_ns() + 10**9))
    changed = build_session(config, cache)
    assert cache.counts["source_reads"] == 2
    assert all("film" in s for s in changed.splits.train.sentences)


def test_shared_arrays_refuse_writes(tiny_config):
    cache = WarmCache()
    session = build_session(tiny_config, cache)
    with pytest.raises(ValueError, match="read-only"):
        session.train_batches._encoded.ids[0] = 1
    with pytest.raises(ValueError, match="read-only"):
        cache.source(tiny_config.data.source)[1]["train"].labels[0] = 1


def test_a_source_with_its_own_splits_and_other_settings_through_the_cache(tiny_files, tiny_config, tmp_path):
    """A GLUE folder's dev split goes to every session as the same object; max_length and the word list are keys."""
    glue = tmp_path / "glue"
    glue.mkdir()
    rows = [f"the movie was {'good' if i % 2 else 'bad'}\t{i % 2}\n" for i in range(40)]
    (glue / "train.tsv").write_text("sentence\tlabel\n" + "".join(rows))
    (glue / "dev.tsv").write_text("sentence\tlabel\n" + "".join(rows[:12]))
    words = tmp_path / "words.txt"
    words.write_text("the\nmovie\n")
    config = merge(tiny_config, {"data.source": str(glue), "data.val_size": 8})
    cache = WarmCache()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a read-only label array must not reach torch.as_tensor
        a = build_session(config, cache)
        b = build_session(merge(config, {"data.max_length": 8}), cache)
        c = build_session(merge(config, {"data.vocab_file": str(words)}), cache)
    assert a.splits.test is b.splits.test  # the kept source's own split
    # other max_length: three new encodings; another word list: a new train split only (evaluation has no OOV)
    assert cache.counts["encodes"] == 7 and cache.counts["encode_hits"] == 2
    assert max(len(x) for batch in b.test_batches for x in batch.inputs["input_ids"]) <= 8
    plain = build_session(merge(config, {"data.vocab_file": str(words)}))
    assert [c.train_batches.batch(i).oov_rate for i in range(3)] == [plain.train_batches.batch(i).oov_rate
                                                                     for i in range(3)]


def test_kept_values_are_dropped_least_recent_first_and_their_ids_forgotten(tiny_config):
    cache = WarmCache(max_splits=2)
    session = build_session(tiny_config, cache)  # train, validation, test: the train split is dropped
    length = tiny_config.data.max_length
    cache.encode(session.splits.test, session.tokenizer, length, None)
    assert cache.counts["encodes"] == 3 and cache.counts["encode_hits"] == 1
    cache.encode(session.splits.train, session.tokenizer, length, session.vocabulary)
    assert cache.counts["encodes"] == 4
    small = WarmCache(max_tokenizers=1)
    first = small.model(tiny_config.model)[1]
    other = small.model("minilm")[1]  # the tiny model's tokenizer is dropped, and with it its key
    assert id(first) not in small._keys and id(other) in small._keys
    del session
