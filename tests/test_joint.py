"""Rank and precision chosen together: the joint modes of uniform, heuristic and adalora, a joint run end to end
(validated and tested after the codecs, delivered as it chose, the edge's accuracy the run's), and quantisation-aware
training."""

import csv
import json

import numpy as np
import pytest
import torch

from airlora.allocators import AllocationContext, make_allocator, split_decision
from airlora.allocators.heuristic import greedy_fill_joint
from airlora.budget import Budget
from airlora.codecs import CODECS, round_trip
from airlora.config import RunConfig, merge
from airlora.edge import edge_evaluate
from airlora.export import export_adapter
from airlora.ranks import MODULES, rank_key
from airlora.runner import run

MINILM = {rank_key(i, m): ((384, 384) if m in "qkvo" else (384, 1536) if m == "fc1" else (1536, 384))
          for i in range(6) for m in MODULES}
ALL = (4, 8, 16, 32)


def budget_at(capacity: float, allowed=ALL) -> Budget:
    return Budget.for_delivery(MINILM, 8, allowed, capacity, 1.0, reserved_params=770, reserved_bits=770 * 32 + 30_000)


def ctx_at(budget: Budget) -> AllocationContext:
    return AllocationContext(0, 0.0, budget, 0.5, 0.0, dict.fromkeys(budget.keys, 8), 4.69e6)


@pytest.mark.parametrize("capacity", [1.7e6, 4.0e6, 8.0e6, 2e7])
def test_uniform_joint_is_the_largest_common_rank_then_the_highest_precision(capacity):
    budget = budget_at(capacity)
    ranks, precisions = split_decision(make_allocator(RunConfig(allocator="uniform")).allocate(ctx_at(budget)))
    (rank,), (bits,) = set(ranks.values()), set(precisions.values())
    assert budget.feasible(ranks, precisions)
    assert all(budget.max_uniform_rank(b) <= rank for b in ALL)  # no precision allows a larger common rank
    higher = [b for b in ALL if b > bits]
    assert rank == 0 or all(budget.max_uniform_rank(b) < rank for b in higher)  # and none higher keeps it
    single = make_allocator(RunConfig(allocator="uniform")).allocate(ctx_at(budget_at(capacity, (32,))))
    assert isinstance(single, dict)  # one allowed precision: a plain rank mapping, as before


@pytest.mark.parametrize("capacity", [1.2e6, 1.7e6, 4.0e6, 9.0e6])
def test_heuristic_joint_fill_is_feasible_maximal_and_rank_first(capacity):
    budget = budget_at(capacity)
    rng = np.random.default_rng(0)
    scores = {k: rng.random(8) for k in budget.keys}
    ranks, precisions = greedy_fill_joint(budget, dict.fromkeys(budget.keys, 0), scores)
    assert budget.feasible(ranks, precisions)
    room = budget.room_bits(ranks, precisions)
    for m, key in enumerate(budget.keys):  # no single move of the greedy fill still fits
        level = budget.allowed_bits.index(precisions[key])
        if ranks[key] < 8:
            assert budget.unit_bits[m, level] > room
        if ranks[key] and level < 3:
            assert ranks[key] * (budget.unit_bits[m, level + 1] - budget.unit_bits[m, level]) > room
    # a triplet is worth more than any precision step of a group (ε ≤ 1/14): precisions rise only at full rank,
    # or where a module's next triplet no longer fits
    for m, key in enumerate(budget.keys):
        if precisions[key] > 4:
            assert ranks[key] == 8 or budget.unit_bits[m, budget.allowed_bits.index(precisions[key])] > room


def test_heuristic_joint_gives_bits_to_what_matters():
    budget = budget_at(1.7e6)
    important = budget.keys[4]  # layers.0.fc1
    scores = {k: np.full(8, 1.0 if k == important else 1e-3) for k in budget.keys}
    ranks, precisions = greedy_fill_joint(budget, dict.fromkeys(budget.keys, 0), scores)
    assert ranks[important] == 8 and precisions[important] > 4
    assert sum(ranks.values()) > ranks[important]  # the rest of the room still goes to triplets elsewhere


@pytest.mark.parametrize("capacity, expected", [(2e7, 32), (9.0e6, 16), (4.0e6, 8), (1.7e6, 4), (1.0e6, 4)])
def test_adalora_joint_precision_is_the_highest_at_which_its_full_adapter_fits(capacity, expected):
    config = merge(RunConfig(allocator="adalora"), {"channel.bits": list(ALL), "channel.snr_db": [0.0],
                                                    "channel.bandwidth_hz": 1e6})
    allocator = make_allocator(config)
    budget = budget_at(capacity)
    # the design SNR's capacity is this budget's: 0 dB at the bandwidth that gives it
    from airlora.channel import capacity_bps

    bandwidth = 1e6 * capacity / capacity_bps(0.0, config.channel, 1e6)
    ranks, precisions = split_decision(allocator.allocate(AllocationContext(0, 0.0, budget, 0.5, 0.0, {}, bandwidth)))
    assert set(precisions.values()) == {expected} == {allocator.precision}
    assert allocator.target_bits <= budget.room_bits(dict.fromkeys(budget.keys, 0)) + 1


# ---- a joint run on the tiny model ----

