"""The AirLLM allocator end to end on a tiny model: every variant learns inside a run, saves, reloads, continues."""

import csv

import pytest
import torch

from airlora.config import merge
from airlora.errors import AirloraError
from airlora.policy.hierarchical import load_policy_file
from airlora.runner import run
from airlora.session import build_session
from tests import reference

pytestmark = pytest.mark.integration  # end-to-end on the tiny model: see pyproject.toml

EPISODES = {"policy.episode_steps": 3, "policy.refiner_updates": 2, "policy.refiner_batch": 8}
"""Short episodes and few refiner updates, on top of the shared ``small_policy`` networks."""


def initial_policy(config):
    """The policy networks a run of ``config`` starts from (same seed), before any learning."""
    session = build_session(config)
    allocator = session.allocator
    from airlora.trainer import context

    allocator.allocate(context(session, 0, session.adapters.ranks()))
    return allocator.policy.policy_state()


@pytest.mark.parametrize("variant", ["ppo", "ddim", "ppo+ddpm", "ppo+ddim-mlp", "ppo+ddim-unet"])
def test_every_variant_updates_and_saves_exactly_its_own_networks_inside_a_run(variant, tiny_config, tmp_path,
                                                                              small_policy):
    """The run drives each variant's learning at episode ends and saves what it learned; whether that learning finds
    a known optimum is tests/test_policy_learns.py's and bench/policy_bandit.py's subject, not a 7-step run's."""
    config = merge(tiny_config, {"allocator": "airllm", "policy.variant": variant, "train.steps": 7,
                                 **small_policy, **EPISODES})
    summary = run(config, tmp_path)
    # 7 steps in episodes of 3: two episodes are learned from (the second once step 7's decision was made)
    assert summary["policy_variant"] == variant and summary["policy_episodes"] == 2
    rows = list(csv.DictReader((tmp_path / "policy_metrics.csv").open()))
    assert [int(r["episode"]) for r in rows] == [0, 1] and all(int(r["steps"]) == 3 for r in rows)
    saved, start = load_policy_file(tmp_path / "policy.pt"), initial_policy(config)
    # PPO alone has no refiner or critic; the refiner alone ("ddim") no PPO: a variant saves what it uses, no more
    assert ("ppo" in saved, "refiner" in saved, "critic" in saved) == (variant != "ddim", variant != "ppo",
                                                                       variant != "ppo")
    if variant != "ddim":  # PPO took gradient steps
        weight = "actor_mean.0.weight"
        assert not torch.equal(saved["ppo"]["model"][weight], start["ppo"]["model"][weight])
    if variant != "ppo":  # the refiner took gradient steps and the critic saw the 7 transitions
        changed = [k for k, v in saved["refiner"].items() if not torch.equal(v, start["refiner"][k])]
        assert changed and saved["critic"]["count"] == 7
        assert all(float(r["refiner_denoise_loss"]) > 0 for r in rows)


def test_saved_policy_reloads_with_its_weights_and_mismatch_is_a_clear_error(tiny_config, tmp_path, small_policy):
    config = merge(tiny_config, {"allocator": "airllm", "train.steps": 4, **small_policy, **EPISODES})
    run(config, tmp_path / "a")
    saved = load_policy_file(tmp_path / "a" / "policy.pt")
    again = merge(config, {"policy.load_path": str(tmp_path / "a" / "policy.pt"), "train.steps": 1})
    session = build_session(again)
    from airlora.trainer import context

    session.allocator.allocate(context(session, 0, session.adapters.ranks()))
    loaded = session.allocator.policy.policy_state()
    for name, tensor in saved["refiner"].items():
        torch.testing.assert_close(loaded["refiner"][name], tensor)
    weight = "actor_mean.0.weight"
    torch.testing.assert_close(loaded["ppo"]["model"][weight], saved["ppo"]["model"][weight])
    torch.testing.assert_close(loaded["critic"]["weights"], saved["critic"]["weights"])
    # delivered at 5 dB: at −5 dB (the median of −5 and 5) not even the head fits this tiny link
    run(merge(again, {"train.steps": 4, "channel.delivery_snr_db": 5.0}), tmp_path / "b")
    reference.assert_delivery_fits(tmp_path / "b")
    with pytest.raises(AirloraError, match="variant"):
        run(merge(again, {"policy.variant": "ppo"}), tmp_path / "c")
    with pytest.raises(AirloraError, match="policy networks"):
        run(merge(again, {"policy.diffusion.hidden": 16}), tmp_path / "d")
    (tmp_path / "junk.pt").write_bytes(b"not a policy")
    with pytest.raises(AirloraError, match="could not be read"):
        run(merge(again, {"policy.load_path": str(tmp_path / "junk.pt")}), tmp_path / "e")


