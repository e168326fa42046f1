"""Accuracy against on-air bits where allocation can matter: every delivery of every run, per task and budget.

A run contributes its own delivery (its T_max, its allowed precisions) and, with ``train.deliver_t_max_s``, the
deliveries of its one trained adapter at other budgets (the summary's ``budget_front``): in the ``delivery`` regime
training does not depend on the budget, so those are what runs at those budgets deliver. A point is (task, precision
set, T_max, method, seed) -> (test accuracy, on-air bits). Per task the ceiling is the best mean accuracy at the
largest budget; the headroom at a budget is the ceiling minus the best baseline there. Where it is at least 1.5
points, the learned allocator (airllm) is compared with that baseline, paired by seed (the goal of issue 27).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from airlora.sweep.stats import mean_ci, paired
from airlora.sweep.tables import label

Row = dict[str, Any]
Key = tuple[str, str, float]
"""(task, precision set, T_max in s)."""
HEADROOM = 0.015
"""The least gap between the ceiling and the best baseline at which a budget is said to leave room to allocate."""
LEARNED = ("ppo+ddim-mlp", "ppo", "ddim", "ppo+ddpm", "ppo+ddim-unet")
"""Methods that are the learned policy (the rest are baselines)."""


def precision_set(bits: Any) -> str:
    """'fp32' for one allowed precision of 32 bits, 'joint' for several (the rest by their list)."""
    values = list(bits) if isinstance(bits, list) else [int(b) for b in str(bits).split(",")]  # row: "4,8,16,32"
    return "joint" if len(values) > 1 else "fp32" if values == [32] else f"{values[0]}-bit"


def points(rows: list[Row]) -> dict[Key, dict[str, dict[int, tuple[float, int]]]]:
    """(task, precision set, T_max) -> method -> seed -> (test accuracy, on-air bits); a run's own delivery first."""
    out: dict[Key, dict[str, dict[int, tuple[float, int]]]] = {}
    for r in rows:
        if r["status"] != "ok":
            continue
        own = {"t_max_s": r["t_max_s"], "bits": r["bits"], "test_accuracy": r["test_accuracy"],
               "on_air_bits": r["on_air_bits"]}
        for p in [own, *(r.get("budget_front") or [])]:
            key = (r["dataset"], precision_set(p["bits"]), round(float(p["t_max_s"]), 6))
            seeds = out.setdefault(key, {}).setdefault(r["method"], {})
            seeds.setdefault(r["seed"], (p["test_accuracy"], int(p["on_air_bits"])))
    return out


def ceilings(data: dict[Key, dict[str, dict[int, tuple[float, int]]]]) -> dict[str, float]:
    """Per task: the best mean accuracy of any method at the task's largest budget (every triplet fits there)."""
    out: dict[str, float] = {}
    for task in {k[0] for k in data}:
        top = max(k[2] for k in data if k[0] == task)
        out[task] = max(np.mean([a for a, _ in seeds.values()]) for k, per in data.items()
                        if k[0] == task and k[2] == top for seeds in per.values())
    return out


def goal_rows(rows: list[Row]) -> list[dict[str, Any]]:
    """Per (task, precision set, T_max): the best baseline, the headroom, and the learned allocator against it."""
    data = points(rows)
    ceiling = ceilings(data)
    out = []
    for key in sorted(data):
        per = data[key]
        baselines = [m for m in per if m.removesuffix(" [paper]") not in LEARNED]
        if not baselines:
            continue
        best = max(baselines, key=lambda m: np.mean([a for a, _ in per[m].values()]))
        accuracy = float(np.mean([a for a, _ in per[best].values()]))
        row: dict[str, Any] = {"task": key[0], "precisions": key[1], "t_max_s": key[2], "best_baseline": best,
                               "best_baseline_accuracy": accuracy,
                               "best_baseline_kbit": float(np.mean([b for _, b in per[best].values()])) / 1e3,
                               "ceiling": ceiling[key[0]], "headroom": ceiling[key[0]] - accuracy}
        learned = [m for m in LEARNED if m in per]  # the paper's AirLLM (ppo+ddim-mlp) first when a sweep has several
        common = [s for s in per[learned[0]] if s in per[best]] if learned else []
        if common:
            m = learned[0]
            diff = paired({s: per[m][s][0] for s in common}, {s: per[best][s][0] for s in common})
            shares = [per[m][s][1] / per[best][s][1] for s in common if per[best][s][1] > 0]
            share = float(np.mean(shares)) if shares else float("nan")
            accuracy_win = diff.mean >= 0.01 and diff.mean - diff.half_width > 0
            bits_win = share <= 0.75 and diff.mean + diff.half_width >= 0
            row |= {"learned": m, "diff": diff.mean, "diff_half_width": diff.half_width, "n": diff.n,
                    "bits_share": share, "goal_met": bool(row["headroom"] >= HEADROOM and (accuracy_win or bits_win))}
        out.append(row)
    return out


