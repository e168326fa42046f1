"""The training loop: the paper's early-stop rule, the delivered checkpoint, per-step budget and metrics."""

import csv
import json

import numpy as np
import pytest
import torch

from airlora.config import merge
from airlora.data import TextSplit
from airlora.finetuner import FineTuner, linear_warmup_decay
from airlora.runner import run
from airlora.session import build_session, validation_subset
from airlora.trainer import evaluate, reward_converged
from tests import reference


@pytest.mark.parametrize("lam, reward, expected", [
    (0.01, -0.49, True), (0.01, -0.51, False),  # small λ: threshold −0.5
    (1.0, -0.99, True), (1.0, -1.01, False),    # large λ: threshold −λ
])
def test_reward_threshold_is_min_of_minus_lambda_and_minus_half(lam, reward, expected):
    assert reward_converged(reward, lam) is expected


@pytest.mark.parametrize("warmup, total", [(10, 300), (0, 5), (7, 7), (50, 20), (1, 1)])
def test_learning_rate_schedule_is_transformers_linear_warmup(warmup, total):
    from transformers.optimization import get_linear_schedule_with_warmup

    param = torch.nn.Parameter(torch.zeros(1))
    reference = get_linear_schedule_with_warmup(torch.optim.SGD([param], lr=1.0), min(warmup, total), total)
    factor = linear_warmup_decay(warmup, total)
    assert [factor(s) for s in range(total + 3)] == [reference.lr_lambdas[0](s) for s in range(total + 3)]


@pytest.mark.integration
def test_fused_optimiser_leaves_cut_triplets_exactly_unchanged(tiny_config):
    session = build_session(tiny_config)
    tuner = FineTuner(session)
    session.model.train()
    assert tuner.optimizer.defaults["fused"]
    full = session.adapters.ranks()
    for step in range(2):  # build up momentum on every triplet first
        tuner.apply(full)
        tuner.step(session.train_batches.batch(step))
        tuner.zero_grad()
    tuner.apply(dict.fromkeys(full, 1))
    before = session.adapters.state()
    for step in range(2, 5):
        tuner.step(session.train_batches.batch(step))
        tuner.zero_grad()
    after = session.adapters.state()
    for key, module in session.adapters.modules.items():
        cut = [i for i in range(module.r_max) if i not in module.active.tolist()]
        assert cut and torch.equal(before[f"{key}.P"][:, cut], after[f"{key}.P"][:, cut])
        assert torch.equal(before[f"{key}.Q"][cut], after[f"{key}.Q"][cut])
        active = module.active.tolist()
        assert not torch.equal(before[f"{key}.Q"][active], after[f"{key}.Q"][active])  # the live ones did move


@pytest.mark.integration
def test_summary_reports_the_delivered_best_checkpoint(tiny_config, tmp_path):
    summary = run(merge(tiny_config, {"train.steps": 9, "train.eval_every": 3}), tmp_path)
    rows = list(csv.DictReader((tmp_path / "metrics.csv").open()))
    assert len(rows) == 9
    reference.assert_every_step_fits(rows, tiny_config.channel.t_max_s)
    evaluated = {int(r["step"]): float(r["val_accuracy"]) for r in rows if r["val_accuracy"]}
    assert sorted(evaluated) == [2, 5, 8]
    best_step = summary["best_step"]
    assert evaluated[best_step] == max(evaluated.values()) == summary["val_accuracy"]
    best_row = rows[best_step]
    assert int(best_row["total_rank"]) == sum(summary["ranks"].values())
    assert float(best_row["snr_db"]) == summary["snr_db"]
    assert int(best_row["transmitted_params"]) == summary["transmitted_params"]
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["train"]["steps"] == 9


def validated_steps(folder):
    return [int(r["step"]) for r in csv.DictReader((folder / "metrics.csv").open()) if r["val_accuracy"]]


