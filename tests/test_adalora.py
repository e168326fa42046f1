"""The `adalora` allocator: PEFT's RankAllocator driving our SVD triplets through its phases, its bits target, and
the `--match-bits-of` flag end to end."""

import json
import math

import numpy as np
import pytest
import torch

from airlora.adapters import AdapterSet, forget_momentum
from airlora.allocators import AllocationContext, StepOutcome
from airlora.allocators.adalora import AdaLoraAllocator, schedule_steps
from airlora.baseline_config import AdaLoraSettings
from airlora.channel import Budget, capacity_bps
from airlora.cli import main
from airlora.config import AdapterConfig, RunConfig, TrainConfig
from airlora.models import head_parameters, resolve_modules
from tests import reference
from tests.tiny_models import tiny_model


def tiny_task(r_max: int = 4, seed: int = 0):
    """A tiny BERT with SVD adapters at full rank and a fixed random classification batch."""
    model = tiny_model("bert", seed).train()
    module_map = resolve_modules(model)
    adapters = AdapterSet.inject(model, module_map, AdapterConfig(r_max=r_max), seed)
    head = head_parameters(model, module_map)
    for p in head.values():
        p.requires_grad_(True)
    g = torch.Generator().manual_seed(seed)
    inputs = {"input_ids": torch.randint(5, 100, (8, 10), generator=g), "attention_mask": torch.ones(8, 10, dtype=int)}
    labels = torch.randint(0, 2, (8,), generator=g)
    return model, module_map, adapters, head, inputs, labels


def drive(allocator, task, steps: int, budget_at, snr_db: float = 10.0) -> list[dict[str, int]]:
    """The trainer's loop in miniature: allocate, project, apply, train, observe. Returns the ranks of every step."""
    model, _, adapters, head, inputs, labels = task
    optimizer = torch.optim.AdamW([{"params": adapters.parameters(), "weight_decay": 0.0},
                                   {"params": list(head.values())}], lr=2e-2)
    ranks, history = adapters.ranks(), []
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny model gains nothing from threads, and loses a lot on a busy machine
    try:
        for step in range(steps):
            budget = budget_at(step)
            ranks = budget.project(allocator.allocate(AllocationContext(step, snr_db, budget, 0.5, 0.0, ranks, 1e6)))
            forget_momentum(optimizer, adapters.set_ranks(ranks))
            loss = model(**inputs, labels=labels).loss + 0.1 * adapters.orthogonality()
            loss.backward()
            optimizer.step()
            allocator.observe(StepOutcome(step, loss.item(), -loss.item(), budget.eta(ranks), ranks, model))
            optimizer.zero_grad(set_to_none=True)
            history.append(ranks)
    finally:
        torch.set_num_threads(threads)
    return history


def generous_budget(task, r_max: int = 4) -> Budget:
    _, module_map, _, head, _, _ = task
    head_params = sum(p.numel() for p in head.values())
    return Budget.for_model(module_map.shapes, r_max, 32, capacity_bps=1e12, t_max_s=1.0, reserved_params=head_params)


@pytest.mark.parametrize("steps", [1, 2, 3, 5, 10, 300, 15000])
@pytest.mark.parametrize("shares", [(0.0, 0.0), (0.1, 0.2), (0.5, 0.49)])
def test_schedule_steps_are_accepted_by_peft(steps, shares):
    from peft import AdaLoraConfig

    settings = AdaLoraSettings(tinit_share=shares[0], tfinal_share=shares[1])
    tinit, tfinal = schedule_steps(steps, settings)
    AdaLoraConfig(init_r=4, total_step=steps, tinit=tinit, tfinal=tfinal)  # raises if no budgeting phase is left
    assert tinit >= 0 and tfinal >= (1 if steps >= 2 else 0)