@pytest.fixture(scope="module")
def joint_run(tmp_path_factory, tiny_files):
    """A uniform run allowed every codec on a link where rank 4 fits at int8 but not at fp32."""
    from airlora.config import load_config

    model, data, config_file = tiny_files
    root = tmp_path_factory.mktemp("joint")
    config = merge(load_config(config_file), {
        "model": str(model), "data.source": str(data), "allocator": "uniform", "adapter.r_max": 4,
        "channel.bits": list(ALL), "channel.snr_db": [5.0], "channel.bandwidth_hz": 6e4, "train.steps": 6,
        "train.eval_every": 3, "train.lr": 5e-2})
    threads = torch.get_num_threads()
    summary = run(config, root / "run")
    torch.set_num_threads(threads)
    return root, config, summary


@pytest.mark.integration
def test_a_joint_run_chooses_a_lower_precision_and_reports_it(joint_run):
    _, _, s = joint_run
    assert set(s["ranks"].values()) == {4} and set(s["precisions"].values()) < {4, 8, 16}
    assert s["allowed_bits"] == list(ALL) and s["head_bits"] == 32 and s["bits_per_param"] is None
    assert s["budget_ok"] and s["airtime_s"] <= 1.0 and s["on_air_bits"] <= s["capacity_bps"]


@pytest.mark.integration
def test_the_edge_gets_the_runs_accuracy_and_the_runs_precisions(joint_run, tiny_files):
    root, _, s = joint_run
    manifest = export_adapter(root / "run", None, root / "adir")
    assert manifest["precisions"] == s["precisions"] and manifest["fits_t_max"]
    assert manifest["overhead_bytes"] <= s["delivery_overhead_bytes"]
    assert manifest["on_air_bits"] <= s["on_air_bits"]  # the real delivery within what the run budgeted
    result = edge_evaluate(root / "adir", str(tiny_files[0]))
    assert result["test_accuracy"] == s["test_accuracy"] and result["accuracy_drop"] == 0


@pytest.mark.integration
def test_validation_and_test_see_the_round_trip(tiny_config, tmp_path, monkeypatch):
    from airlora import runner as run_module
    from airlora import trainer

    seen = []
    original = trainer.evaluate

    def spy(session, batches):
        module = session.adapters.modules["layers.0.q"]
        seen.append((module.Q[module.active].detach().clone(), session.adapters.state()["layers.0.q.Q"]))
        return original(session, batches)

    monkeypatch.setattr(trainer, "evaluate", spy)
    monkeypatch.setattr(run_module, "evaluate", spy)
    config = merge(tiny_config, {"channel.bits": [4], "channel.snr_db": [5.0], "channel.bandwidth_hz": 1e6})
    run(config, tmp_path)
    assert len(seen) == 3  # two validation passes and the test pass
    for during, _ in seen:
        assert torch.equal(during, round_trip(CODECS[4], during))  # int4 values: already on the codec's grid
    module_q_after = json.loads((tmp_path / "summary.json").read_text())["precisions"]["layers.0.q"]
    assert module_q_after == 4


@pytest.mark.integration
def test_quantisation_aware_training_changes_training_only_below_fp32(tiny_config, tmp_path):
    def losses(name, **overrides):
        config = merge(tiny_config, {"channel.snr_db": [5.0], "channel.bandwidth_hz": 1e6, "train.steps": 4,
                                     **overrides})
        run(config, tmp_path / name)
        with (tmp_path / name / "metrics.csv").open() as handle:
            return [float(r["loss"]) for r in csv.DictReader(handle)]

    plain32, qat32 = losses("p32"), losses("q32", **{"train.quantization_aware": True})
    assert plain32 == qat32  # fp32 fake-quantisation is the identity
    plain4, qat4 = losses("p4", **{"channel.bits": [4]}), losses("q4", **{"channel.bits": [4],
                                                                         "train.quantization_aware": True})
    assert plain4 == plain32  # without QAT an int4 run trains exactly as fp32 (only its evaluation differs)
    assert qat4[0] == plain4[0]  # λ starts at 0, so ΔW = 0 whatever the codec does to P and Q ...
    assert qat4[1] != plain4[1]  # ... and from the first update on the forward sees int4 triplets


@pytest.mark.integration
@pytest.mark.parametrize("allocator", ["uniform", "heuristic", "adalora"])
def test_where_everything_fits_a_joint_run_is_the_rank_only_run(tiny_config, tmp_path, allocator):
    """Every joint mode chooses fp32 at r_max when it fits: same ranks, same weights, same accuracy (the budget front
    runs joint only where something does not fit)."""
    base = merge(tiny_config, {"allocator": allocator, "channel.snr_db": [5.0], "channel.bandwidth_hz": 1e6,
                               "train.steps": 10, "train.eval_every": 5})
    one = run(base, tmp_path / "one")
    joint = run(merge(base, {"channel.bits": list(ALL)}), tmp_path / "joint")
    assert set(joint["precisions"].values()) == {32}
    for key in ("ranks", "test_accuracy", "val_accuracy", "best_step", "final_step_ranks"):
        assert one[key] == joint[key], key
    with (tmp_path / "one" / "metrics.csv").open() as a, (tmp_path / "joint" / "metrics.csv").open() as b:
        assert [r["loss"] for r in csv.DictReader(a)] == [r["loss"] for r in csv.DictReader(b)]