def test_ppo_variant_needs_the_full_action_dim(tiny_config, tmp_path, small_policy):
    config = merge(tiny_config, {"allocator": "airllm", "policy.variant": "ppo", "policy.ppo.coarse_dim": 3,
                                 **small_policy, **EPISODES})
    with pytest.raises(AirloraError, match="coarse_dim = 3: the 'ppo' variant acts on the full rank vector"):
        run(config, tmp_path)
    assert not (tmp_path / "summary.json").exists()


def test_joint_mode_prices_ranks_at_the_precisions_the_projection_will_choose(tiny_config, tmp_path, small_policy):
    # 4 and 32 bits allowed: the policy's geometry must agree with Budget.project_joint, which keeps fp32 while the
    # ranks fit there, lowers precision before cutting ranks, and cuts only what does not fit even at 4 bits
    import dataclasses

    config = merge(tiny_config, {"allocator": "airllm", "channel.bits": [4, 32], "channel.delivery_snr_db": 5.0,
                                 "train.steps": 6, **small_policy, **EPISODES})
    session = build_session(config)
    from airlora.trainer import context

    session.allocator.allocate(context(session, 0, session.adapters.ranks()))
    geometry = session.allocator.policy.geometry
    budget = session.budget(5.0)
    torch.testing.assert_close(geometry.bits_low, torch.tensor(budget.unit_bits[:, 0], dtype=torch.float32))
    room = budget.capacity_bps * budget.t_max_s - budget.reserved_bits
    per_rank_32, per_rank_4 = budget.unit_bits[:, -1].sum(), budget.unit_bits[:, 0].sum()
    fits_32 = int(room // per_rank_32)
    assert 1 <= fits_32 < budget.r_max and (fits_32 + 1) * per_rank_4 <= room  # the fixture allows all three cases
    # a link where not even r_max at 4 bits fits: half of what it needs
    small = dataclasses.replace(budget, capacity_bps=(budget.r_max * per_rank_4 / 2 + budget.reserved_bits)
                                / budget.t_max_s)
    for level, link in ((fits_32, budget), (fits_32 + 1, budget), (budget.r_max, small)):
        ranks = torch.full((1, len(budget.keys)), float(level))
        capacity = torch.tensor([link.capacity_bps])
        executed = geometry.executed(ranks, capacity)
        projected, precisions = link.project_joint(dict.fromkeys(budget.keys, level))
        cut = sum(projected.values()) < level * len(budget.keys)
        assert cut == (link is small) and bool(float(executed.sum()) < ranks.sum() - 1e-6) == cut
        assert set(precisions.values()) == ({32} if level == fits_32 else {4} if cut else {4, 32})
        # η as the policy prices it, against the projection's real η: the projection lowers whole modules, so it
        # fills the budget only to within one module's saving (7 % on this 12-module model)
        assert float(geometry.eta(executed, capacity)) == pytest.approx(link.eta(projected, precisions), abs=0.1)
    summary = run(config, tmp_path)
    assert set(summary["precisions"].values()) <= {4, 32}
    reference.assert_delivery_fits(tmp_path)
