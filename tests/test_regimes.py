"""The two training regimes: 'delivery' trains with stable ranks and measures candidate deliveries on the probe set;
'paper' trains each step at the ranks that fit that step's channel. Every allocator runs in both."""

import csv

import numpy as np
import pytest
import torch

from airlora.allocators import Allocator, names, register, unregister
from airlora.config import merge
from airlora.regimes import probe_loss
from airlora.runner import run
from airlora.session import build_session

pytestmark = pytest.mark.integration  # end-to-end on the tiny model: see pyproject.toml


def read_csv(path):
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


def training_ranks(out):
    """ranks.csv as (steps, modules) integers: the ranks trained at each step."""
    rows = read_csv(out / "ranks.csv")
    keys = [k for k in rows[0] if k != "step"]
    assert [int(r["step"]) for r in rows] == list(range(len(rows)))
    return np.array([[int(r[k]) for k in keys] for r in rows])


@pytest.mark.parametrize("regime", ["delivery", "paper"])
@pytest.mark.parametrize("allocator", names())
def test_every_allocator_runs_in_both_regimes(tiny_config, tmp_path, allocator, regime):
    config = merge(tiny_config, {"allocator": allocator, "train.regime": regime, "train.steps": 8,
                                 "train.eval_every": 4, "channel.bits": [8, 32], "policy.episode_steps": 3})
    summary = run(config, tmp_path)
    assert summary["regime"] == regime and summary["steps"] == 8
    ranks = training_ranks(tmp_path)
    rows = read_csv(tmp_path / "metrics.csv")
    # what a delivery at each step's channel would send fits that channel, in both regimes (airtime recomputed here),
    # or, where not even the head and the delivery's overhead fit (-5 dB here), it sends no triplet
    assert all(int(r["transmitted_bits"]) / float(r["capacity_bps"]) <= config.channel.t_max_s * (1 + 1e-12)
               or int(r["total_rank"]) == 0 for r in rows)
    assert any(int(r["total_rank"]) > 0 for r in rows)
    if regime == "paper":  # the ranks trained at are the ones that fit the step's channel
        assert [int(r["total_rank"]) for r in rows] == ranks.sum(axis=1).tolist()
    elif allocator != "adalora":  # every triplet trains, whatever the channel
        assert (ranks == config.adapter.r_max).all()
        assert [int(r["training_rank"]) for r in rows] == ranks.sum(axis=1).tolist()


@pytest.mark.parametrize("allocator", names())
def test_in_the_delivery_regime_training_ranks_never_come_back_and_rarely_change(tiny_config, tmp_path, allocator):
    config = merge(tiny_config, {"allocator": allocator, "train.steps": 30, "train.eval_every": 15,
                                 "channel.snr_db": [-5.0, 5.0, 15.0], "policy.episode_steps": 5})
    run(config, tmp_path)
    ranks = training_ranks(tmp_path)
    # a module's training rank never goes back up once cut
    assert (np.diff(ranks, axis=0) <= 0).all()
    changed = 1 + np.flatnonzero((np.diff(ranks, axis=0) != 0).any(axis=1))  # steps whose ranks differ from before
    if allocator == "adalora":
        # AdaLoRA prunes on PEFT's schedule (its own settings, not ours): a rank changes only the step after one of
        # its masks (every delta_t steps of the budgeting phase, then the final allocation)
        tinit = round(config.adalora.tinit_share * 30)
        final = 30 - round(config.adalora.tfinal_share * 30)
        masks = {s + 1 for s in range(tinit, final) if s % config.adalora.delta_t == 0} | {final + 1}
        assert 0 < len(changed) and set(changed.tolist()) <= masks
    else:
        # the default design: every triplet trains throughout, whatever the channel
        assert len(changed) == 0 and (ranks == config.adapter.r_max).all()


def test_the_paper_regime_changes_training_ranks_with_the_channel(tiny_config, tmp_path):
    """The contrast that makes the test above mean something: per-step ranks under the channel do change."""
    config = merge(tiny_config, {"allocator": "random", "train.regime": "paper", "train.steps": 30,
                                 "channel.snr_db": [-5.0, 5.0, 15.0]})
    run(config, tmp_path)
    changes = (np.diff(training_ranks(tmp_path), axis=0) != 0).sum(axis=0)
    assert changes.mean() * 15 / 29 > 1.0


class Recorder(Allocator):
    """Proposes a fixed candidate (every triplet at the highest precision, or nothing) and records the rewards."""

    name = "recorder"
    probe_reward = True
    candidate = "full"
    seen: list = []

    def allocate(self, ctx):
        r = ctx.budget.r_max if self.candidate == "full" else 0
        return dict.fromkeys(ctx.budget.keys, r), dict.fromkeys(ctx.budget.keys, ctx.budget.allowed_bits[-1])

    def observe(self, outcome):
        Recorder.seen.append((outcome.reward, outcome.eta, outcome.loss))


@pytest.fixture
def recorder():
    register("recorder", Recorder)
    Recorder.seen = []
    yield Recorder
    unregister("recorder")


