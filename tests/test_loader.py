"""A sweep worker's WarmCache: a run built from it is the run built from disk, and it reuses what it says it does."""

import csv
import json
import os
import time

import pytest
import torch
from transformers import AutoModelForSequenceClassification

from airlora import loader as loader_module
from airlora.config import merge
from airlora.loader import Loader, WarmCache
from airlora.runner import run
from airlora.session import build_session, seed_everything
from tests.tiny_models import save_tiny

TIMING = {"wall_s", "setup_s", "train_s", "eval_s", "mean_step_s", "mean_decision_s", "decision_overhead_ratio",
          "mean_apply_s", "mean_update_s", "policy_decision_ms"}
TIMING_COLUMNS = {"step_s", "decision_s", "apply_s", "update_s", "rss_mb"}


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
def test_a_cached_model_is_the_model_from_pretrained_gives_for_the_seed(family, headless):
    name = "minilm" if family == "minilm" else str(headless[family])
    cache = WarmCache()
    seed_everything(99)
    cache.model(name)  # the first load, under another seed
    for seed in (3, 7):
        seed_everything(seed)
        fresh = model_state(Loader().model(name)[0])
        rng_fresh = torch.get_rng_state()
        seed_everything(seed)
        cached = model_state(cache.model(name)[0])
        assert torch.equal(torch.get_rng_state(), rng_fresh)  # what the run draws next is the same too
        assert fresh.keys() == cached.keys()
        assert all(torch.equal(fresh[k], cached[k]) for k in fresh)
    assert cache.counts["model_loads"] == 1 and cache.counts["model_copies"] == 2  # copies, not a fallback
    seed_everything(3)
    head_3 = model_state(cache.model(name)[0])
    seed_everything(4)
    head_4 = model_state(cache.model(name)[0])
    assert any(not torch.equal(head_3[k], head_4[k]) for k in head_3)  # the head is drawn per seed


def test_a_copy_that_would_differ_falls_back_to_loading(tiny_files, monkeypatch):
    model, _, _ = tiny_files
    headless_dir = save_headless("bert", tiny_files[0].parent / "headless-fallback")

    def off_by_one_draw(pretrained):  # a transformers release whose init draws differently
        torch.rand(1)
        return with_new_head(pretrained)

    with_new_head = loader_module.with_new_head
    monkeypatch.setattr(loader_module, "with_new_head", off_by_one_draw)
    cache = WarmCache()
    cache.model(str(headless_dir))
    seed_everything(5)
    fresh = model_state(Loader().model(str(headless_dir))[0])
    seed_everything(5)
    again = model_state(cache.model(str(headless_dir))[0])
    assert cache.counts["model_loads"] == 2 and cache.counts["model_copies"] == 0
    assert all(torch.equal(fresh[k], again[k]) for k in fresh)


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
    assert cache.counts["model_loads"] == 1 and cache.counts["source_reads"] == 1
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