def test_phases_cut_to_the_bits_target_and_freeze():
    task = tiny_task()
    model, _, adapters, head, _, _ = task
    budget = generous_budget(task)
    full_bits = budget.bits({key: 4 for key in budget.keys})
    target_bits = int(0.4 * full_bits)
    config = RunConfig(adapter=AdapterConfig(r_max=4), train=TrainConfig(steps=20),
                       adalora=AdaLoraSettings(target_bits=target_bits, tinit_share=0.15, tfinal_share=0.25, delta_t=2))
    allocator = AdaLoraAllocator(config, seed=0)
    assert (allocator.tinit, allocator.tfinal) == (3, 5)
    history = drive(allocator, task, 20, lambda step: budget)
    # 1. warm-up at full rank; 2. the budget shrinks (never grows) through the budgeting phase
    assert all(set(r.values()) == {4} for r in history[:allocator.tinit + 1])
    totals = [sum(r.values()) for r in history]
    assert all(a >= b for a, b in zip(totals, totals[1:], strict=False)) and totals[-1] < totals[0]
    # 3. the final allocation (after step 15) lands within one triplet of the bits target and stays frozen
    final = history[-1]
    bits = budget.bits(final)
    assert bits <= target_bits < bits + 32 * int(budget.costs.max())
    assert all(r == final for r in history[16:])
    # PEFT zeroes the λ of every masked triplet; SVDLinear's active set is exactly the kept ones
    for key, module in adapters.modules.items():
        mask = torch.tensor(allocator.rank_pattern[f"{adapters.module_map.names[key]}.lora_E.default"])
        assert int(mask.sum()) == final[key]
        assert torch.all(module.lam[~mask] == 0) and torch.all(module.lam[mask] != 0)
        assert sorted(module.active.tolist()) == mask.nonzero().flatten().tolist()


def test_target_as_large_as_the_full_adapter_never_masks():
    task = tiny_task()
    budget = generous_budget(task)
    config = RunConfig(adapter=AdapterConfig(r_max=4), train=TrainConfig(steps=8),
                       adalora=AdaLoraSettings(target_bits=10**12, tinit_share=0.0, tfinal_share=0.25, delta_t=1))
    history = drive(AdaLoraAllocator(config, seed=0), task, 8, lambda step: budget)  # kthvalue(k=0) would raise
    assert all(set(r.values()) == {4} for r in history)


@pytest.mark.parametrize(("regime", "design_snr_db"), [("paper", -5.0), ("delivery", -3.0)])
def test_default_target_is_the_largest_adapter_that_fits_its_design_snr(regime, design_snr_db):
    """The lowest SNR in the paper's regime (every step fits); the delivery SNR (the median here) in the default."""
    task = tiny_task()
    _, module_map, _, head, _, _ = task
    config = RunConfig(adapter=AdapterConfig(r_max=4), train=TrainConfig(steps=10, regime=regime))
    config.channel.snr_db = (-5.0, -3.0, 15.0)
    head_params = sum(p.numel() for p in head.values())

    def budget_at(snr_db):
        return Budget.for_model(module_map.shapes, 4, 32, capacity_bps(snr_db, config.channel, 2e5), 1.0, head_params)

    allocator = AdaLoraAllocator(config, seed=0)
    allocator.allocate(AllocationContext(0, 15.0, budget_at(15.0), 0.5, 0.0, {}, 2e5))  # any step's budget will do
    design = budget_at(design_snr_db)
    expected = math.floor(design.capacity_bps * 1.0) - 32 * head_params  # bits within 1 s, less the fp32 head
    assert allocator.target_bits == expected and allocator.precision == 32
    assert 0 < expected < 4 * 32 * int(design.costs.sum())  # the constraint binds on 200 kHz