def test_the_probe_reward_of_the_full_adapter_is_its_airtime_price_alone(tiny_config, tmp_path, recorder):
    # a loose budget: the full adapter fits, so the candidate is the model as trained and U_candidate − U_full = 0
    config = merge(tiny_config, {"allocator": "recorder", "train.steps": 4, "channel.t_max_s": 100.0})
    run(config, tmp_path)
    assert len(recorder.seen) == 4
    for reward, eta, loss in recorder.seen:
        assert 0 < eta < 1 and reward == -config.train.reward_lambda * eta  # exactly: the same passes, the same bits
        assert reward != -loss - config.train.reward_lambda * eta


def test_probe_loss_is_the_loss_of_the_delivered_model_on_fixed_training_examples(tiny_config):
    session = build_session(merge(tiny_config, {"train.probe_examples": 12}))
    with torch.no_grad():  # give the adapters something to lose
        for m in session.adapters.modules.values():
            m.lam.copy_(torch.linspace(20.0, 40.0, m.r_max))
    probe = session.probe_batches
    assert sum(int(b.labels.numel()) for b in probe) == 12
    assert [b.inputs["input_ids"].tolist() for b in probe] == [
        b.inputs["input_ids"].tolist() for b in build_session(session.config).probe_batches]  # fixed by the seed

    def loss_by_hand(lam_scale):
        saved = {k: m.lam.detach().clone() for k, m in session.adapters.modules.items()}
        session.model.eval()
        with torch.no_grad():
            for m in session.adapters.modules.values():
                m.lam.mul_(lam_scale)
            total = sum(float(torch.nn.functional.cross_entropy(session.model(**b.inputs).logits, b.labels,
                                                                reduction="sum")) for b in probe)
            for k, m in session.adapters.modules.items():
                m.lam.copy_(saved[k])
        return total / 12

    keys = session.budget(5.0).keys
    nothing = dict.fromkeys(keys, 0), dict.fromkeys(keys, 32)
    assert probe_loss(session, None) == pytest.approx(loss_by_hand(1.0), rel=1e-5)
    assert probe_loss(session, nothing) == pytest.approx(loss_by_hand(0.0), rel=1e-5)
    assert abs(probe_loss(session, nothing) - probe_loss(session, None)) > 1e-3
    session.model.train()
    probe_loss(session, nothing)
    assert session.model.training  # put back as it was (dropout stays on for training)


@pytest.mark.parametrize("allocator", names())
def test_a_budget_front_from_one_run_fits_every_budget(tiny_config, tmp_path, allocator):
    # one validation, at the last step: the delivered checkpoint is the final state the front's decisions are made in
    config = merge(tiny_config, {"allocator": allocator, "train.steps": 6, "train.eval_every": 6,
                                 "channel.bits": [4, 8, 32],
                                 "channel.delivery_snr_db": 5.0, "train.deliver_t_max_s": [0.3, 1.0, 3.0],
                                 "policy.episode_steps": 3})
    summary = run(config, tmp_path)
    front = summary["budget_front"]
    assert [(p["t_max_s"], p["bits"]) for p in front] == [(t, b) for t in (0.3, 1.0, 3.0) for b in ([4, 8, 32], [32])]
    for point in front:
        assert point["on_air_bits"] / summary["capacity_bps"] <= point["t_max_s"] * (1 + 1e-12)
        assert set(point["precisions"].values()) <= set(point["bits"])
    at_own = next(p for p in front if p["t_max_s"] == 1.0 and p["bits"] == [4, 8, 32])  # the run's own budget
    assert at_own["on_air_bits"] == summary["on_air_bits"] and at_own["test_accuracy"] == summary["test_accuracy"]


def test_in_the_delivery_regime_a_front_point_is_what_a_run_at_that_budget_delivers(tiny_config, tmp_path):
    """Training does not depend on the budget, so one run's delivery at T_max 0.3 s is the 0.3 s run's own."""
    base = {"allocator": "uniform", "train.steps": 6, "train.eval_every": 6, "channel.bits": [4, 8, 32],
            "channel.delivery_snr_db": 5.0}
    wide = run(merge(tiny_config, base | {"train.deliver_t_max_s": [0.3]}), tmp_path / "wide")
    tight = run(merge(tiny_config, base | {"channel.t_max_s": 0.3}), tmp_path / "tight")
    point = wide["budget_front"][0]
    assert point["ranks"] == tight["ranks"] and point["precisions"] == tight["precisions"]
    assert point["test_accuracy"] == tight["test_accuracy"] and point["on_air_bits"] == tight["on_air_bits"]
    assert wide["on_air_bits"] > tight["on_air_bits"]  # the two budgets do differ


def test_the_precision_bandit_learns_on_a_trace_of_distinct_snrs():
    """An SNR trace has a new value at almost every step; its values to the nearest dB share one bandit."""
    from airlora.policy.precision import PrecisionChoice

    bandit = PrecisionChoice((4, 8, 32))
    tried = []
    for i in range(6):
        snr_db = 0.1 * i
        bits = bandit.choose(snr_db, explore=True)
        tried.append(bits)
        bandit.update(snr_db, bits, -0.1 if bits == 32 else 0.0)
    assert set(tried) == {4, 8, 32}  # every precision tried, not the highest forever
    assert bandit.choose(0.3, explore=False) == 8  # the best mean (4 and 8 tie; the higher precision wins ties)
    assert bandit.choose(0.3, explore=False, allowed=(32,)) == 32  # a delivery where only fp32 is allowed
