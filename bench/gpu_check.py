"""The GPU check: one prepared script a machine with a CUDA GPU runs in under 8 minutes; prints one JSON object.

    python bench/gpu_check.py [--out docs/results/gpu/gpu_check.json] [--budget-s 450]

Each item is a real ``airlora run`` (``python -m airlora`` or ``torchrun -m airlora``) in a fresh process, on the
tweets data, and reports its summary's mean step time, examples/s (global batch / mean step time), decision overhead
(mean decision time / mean step time), peak GPU memory (``torch.cuda.max_memory_allocated`` of rank 0) and test
accuracy:

1. ``minilm``: the default model (all-MiniLM-L6-v2), 100 steps, bf16 autocast, the airllm allocator;
2. ``opt1.3b_shape``: a model of OPT-1.3B's shape built from its config (24 layers, d 2048, FFN 8192) with random
   weights in bf16 and a byte-level BPE tokenizer trained on the tweets (no hub: timing and memory only, its accuracy
   means nothing), 30 steps, batch 16;
3. ``ddp_*`` and ``fsdp_*``: the same two as one run across the GPUs present (torchrun, NCCL, one process per GPU).
   With a single GPU there is nothing to spread: they run as 2 processes on that one GPU over gloo instead, which
   checks the code path (decision broadcast, sharded base) but not NCCL, and says so in ``note``.

An item that fails is reported with its last lines of stderr; the script goes on. Items are skipped once
``--budget-s`` seconds have passed, so the whole stays under 8 minutes.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as `python bench/x.py` from a checkout


def build_opt_shape(folder: Path) -> Path:
    """A sequence classifier of OPT-1.3B's shape, random bf16 weights, with a tokenizer trained on the tweets."""
    import torch
    from tokenizers import ByteLevelBPETokenizer
    from transformers import AutoModelForSequenceClassification, OPTConfig, PreTrainedTokenizerFast

    from airlora.data import read_source

    texts = read_source("tweets")[1]["train"].texts
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(list(texts), vocab_size=8000, min_frequency=2, special_tokens=["<unk>", "</s>"])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, eos_token="</s>", pad_token="</s>",
                                        unk_token="<unk>")
    tokenizer.save_pretrained(folder)
    eos = tokenizer.convert_tokens_to_ids("</s>")
    config = OPTConfig(hidden_size=2048, num_hidden_layers=24, ffn_dim=8192, num_attention_heads=32,
                       vocab_size=50272, max_position_embeddings=2048, word_embed_proj_dim=2048, num_labels=2,
                       pad_token_id=eos, eos_token_id=eos, bos_token_id=eos)
    torch.manual_seed(0)
    with torch.device("cuda"):  # random init on the GPU: seconds instead of a minute on the host
        model = AutoModelForSequenceClassification.from_config(config, torch_dtype=torch.bfloat16)
    model.save_pretrained(folder)
    return folder


def run_item(name: str, model: str, steps: int, batch: int, processes: int, strategy: str, backend: str,
             out: Path, timeout_s: float) -> dict:
    """One ``airlora run``; the numbers of its summary, or its error."""
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes)] \
        if processes > 1 else [sys.executable]
    sets = {"model": model, "train.steps": steps, "data.batch_size": batch, "train.eval_every": steps,
            "train.checkpoint_every": 0, "train.report_to": "none", "train.autocast": "bf16",
            "train.distributed": strategy, "train.dist_backend": backend, "allocator": "airllm",
            "data.val_subset": 512, "data.test_size": 512}
    cmd = [*launcher, "-m", "airlora", "run", "--quiet", "--out", str(out / name)]
    for key, value in sets.items():
        cmd += ["--set", f"{key}={value}"]
    t0 = time.perf_counter()
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=timeout_s,
                              env=dict(os.environ, PYTHONPATH=str(ROOT)))
    except subprocess.TimeoutExpired:
        return {"ok": False, "error": f"timed out after {timeout_s:.0f} s"}
    wall = time.perf_counter() - t0
    if done.returncode != 0:
        return {"ok": False, "returncode": done.returncode, "stderr_tail": done.stderr[-2000:], "wall_s": wall}
    s = json.loads((out / name / "summary.json").read_text())
    return {"ok": True, "processes": processes, "strategy": strategy, "world_size": s["world_size"],
            "dist_backend": s["dist_backend"], "steps": s["steps"], "global_batch": batch,
            "mean_step_s": s["mean_step_s"], "examples_per_s": batch / s["mean_step_s"],
            "decision_overhead_ratio": s["decision_overhead_ratio"], "mean_decision_s": s["mean_decision_s"],
            "peak_gpu_mb": s.get("peak_gpu_mb"), "eval_s": s["eval_s"], "setup_s": s["setup_s"],
            "test_accuracy": s["test_accuracy"], "wall_s": wall}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help="also write the JSON here")
    parser.add_argument("--budget-s", type=float, default=450.0, help="start no item after this many seconds")
    args = parser.parse_args()
    started = time.perf_counter()
    import torch

    if not torch.cuda.is_available():
        print(json.dumps({"ok": False, "error": "no CUDA device: this check is for a GPU machine"}))
        sys.exit(1)
    gpus = torch.cuda.device_count()
    result: dict = {"device": torch.cuda.get_device_name(0), "gpus": gpus, "torch": torch.__version__,
                    "cuda": torch.version.cuda, "items": {}}
    # several GPUs: one process each over NCCL; one GPU: two processes sharing it over gloo (NCCL refuses that)
    processes, backend = (gpus, "nccl") if gpus > 1 else (2, "gloo")
    if gpus == 1:
        result["note"] = "one GPU: ddp_* and fsdp_* ran as 2 processes on it over gloo; NCCL was not exercised"
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        t0 = time.perf_counter()
        opt = str(build_opt_shape(root / "opt-1.3b-shape"))
        result["opt_build_s"] = time.perf_counter() - t0
        items = [
            ("minilm", "minilm", 100, 32, 1, "ddp"),
            ("opt1.3b_shape", opt, 30, 16, 1, "ddp"),
            ("ddp_minilm", "minilm", 100, 32, processes, "ddp"),
            ("fsdp_minilm", "minilm", 100, 32, processes, "fsdp"),
            ("ddp_opt1.3b_shape", opt, 30, 16, processes, "ddp"),
            ("fsdp_opt1.3b_shape", opt, 30, 16, processes, "fsdp"),
        ]
        for name, model, steps, batch, procs, strategy in items:
            left = args.budget_s - (time.perf_counter() - started)
            if left < 30:
                result["items"][name] = {"ok": False, "error": "skipped: out of the time budget"}
                continue
            result["items"][name] = run_item(name, model, steps, batch, procs, strategy,
                                             backend if procs > 1 else "auto", root, left)
            print(name, json.dumps(result["items"][name]), file=sys.stderr, flush=True)
    result["total_s"] = time.perf_counter() - started
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
