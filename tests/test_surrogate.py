"""Experience off the real run: the calibrated surrogate and a policy pretrained on it, continued in a run."""

import json

import numpy as np
import pytest
import torch
from transformers import AutoModelForSequenceClassification

from airlora.config import merge
from airlora.errors import AirloraError
from airlora.policy.hierarchical import load_policy_file
from airlora.runner import run
from airlora.session import build_session
from airlora.surrogate import calibrated_gains, gradient_spectra, pretrain_policy
from tests import reference

EPISODES = {"policy.episode_steps": 5, "policy.refiner_batch": 16}
"""This file's episodes, on top of the shared ``small_policy`` networks."""


@pytest.mark.integration
def test_gradient_spectra_are_those_of_the_plain_model(tiny_config):
    # At the start λ = 0, so the adapted model is the plain model; its weight gradients, computed here by autograd
    # on a fresh copy with the same head, must have the singular values the calibration reports.
    session = build_session(tiny_config)
    spectra = gradient_spectra(session, probe_batches=2)
    plain = AutoModelForSequenceClassification.from_pretrained(tiny_config.model, num_labels=2).eval()
    head = {name: p for name, p in session.model.named_parameters() if name.startswith("classifier")}
    with torch.no_grad():
        for name, p in plain.named_parameters():
            if name in head:
                p.copy_(head[name])
    for step in range(2):
        batch = session.train_batches.batch(step)
        (plain(**batch.inputs, labels=batch.labels).loss / 2).backward()
    for key, name in session.module_map.names.items():
        grad = plain.get_submodule(name).weight.grad
        expected = torch.linalg.svdvals(grad)[:4].double().numpy() ** 2
        np.testing.assert_allclose(spectra[key][: expected.size], expected, rtol=1e-4, atol=1e-12)
    assert all(not p.requires_grad for m in session.adapters.modules.values() for p in m.base.parameters())


def test_calibrated_gains_are_concave_and_sum_to_the_loss_gap():
    spectra = {"a": np.array([4.0, 1.0, 0.0]), "b": np.array([2.0, 2.0, 1.0])}
    gains = calibrated_gains(spectra, ["a", "b"], loss_gap=0.5)
    np.testing.assert_allclose(gains, 0.5 / 10 * np.array([[0, 4, 5, 5], [0, 2, 4, 5]]))
    assert gains[:, -1].sum() == pytest.approx(0.5)


@pytest.mark.integration
def test_pretrained_policy_is_saved_and_continues_in_a_run(tiny_config, tmp_path, small_policy):
    config = merge(tiny_config, {"allocator": "airllm", "policy.pretrain.episodes": 120, "channel.bandwidth_hz": 1e5,
                                 "policy.pretrain.probe_batches": 2, "policy.pretrain.loss_gap": 2.0,
                                 "policy.pretrain.noise_std": 0.0, "policy.prior_steps": 50,
                                 **small_policy, **EPISODES})
    record = pretrain_policy(config, tmp_path / "pre")
    names = {p.name for p in (tmp_path / "pre").iterdir()}
    assert {"policy.pt", "policy_metrics.csv", "calibration.json", "config.json"} <= names
    saved = json.loads((tmp_path / "pre" / "calibration.json").read_text())
    assert saved["episodes"] == 120 and set(saved["importance"]) == set(record["keys"])
    assert sum(saved["importance"].values()) == pytest.approx(config.policy.pretrain.loss_gap)
    # the delivery decision is scored on the surrogate at each mark (how well the policy learns is the subject of
    # tests/test_policy_learns.py and bench/policy_bandit.py: this tiny link's gap is too small to measure it)
    shares = saved["share_of_gap_on_surrogate"]
    assert set(shares) == {"10", "30", "100", "120"} and all(np.isfinite(v) for v in shares.values()), shares
    policy = load_policy_file(tmp_path / "pre" / "policy.pt")
    assert policy["critic"]["count"] == 120 * 5
    with pytest.raises(AirloraError, match="already holds a policy.pt"):
        pretrain_policy(config, tmp_path / "pre")
    # continued online: the critic keeps what it learned, weighed as prior_steps observations, plus the run's own
    run(merge(config, {"policy.load_path": str(tmp_path / "pre" / "policy.pt")}), tmp_path / "run")
    after = load_policy_file(tmp_path / "run" / "policy.pt")
    assert after["critic"]["count"] == pytest.approx(50 + tiny_config.train.steps)
    reference.assert_delivery_fits(tmp_path / "run")


def saved_record(folder):
    return json.loads((folder / "calibration.json").read_text())


@pytest.mark.integration
def test_a_run_can_pretrain_its_own_policy_first(tiny_config, tmp_path, small_policy):
    # policy.pretrain.before_run: the run pretrains into RUN/pretrained-policy/ and trains on from that policy (its
    # critic count is prior_steps + the run's steps; a fresh policy's would be the steps alone), and a second call
    # (a resumed run) reuses the finished pretraining instead of redoing it
    from airlora.surrogate import PRETRAINED_DIR, pretrain_before_run

    config = merge(tiny_config, {"allocator": "airllm", "policy.pretrain.episodes": 40, "channel.bandwidth_hz": 1e5,
                                 "policy.pretrain.probe_batches": 2, "policy.pretrain.before_run": True,
                                 "policy.prior_steps": 50, **small_policy, **EPISODES})
    summary = run(config, tmp_path / "run")
    folder = tmp_path / "run" / PRETRAINED_DIR
    assert load_policy_file(folder / "policy.pt")["critic"]["count"] == 40 * 5
    assert load_policy_file(tmp_path / "run" / "policy.pt")["critic"]["count"] == pytest.approx(
        50 + tiny_config.train.steps)
    assert summary["pretrain"]["episodes"] == 40 and summary["pretrain"]["pretrain_s"] > 0
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["pretrain"] == summary["pretrain"]
    stamp = (folder / "policy.pt").stat().st_mtime_ns
    session, kept = pretrain_before_run(build_session(config), tmp_path / "run", resume=True)
    assert (folder / "policy.pt").stat().st_mtime_ns == stamp and kept == summary["pretrain"]
    assert session.config.policy.load_path == str(folder / "policy.pt")
    # a new run into the folder (not a resume) pretrains its own, whatever another run left there
    (folder / "calibration.json").write_text(json.dumps({**saved_record(folder), "episodes": 999}))
    _, kept = pretrain_before_run(build_session(config), tmp_path / "run", resume=False)
    assert kept["episodes"] == 40 and (folder / "policy.pt").stat().st_mtime_ns != stamp
    fresh = run(merge(config, {"policy.pretrain.before_run": False}), tmp_path / "plain")
    assert "pretrain" not in fresh and not (tmp_path / "plain" / PRETRAINED_DIR).exists()
