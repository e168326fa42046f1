"""Where a run's start-up goes, and what a warm sweep worker (``airlora.loader.WarmCache``) keeps of it.

    python bench/startup.py [--big-model FOLDER] [--out FILE]

In this fresh process, on one thread, on the default model and data: the imports a run needs, then each part of
building a session (model load, reading the tweets, the reference vocabulary, tokenising and word-splitting the
three splits) the first time and again, a deep copy of the loaded model, then a whole session build from disk
against one from a warm cache that has built a session of the same seed before. Prints one JSON object of seconds.

--big-model FOLDER: also load a model of OPT-1.3B's shape twice, and time a deep copy of it, which is what keeping a
loaded model in a worker and handing each run a copy would cost (why ``airlora.loader`` does not). Random weights in
fp16, as facebook/opt-1.3b is saved; built and saved into FOLDER (2.6 GB) when it holds no checkpoint yet.
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as `python bench/x.py` from a checkout


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--big-model", type=Path, help="a folder for a model of OPT-1.3B's shape (made if empty)")
    parser.add_argument("--out", type=Path, help="also write the JSON here (atomically)")
    args = parser.parse_args()
    t0 = time.perf_counter()
    import torch
    import transformers.models.bert  # noqa: F401

    import airlora.runner  # noqa: F401
    imports = time.perf_counter() - t0
    torch.set_num_threads(1)
    from airlora.batching import EncodedSplit
    from airlora.config import RunConfig, merge
    from airlora.data import make_splits, read_source
    from airlora.loader import Loader, WarmCache
    from airlora.models import load_model
    from airlora.session import build_session
    from airlora.textstats import reference_vocabulary

    config = merge(RunConfig(), {"train.threads": 1, "train.progress": False})
    parts: dict[str, list[float]] = {}
    for _ in range(2):
        marks = [time.perf_counter()]
        _, tokenizer, _ = load_model("minilm")
        marks.append(time.perf_counter())
        read = read_source("tweets")
        marks.append(time.perf_counter())
        vocabulary = reference_vocabulary(tokenizer)
        marks.append(time.perf_counter())
        splits = make_splits(read, config.data, config.train.seed)
        for split, words in ((splits.train, vocabulary), (splits.validation, None), (splits.test, None)):
            EncodedSplit(split, tokenizer, config.data.max_length, words)
        marks.append(time.perf_counter())
        for name, start, end in zip(("model_load_s", "source_read_s", "vocabulary_s", "splits_and_tokenising_s"),
                                    marks[:-1], marks[1:], strict=True):
            parts.setdefault(name, []).append(end - start)
    model, _, _ = load_model("minilm")
    t0 = time.perf_counter()
    copy.deepcopy(model)  # what keeping a loaded model and handing each run a copy would cost
    model_copy = time.perf_counter() - t0
    cache = WarmCache()
    build_session(config, cache)
    t0 = time.perf_counter()
    build_session(config, Loader())
    t1 = time.perf_counter()
    build_session(config, cache)
    cold, warm = t1 - t0, time.perf_counter() - t1
    from common import commit, emit

    result = {"commit": commit(), "imports_s": imports,
              **{f"{name}_first_then_again": values for name, values in parts.items()}, "model_deep_copy_s": model_copy,
              "session_from_disk_s": cold, "session_from_warm_cache_s": warm, "cache_counts": dict(cache.counts)}
    if args.big_model:
        result["big_model"] = big_model(args.big_model)
    emit(result, args.out)


def big_model(folder: Path) -> dict:
    """Seconds to load a model of OPT-1.3B's shape (first, again) and to deep-copy it once loaded."""
    import torch
    from transformers import AutoModelForSequenceClassification, OPTConfig, OPTModel

    if not (folder / "config.json").is_file():
        config = OPTConfig(hidden_size=2048, num_hidden_layers=24, ffn_dim=8192, num_attention_heads=32,
                           vocab_size=50272, max_position_embeddings=2048, word_embed_proj_dim=2048, pad_token_id=1)
        OPTModel(config).half().save_pretrained(folder)
    loads = []
    for _ in range(2):
        t0 = time.perf_counter()
        model = AutoModelForSequenceClassification.from_pretrained(folder, num_labels=2)
        loads.append(time.perf_counter() - t0)
    t0 = time.perf_counter()
    copy.deepcopy(model)
    copied = time.perf_counter() - t0
    return {"parameters": sum(p.numel() for p in model.parameters()), "dtype": str(next(model.parameters()).dtype),
            "load_s_first_then_again": loads, "deep_copy_s": copied, "torch_threads": torch.get_num_threads()}


if __name__ == "__main__":
    main()
