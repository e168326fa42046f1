"""Accuracy against on-air bits per budget: points from every delivery of every run, headroom and the goal check."""

import pytest

from airlora.sweep.points import goal_rows, goal_table, points


def row(method, seed, accuracy, bits, front=(), t_max_s=0.2):
    return {"status": "ok", "method": method, "seed": seed, "dataset": "tweets", "t_max_s": t_max_s,
            "bits": "4,8,16,32", "test_accuracy": accuracy, "on_air_bits": bits,
            "budget_front": [{"t_max_s": t, "bits": b, "test_accuracy": a, "on_air_bits": n} for t, b, a, n in front]}


def uniform(seed, tight):
    return row("uniform", seed, 0.85, 800_000, [(0.05, [4, 8, 16, 32], tight, 200_000), (2.7, [32], 0.86, 10_000_000),
                                                  (0.05, [32], tight - 0.05, 100_000)])


def test_each_delivery_is_a_point_and_a_run_s_own_comes_first():
    data = points([uniform(0, 0.80)])
    assert set(data) == {("tweets", "joint", 0.2), ("tweets", "joint", 0.05), ("tweets", "fp32", 2.7),
                         ("tweets", "fp32", 0.05)}
    assert data[("tweets", "fp32", 0.05)]["uniform"] == {0: (0.75, 100_000)}


def test_the_learned_allocator_against_the_best_baseline_where_there_is_headroom():
    rows = [uniform(s, a) for s, a in enumerate((0.80, 0.81, 0.82))]
    rows += [row("compress", s, 0.84, 790_000, [(0.05, [4, 8, 16, 32], a, 210_000)])
             for s, a in enumerate((0.79, 0.80, 0.81))]
    rows += [row("ppo+ddim-mlp", s, a, 100_000, t_max_s=0.05) for s, a in enumerate((0.83, 0.835, 0.845))]
    goals = {(g["precisions"], g["t_max_s"]): g for g in goal_rows(rows)}
    tight = goals[("joint", 0.05)]
    # by hand: best baseline uniform (mean 0.81), ceiling 0.86 at 2.7 s, learned − uniform = 0.03, 0.025, 0.025
    assert tight["best_baseline"] == "uniform" and tight["ceiling"] == pytest.approx(0.86)
    assert tight["headroom"] == pytest.approx(0.05) and tight["diff"] == pytest.approx(0.08 / 3)
    assert tight["bits_share"] == pytest.approx(0.5) and tight["goal_met"]
    wide = goals[("joint", 0.2)]  # uniform 0.85 against the 0.86 ceiling: 1 point, no room, no learned run there
    assert wide["headroom"] == pytest.approx(0.01) and "learned" not in wide
    table = goal_table(rows)
    assert "| met |" in table and "no room" in table


def test_a_learned_allocator_that_only_matches_with_as_many_bits_misses():
    rows = [uniform(s, a) for s, a in enumerate((0.80, 0.81, 0.82))]
    rows += [row("ppo+ddim-mlp", s, a, 200_000, t_max_s=0.05) for s, a in enumerate((0.80, 0.815, 0.82))]
    tight = next(g for g in goal_rows(rows) if g["t_max_s"] == 0.05 and g["precisions"] == "joint")
    assert tight["bits_share"] == pytest.approx(1.0) and not tight["goal_met"]
