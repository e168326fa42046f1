"""The `heuristic` allocator: the greedy importance-per-bit fill, AdaLoRA's triplet scores, and lower ranks at
lower SNR."""

import itertools

import numpy as np
import pytest

from airlora.allocators import AllocationContext
from airlora.allocators.adalora import TripletSensitivity
from airlora.allocators.heuristic import HeuristicAllocator, greedy_fill
from airlora.channel import Budget, param_cap
from airlora.config import AdapterConfig, RunConfig, TrainConfig
from tests.test_adalora import drive, tiny_task


def _budget(costs, capacity_bps, r_max=4, bits=32, reserved=0):
    keys = [f"layers.0.{m}" for m in ("q", "k", "v", "o", "fc1", "fc2")][: len(costs)]
    return Budget(tuple(keys), np.array(costs), r_max, bits, capacity_bps, 1.0, reserved)


@pytest.mark.parametrize("bits, capacity", [(32, 1e3), (16, 12345.678), (8, 7.7e6), (32, 1.0e-3 * 3)])
def test_param_cap_is_the_budgets_own_boundary(bits, capacity):
    budget = _budget([1], capacity, r_max=10**9, bits=bits)
    cap = param_cap(bits, capacity, 1.0)
    assert budget.feasible({"layers.0.q": cap}) and not budget.feasible({"layers.0.q": cap + 1})


def test_equal_costs_take_the_best_triplets():
    values = {"layers.0.q": np.array([9.0, 1.0, 0.5, 0.1]), "layers.0.k": np.array([8.0, 7.0, 6.0, 0.2]),
              "layers.0.v": np.array([0.3, 5.0, 4.0, 0.0])}
    budget = _budget([10, 10, 10], capacity_bps=32 * 50)  # room for exactly 5 triplets
    ranks = greedy_fill(budget, dict.fromkeys(budget.keys, 0), values)
    # the five best values are 9 (q), 8, 7, 6 (k), 5 (v): every module's triplets are counted best first
    assert ranks == {"layers.0.q": 1, "layers.0.k": 3, "layers.0.v": 1}


def test_value_per_bit_prefers_cheap_triplets():
    values = {"layers.0.q": np.full(4, 5.0), "layers.0.k": np.full(4, 1.0)}  # per parameter: 0.5 vs 1.0
    budget = _budget([10, 1], capacity_bps=32 * 14)
    assert greedy_fill(budget, dict.fromkeys(budget.keys, 0), values) == {"layers.0.q": 1, "layers.0.k": 4}


def test_fill_is_feasible_maximal_and_keeps_its_floor():
    rng = np.random.default_rng(0)
    for _ in range(200):
        m = int(rng.integers(1, 7))
        costs = rng.integers(1, 40, m)
        budget = _budget(costs, capacity_bps=float(rng.uniform(10, 32 * 4 * costs.sum() * 1.2)), reserved=3)
        floor = min(budget.max_uniform_rank(), int(rng.integers(0, 3)))
        values = {key: rng.exponential(size=4) for key in budget.keys}
        ranks = greedy_fill(budget, dict.fromkeys(budget.keys, floor), values)
        if not budget.feasible(dict.fromkeys(budget.keys, 0)):  # not even the reserved head fits: nothing to add
            assert set(ranks.values()) == {0}
            continue
        assert budget.feasible(ranks) and all(r >= floor for r in ranks.values())
        room = param_cap(32, budget.capacity_bps, 1.0) - budget.params(ranks)
        assert all(room < c for key, c in zip(budget.keys, costs, strict=True) if ranks[key] < 4)


def test_fill_is_optimal_when_costs_are_equal():
    """With equal costs the greedy fill is the exact knapsack optimum: compare with every allocation."""
    rng = np.random.default_rng(1)
    for _ in range(20):
        budget = _budget([7, 7, 7], capacity_bps=32 * 7 * int(rng.integers(0, 13)))
        best_first = {key: np.sort(rng.exponential(size=4))[::-1] for key in budget.keys}
        ranks = greedy_fill(budget, dict.fromkeys(budget.keys, 0), best_first)
        worth = {r: sum(best_first[key][:n].sum() for key, n in zip(budget.keys, r, strict=True))
                 for r in itertools.product(range(5), repeat=3)
                 if budget.feasible(dict(zip(budget.keys, r, strict=True)))}
        assert worth[tuple(ranks[k] for k in budget.keys)] == pytest.approx(max(worth.values()))


def test_scores_reproduce_peft_masks():
    task = tiny_task()
    model, _, adapters, _, _, _ = task
    config = RunConfig(adapter=AdapterConfig(r_max=4), train=TrainConfig(steps=10))
    heuristic = HeuristicAllocator(config, seed=0)
    budget = Budget.for_model(task[1].shapes, 4, 32, 1e12, 1.0)
    drive(heuristic, task, 4, lambda step: budget)
    sensitivity = heuristic.sensitivity
    assert isinstance(sensitivity, TripletSensitivity)
    scores = sensitivity.scores()
    flat = sorted(((v, key, j) for key, s in scores.items() for j, v in enumerate(s)), reverse=True)
    assert flat[-1][0] > 0 and len({v for v, _, _ in flat}) == len(flat)  # all trained, no ties
    for keep in (1, 17, 40):
        pattern = sensitivity.peft.mask_to_budget(model, keep)  # zeroes λ: done last
        kept = {(adapters.module_map.names[key], j) for _, key, j in flat[:keep]}
        got = {(name.removesuffix(".lora_E.default"), j) for name, m in pattern.items() for j, b in enumerate(m) if b}
        assert got == kept


def test_heuristic_reduces_rank_under_low_snr():
    task = tiny_task()
    _, module_map, _, head, _, _ = task
    config = RunConfig(adapter=AdapterConfig(r_max=4), train=TrainConfig(steps=10))
    heuristic = HeuristicAllocator(config, seed=0)
    head_params = sum(p.numel() for p in head.values())
    full = 4 * sum(d_in + d_out + 1 for d_in, d_out in module_map.shapes.values()) + head_params

    def budget_for(share):
        return Budget.for_model(module_map.shapes, 4, 32, capacity_bps=32 * full * share, t_max_s=1.0,
                                reserved_params=head_params)

    history = drive(heuristic, task, 6, lambda step: budget_for([1.2, 0.2, 0.6][step % 3]))
    assert all(budget_for([1.2, 0.2, 0.6][i % 3]).feasible(r) for i, r in enumerate(history))
    totals = {}
    for share in (0.1, 0.3, 0.6, 0.9, 1.2):
        budget = budget_for(share)
        ranks = heuristic.allocate(AllocationContext(6, 0.0, budget, 0.5, 0.0, history[-1], 1e6))
        assert budget.feasible(ranks)
        assert min(ranks.values()) >= budget.max_uniform_rank() // 2  # the budget-proportional floor
        totals[share] = budget.params(ranks)
    assert list(totals.values()) == sorted(totals.values()) and totals[1.2] == full
    assert totals[0.3] > 0.25 * full  # the fill uses the room: within one triplet of the 30 % budget
    assert totals[0.3] > param_cap(32, budget_for(0.3).capacity_bps, 1.0) - 81
    scores = heuristic.sensitivity.scores()
    assert all(np.all(s >= 0) for s in scores.values()) and any(np.any(s > 0) for s in scores.values())