@pytest.fixture(scope="module")
def cli_runs(tmp_path_factory, tiny_files):
    """Three short runs through the CLI entry point (in process: a subprocess costs seconds of imports each)."""
    root = tmp_path_factory.mktemp("adalora_cli")
    model, data, config = tiny_files
    base = ["run", "--config", config, "--model", model, "--data", data, "--r-max", 4, "--quiet"]
    threads = torch.get_num_threads()
    # uniform on a tight link sets the target; adalora matches it on a link where everything fits, evaluating only
    # at its last step so the delivered adapter is its final allocation
    assert airlora(*base, "--steps", 4, "--snr-db", 0, "--bandwidth-hz", 6e4, "--out", root / "uniform") == 0
    assert airlora(*base, "--steps", 12, "--eval-every", 12, "--snr-db", 20, "--bandwidth-hz", 1e6,
                   "--allocator", "adalora", "--match-bits-of", root / "uniform", "--out", root / "adalora") == 0
    assert airlora(*base, "--steps", 4, "--snr-db=-5,10", "--bandwidth-hz", 5e4, "--allocator", "heuristic",
                   "--out", root / "heuristic") == 0
    torch.set_num_threads(threads)  # the runs set it from their config
    return {name: json.loads((root / name / "summary.json").read_text()) for name in ("uniform", "adalora",
                                                                                       "heuristic")}, root


def airlora(*args) -> int:
    """``airlora`` with these arguments, in this process; its exit status."""
    return main([str(a) for a in args])


@pytest.mark.integration
def test_match_bits_of_lands_within_one_triplet(cli_runs):
    summaries, _ = cli_runs
    target, got = summaries["uniform"]["on_air_bits"], summaries["adalora"]
    assert got["best_step"] == 11
    reference.assert_delivery_fits(cli_runs[1] / "adalora")
    assert sum(summaries["uniform"]["ranks"].values()) > 0  # uniform delivered triplets, not the head alone
    cfg = json.loads((cli_runs[1] / "adalora" / "config.json").read_text())
    assert cfg["adalora"]["target_bits"] == target  # the whole delivery: head and reserved overhead included
    largest_triplet_bits = 32 * (48 + 32 + 1)  # fc1/fc2 of the tiny BERT: d_in + d_out + 1
    assert got["on_air_bits"] <= target < got["on_air_bits"] + largest_triplet_bits
    assert got["transmitted_bits"] < 4 * 12 * 66 * 32  # it did cut: below the full rank-4 adapter


@pytest.mark.integration
def test_new_allocators_summaries_have_the_same_keys(cli_runs):
    summaries, root = cli_runs
    assert set(summaries["adalora"]) == set(summaries["uniform"]) == set(summaries["heuristic"])
    for name in ("adalora", "heuristic"):
        assert summaries[name]["allocator"] == name
        reference.assert_delivery_fits(root / name)
        assert summaries[name]["steps_over_budget"] == 0


@pytest.mark.integration
def test_match_bits_of_needs_adalora_and_a_finished_run(cli_runs, capsys):
    _, root = cli_runs
    assert airlora("run", "--out", root / "x", "--match-bits-of", root / "uniform") == 2
    assert "--allocator adalora" in capsys.readouterr().err
    assert airlora("run", "--out", root / "x", "--allocator", "adalora", "--match-bits-of", root / "nothing") == 2
    assert "transmitted_bits" in capsys.readouterr().err and not (root / "x").exists()


def test_rank_zero_steps_do_not_break_peft_scoring():
    """A module trained at rank 0 has no gradient; PEFT's update_ipt multiplies by p.grad all the same."""
    task = tiny_task()
    budget = generous_budget(task)
    config = RunConfig(adapter=AdapterConfig(r_max=4), train=TrainConfig(steps=20),  # 6 of 20: before the final
                       adalora=AdaLoraSettings(target_bits=int(0.5 * budget.bits({k: 4 for k in budget.keys}))))
    allocator = AdaLoraAllocator(config, seed=0)
    original = allocator.allocate
    allocator.allocate = lambda ctx: {**original(ctx), "layers.0.q": 0}  # as if the channel cut this module
    history = drive(allocator, task, 6, lambda step: budget)
    assert all(r["layers.0.q"] == 0 for r in history)
    scores = allocator.sensitivity.scores()
    assert np.all(scores["layers.0.q"] == 0) and np.all(scores["layers.0.k"] > 0)
