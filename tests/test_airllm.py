"""The AirLLM allocator end to end on a tiny model: every variant runs, stays in budget, saves and reloads."""

import csv
import dataclasses

import pytest

from airlora.config import merge
from airlora.errors import AirloraError
from airlora.run import run

SMALL_POLICY = {"policy.episode_steps": 3, "policy.refiner_updates": 2, "policy.refiner_batch": 8,
                "policy.ppo.hidden": 32, "policy.diffusion.hidden": 32, "policy.diffusion.train_timesteps": 100,
                "policy.diffusion.inference_steps": 10, "policy.diffusion.unet_channels": 8}


@pytest.mark.parametrize("variant", ["ppo", "ddim", "ppo+ddpm", "ppo+ddim-mlp", "ppo+ddim-unet"])
def test_every_variant_runs_within_budget(variant, tiny_config, tmp_path):
    config = merge(tiny_config, {"allocator": "airllm", "policy.variant": variant, "train.steps": 7,
                                 **SMALL_POLICY})
    summary = run(config, tmp_path)
    assert summary["budget_ok"] and summary["steps_over_budget"] == 0
    assert summary["policy_variant"] == variant and summary["policy_episodes"] == 2  # 7 steps, episodes of 3
    rows = list(csv.DictReader((tmp_path / "policy_metrics.csv").open()))
    assert len(rows) == 2 and all(float(r["decision_ms"]) > 0 for r in rows)
    if variant != "ppo":
        assert all(float(r["refiner_denoise_loss"]) > 0 for r in rows)
    if variant != "ddim":
        assert all("ppo_policy_loss" in r for r in rows)
    assert (tmp_path / "policy.pt").is_file()


def test_saved_policy_reloads_and_mismatch_is_a_clear_error(tiny_config, tmp_path):
    config = merge(tiny_config, {"allocator": "airllm", "train.steps": 4, **SMALL_POLICY})
    run(config, tmp_path / "a")
    again = merge(config, {"policy.load_path": str(tmp_path / "a" / "policy.pt")})
    assert run(again, tmp_path / "b")["budget_ok"]
    other = merge(again, {"policy.variant": "ppo"})
    with pytest.raises(AirloraError, match="variant"):
        run(other, tmp_path / "c")


def test_ppo_variant_needs_the_full_action_dim(tiny_config, tmp_path):
    config = merge(tiny_config, {"allocator": "airllm", "policy.variant": "ppo", "policy.ppo.coarse_dim": 3,
                                 **SMALL_POLICY})
    with pytest.raises(AirloraError, match="coarse_dim"):
        run(config, tmp_path)
    assert dataclasses.is_dataclass(config.policy)