def goal_table(rows: list[Row]) -> str:
    """Markdown: one line per budget, the best baseline and its headroom, the learned allocator's paired difference."""
    lines = ["| task | precisions | T_max (s) | best baseline | its accuracy | its kbit | ceiling − it (points) | "
             "learned − it (points, paired) | learned's bits / its | goal |", "|---" * 10 + "|"]
    for g in goal_rows(rows):
        room = g["headroom"] >= HEADROOM
        learned = (f"{100 * g['diff']:+.2f} ± {100 * g['diff_half_width']:.2f} (n={g['n']})",
                   f"{g['bits_share']:.2f}", "met" if g["goal_met"] else "NOT met" if room else "no room"
                   ) if "learned" in g else ("–", "–", "no learned run" if room else "no room")
        lines.append(f"| {g['task']} | {g['precisions']} | {g['t_max_s']:g} | {label(g['best_baseline'])} | "
                     f"{g['best_baseline_accuracy']:.4f} | {g['best_baseline_kbit']:.0f} | "
                     f"{100 * g['headroom']:.2f} | " + " | ".join(learned) + " |")
    return "\n".join(lines)


def front_table(rows: list[Row]) -> str:
    """Markdown: per task and precision set, each method's accuracy (mean ± 95 % CI) and kbit at each T_max."""
    data = points(rows)
    lines = []
    for task, precisions in sorted({k[:2] for k in data}):
        budgets = sorted(k[2] for k in data if k[:2] == (task, precisions))
        methods = sorted({m for k in data if k[:2] == (task, precisions) for m in data[k]})
        lines += [f"**{task}, {precisions}**", "", "| method | " + " | ".join(f"{t:g} s" for t in budgets) + " |",
                  "|---|" + "---|" * len(budgets)]
        for m in methods:
            cells = []
            for t in budgets:
                seeds = data[(task, precisions, t)].get(m)
                cells.append("–" if not seeds else f"{mean_ci([a for a, _ in seeds.values()]).format(4)} "
                             f"({np.mean([b for _, b in seeds.values()]) / 1e3:.0f} kbit)")
            lines.append(f"| {label(m)} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def accuracy_vs_bits(rows: list[Row], path: Path) -> Path:
    """One panel per (task, precision set): test accuracy against mean on-air kbit, one line per method."""
    from airlora.sweep.figures import plt, save

    data = points(rows)
    panels = sorted({k[:2] for k in data})
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 4.2), layout="constrained", squeeze=False)
    for ax, (task, precisions) in zip(axes[0], panels, strict=True):
        budgets = sorted(k[2] for k in data if k[:2] == (task, precisions))
        for m in sorted({m for t in budgets for m in data[(task, precisions, t)]}):
            here = [data[(task, precisions, t)][m] for t in budgets if m in data[(task, precisions, t)]]
            stats = [mean_ci([a for a, _ in s.values()]) for s in here]
            kbit = [np.mean([b for _, b in s.values()]) / 1e3 for s in here]
            ax.errorbar(kbit, [s.mean for s in stats], yerr=np.nan_to_num([s.half_width for s in stats]),
                        marker="o", capsize=3, label=label(m))
        ax.set(xscale="log", xlabel="on-air kbit (mean over seeds)", ylabel="test accuracy (after the codecs)",
               title=f"{task}, {precisions}")
        ax.legend(fontsize=7)
    return save(fig, path)
