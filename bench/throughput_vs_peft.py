"""Training throughput of airlora's SVD adapter vs PEFT's LoRA at the same ranks, model, batch and lengths.

    python bench/throughput_vs_peft.py [--iters 20]

Both models train in turn in one process on the same default batches (MiniLM, 32 tweets, length-bucketed):
airlora with every rank at r_max = 8, airlora with every rank cut to 4, PEFT LoRA at r = 8 and at r = 4. Each
side runs forward, backward and an AdamW step with its task head trainable. Ratios > 1 mean airlora is faster.
airlora runs as it does by default, with airlora.dropout.FastDropout in the base model (PEFT keeps torch's
dropout); `fast_dropout_speedup` times airlora at r = 8 with torch's dropout put back, in the same loop.
"""

from __future__ import annotations

import argparse
import json

import torch
from common import default_session, interleaved, mean
from peft import LoraConfig, get_peft_model
from torch import nn

from airlora.dropout import FastDropout
from airlora.finetuner import FineTuner
from airlora.models import head_parameters, load_model


def peft_lora(session, rank: int):
    """A second copy of the base model with PEFT LoRA of ``rank`` on the same six modules per layer."""
    model, _, _ = load_model(session.config.model)
    names = list(session.module_map.names.values())
    model = get_peft_model(model, LoraConfig(r=rank, lora_alpha=rank, target_modules=names, lora_dropout=0.0))
    head = head_parameters(model.base_model.model, session.module_map)
    for p in head.values():
        p.requires_grad_(True)
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def step(i: int) -> None:
        batch = session.train_batches.batch(i)
        model(**batch.inputs, labels=batch.labels).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def measure(iters: int = 20) -> dict[str, float]:
    session = default_session()
    tuner = FineTuner(session)
    session.model.train()
    r_max = session.config.adapter.r_max

    fast = [m for m in session.model.modules() if isinstance(m, FastDropout)]

    def airlora_at(rank: int, dropout: type[nn.Dropout] = FastDropout):
        def step(i: int) -> None:
            for m in fast:
                m.__class__ = dropout  # FastDropout subclasses nn.Dropout: same p, torch's forward
            tuner.apply(dict.fromkeys(session.adapters.ranks(), rank))
            tuner.step(session.train_batches.batch(i))
            tuner.zero_grad()
        return step

    batch_size = session.config.data.batch_size
    times = interleaved({"airlora_r8": airlora_at(r_max), "peft_r8": peft_lora(session, r_max),
                         "airlora_r4": airlora_at(r_max // 2), "peft_r4": peft_lora(session, r_max // 2),
                         "airlora_r8_torch_dropout": airlora_at(r_max, nn.Dropout)}, iters)
    rate = {name: batch_size / mean(t) for name, t in times.items()}
    return {
        "throughput_vs_peft_lora": rate["airlora_r8"] / rate["peft_r8"],
        "throughput_vs_peft_lora_ranks_cut_to_4": rate["airlora_r4"] / rate["peft_r4"],
        "airlora_r4_vs_airlora_r8": rate["airlora_r4"] / rate["airlora_r8"],
        "airlora_r4_vs_peft_r8": rate["airlora_r4"] / rate["peft_r8"],
        "fast_dropout_speedup": rate["airlora_r8"] / rate["airlora_r8_torch_dropout"],
        "throughput_vs_peft_lora_with_torch_dropout": rate["airlora_r8_torch_dropout"] / rate["peft_r8"],
        **{f"examples_per_s_{name}": round(r, 2) for name, r in rate.items()},
    }


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iters", type=int, default=20)
    print(json.dumps(measure(parser.parse_args().iters), indent=2))