@pytest.mark.integration
def test_eval_on_change_validates_only_a_new_delivery_decision(tiny_config, tmp_path):
    base = merge(tiny_config, {"train.steps": 9, "train.eval_every": 3})
    every = run(base, tmp_path / "every")
    static = run(merge(base, {"train.eval_on_change": True}), tmp_path / "static")
    # uniform decides the same at every validation: the first and the last are validated, the middle one skipped
    assert validated_steps(tmp_path / "every") == [2, 5, 8] and every["validations_skipped"] == 0
    assert validated_steps(tmp_path / "static") == [2, 8] and static["validations_skipped"] == 1
    # random draws a new decision each time (on a link wide enough that a draw is not cut to nothing)
    changing = run(merge(base, {"train.eval_on_change": True, "allocator": "random", "channel.bandwidth_hz": 1e6}),
                   tmp_path / "random")
    assert validated_steps(tmp_path / "random") == [2, 5, 8] and changing["validations_skipped"] == 0


@pytest.mark.integration
def test_eval_on_change_compares_candidates_only(tiny_config, tmp_path):
    """AdaLoRA's checkpoints before its final phase are no candidates: their decisions must not make the first
    candidate look unchanged."""
    base = merge(tiny_config, {"allocator": "adalora", "train.steps": 30, "train.eval_every": 3})
    every = run(base, tmp_path / "every")
    changed = run(merge(base, {"train.eval_on_change": True}), tmp_path / "changed")
    assert validated_steps(tmp_path / "changed") == validated_steps(tmp_path / "every")
    assert changed["best_step"] == every["best_step"] and changed["validations_skipped"] == 0


@pytest.mark.integration
def test_val_subset_validates_on_a_seeded_draw_of_the_validation_split(tiny_config):
    full = build_session(tiny_config)
    subset = build_session(merge(tiny_config, {"data.val_subset": 8}))
    assert sum(len(b.labels) for b in subset.val_batches) == 8
    assert subset.splits.train.sentences == full.splits.train.sentences  # the splits themselves are unchanged
    assert sum(len(b.labels) for b in subset.test_batches) == sum(len(b.labels) for b in full.test_batches)
    split = TextSplit([f"sentence {i}" for i in range(50)], np.arange(50) % 2)
    draws = {seed: validation_subset(split, 10, seed).sentences for seed in (0, 1)}
    assert set(draws[0]) <= set(split.sentences) and len(set(draws[0])) == 10
    assert draws[0] == sorted(draws[0], key=split.sentences.index)  # in the split's order
    assert draws[0] != draws[1]  # seeded: another seed, another draw
    assert validation_subset(split, 50, 0) is split and validation_subset(split, None, 0) is split


@pytest.mark.integration
def test_early_stop_once_reward_converged_and_no_gain(tiny_config, tmp_path):
    # a wide link keeps η small, so R = −U − 2η converges (≥ −λ = −2) while the tiny model's loss is ~0.7
    config = merge(tiny_config, {"train.steps": 40, "train.eval_every": 1, "train.patience": 1,
                                 "train.reward_lambda": 2.0, "channel.bandwidth_hz": 1e6})
    summary = run(config, tmp_path)
    assert summary["stopped_early"] and summary["steps"] < 40
    rows = list(csv.DictReader((tmp_path / "metrics.csv").open()))
    assert len(rows) == summary["steps"]


@pytest.mark.integration
def test_adalora_delivers_only_its_final_allocation(tiny_config, tmp_path):
    config = merge(tiny_config, {"allocator": "adalora", "train.steps": 10, "train.eval_every": 2})
    summary = run(config, tmp_path)
    rows = list(csv.DictReader((tmp_path / "metrics.csv").open()))
    final_phase = 10 - round(0.2 * 10)  # steps − tfinal (adalora.tfinal_share 0.2)
    assert summary["best_step"] >= final_phase
    assert int(rows[summary["best_step"]]["total_rank"]) == sum(summary["ranks"].values())


@pytest.mark.integration
def test_bf16_autocast_trains_close_to_fp32_and_keeps_fp32_weights(tiny_config):
    losses, accuracies = {}, {}
    for mode in ("off", "bf16"):
        session = build_session(merge(tiny_config, {"train.autocast": mode}))
        tuner = FineTuner(session)
        losses[mode] = [tuner.step(session.train_batches.batch(i)) for i in range(3)]
        tuner.zero_grad()
        accuracies[mode] = evaluate(session, session.val_batches)
        assert all(p.dtype == torch.float32 for p in session.adapters.parameters())
    assert losses["off"] != losses["bf16"]  # the forward did run in bf16
    assert np.allclose(losses["bf16"], losses["off"], atol=0.03), losses
    assert abs(accuracies["bf16"] - accuracies["off"]) <= 0.1
