"""Accuracy against the airtime budget (experiment ``budget_front``): rank-only, post-hoc int8 and joint fronts.

Each run of the experiment has one fixed SNR and a T_max; its budget is C·T_max bits. The methods:
- rank-only: one allowed precision (``channel.bits: [32]``), the allocator chooses ranks;
- rank-only + post-hoc int8: those runs exported at int8 and evaluated on the edge, no extra training
  (the sweep file's ``posthoc.exports: [8]``); they use a quarter of the bits the run budgeted;
- joint: several allowed precisions, the allocator chooses ranks and precisions (the edge's accuracy of its own
  delivery, ``posthoc.exports: [run]``, is reported beside the run's).
Comparisons are paired by seed: at each budget the best joint method (by mean) against the best rank-only one.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from airlora.codecs import CODECS, sent_bits
from airlora.sweep.stats import Estimate, mean_ci, paired
from airlora.sweep.tables import label

Row = dict[str, Any]
EXPERIMENT = "budget_front"
LOSS_POINTS = 0.03
"""The issue's test point: the tightest budget where rank-only loses at least 3 points against the largest budget."""


def kind(row: Row) -> str:
    """'rank-only' or 'joint', by how many precisions the run was allowed."""
    return "joint" if "," in str(row["bits"]) else "rank-only"


def series(rows: list[Row]) -> dict[str, dict[float, dict[int, float]]]:
    """Method name -> budget (Mbit) -> seed -> test accuracy; post-hoc exports as methods of their own."""
    out: dict[str, dict[float, dict[int, float]]] = {}
    for r in rows:
        budget = round(r["capacity_bps"] * r["t_max_s"] / 1e6, 6)
        name = f"{label(r['method'])} {'joint' if kind(r) == 'joint' else CODECS[int(r['bits'])].name}"
        out.setdefault(name, {}).setdefault(budget, {})[r["seed"]] = r["test_accuracy"]
        for export, record in (r.get("posthoc") or {}).items():
            if record.get("status") == "ok" and export != "run":
                post = f"{name} → {export} post-hoc"
                out.setdefault(post, {}).setdefault(budget, {})[r["seed"]] = record["edge_test_accuracy"]
    return out


def _best(data: dict[str, dict[float, dict[int, float]]], names: list[str], budget: float) -> str | None:
    """The method among ``names`` with the highest mean accuracy at ``budget``."""
    present = [n for n in names if budget in data[n]]
    return max(present, key=lambda n: float(np.mean(list(data[n][budget].values())))) if present else None


def front_table(rows: list[Row]) -> tuple[str, dict[str, Any]]:
    """The markdown table (methods × budgets, mean ± 95 % CI over seeds), the goal check, and its numbers."""
    data = series(rows)
    budgets = sorted({b for per in data.values() for b in per})
    t_of = {round(r["capacity_bps"] * r["t_max_s"] / 1e6, 6): r["t_max_s"] for r in rows}
    names = sorted(data)
    lines = ["| method | " + " | ".join(f"{b:.3g} Mbit (T_max {t_of[b]:g} s)" for b in budgets) + " |",
             "|---|" + "---|" * len(budgets)]
    for name in names:
        cells = [mean_ci(list(data[name][b].values())).format(4) if b in data[name] else "–" for b in budgets]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    joint = [n for n in names if n.endswith(" joint")]
    rank_only = [n for n in names if n not in joint]
    check: dict[str, Any] = {"budgets": budgets, "rows": []}
    lines += ["", "| budget (Mbit) | best rank-only | best joint | joint − rank-only (paired) | rank-only loss vs the "
              "largest budget | share of that loss joint recovers |", "|---|---|---|---|---|---|"]
    top = _best(data, rank_only, budgets[-1]) if budgets else None
    ceiling = float(np.mean(list(data[top][budgets[-1]].values()))) if top else float("nan")
    for b in budgets:
        r_best, j_best = _best(data, rank_only, b), _best(data, joint, b)
        if r_best is None or j_best is None:
            continue
        diff: Estimate = paired(data[j_best][b], data[r_best][b])
        loss = ceiling - float(np.mean(list(data[r_best][b].values())))
        recovered = diff.mean / loss if loss > 0 else float("nan")
        check["rows"].append({"budget_mbit": b, "rank_only": r_best, "joint": j_best, "diff": diff.mean,
                              "diff_half_width": diff.half_width, "n": diff.n, "rank_only_loss": loss,
                              "recovered": recovered})
        lines.append(f"| {b:.3g} | {r_best} | {j_best} | {diff.format(4)} | {loss:.4f} | "
                     f"{'–' if np.isnan(recovered) else f'{recovered:.2f}'} |")
    never_below = all(r["diff"] + (r["diff_half_width"] if np.isfinite(r["diff_half_width"]) else 0) >= 0
                      for r in check["rows"])
    test = next((r for r in check["rows"] if r["rank_only_loss"] >= LOSS_POINTS), None)
    check["never_below"] = never_below
    check["test_point"] = test
    lines += ["", f"Goal 1, the joint front never below the best rank-only front by more than its CI: "
                  f"{'met' if never_below else 'NOT met'}."]
    if test is None:
        lines.append(f"Goal 2: no budget where rank-only loses ≥ {LOSS_POINTS * 100:g} points against the largest "
                     "budget; nothing to recover.")
    else:
        lines.append(f"Goal 2, at the tightest budget where rank-only loses ≥ {LOSS_POINTS * 100:g} points "
                     f"({test['budget_mbit']:.3g} Mbit: {test['rank_only_loss'] * 100:.1f} points), joint recovers "
                     f"{test['recovered']:.2f} of the loss (goal ≥ 0.67): "
                     f"{'met' if test['recovered'] >= 2 / 3 else 'NOT met'}.")
    return "\n".join(lines), check


def accuracy_vs_budget(rows: list[Row], path: Path) -> Path:
    """Test accuracy (mean ± 95 % CI over seeds) against the airtime budget in Mbit, one line per method."""
    from airlora.sweep.figures import plt, save

    data = series(rows)
    fig, ax = plt.subplots(figsize=(7.5, 4.6), layout="constrained")
    for name in sorted(data):
        budgets = sorted(data[name])
        stats = [mean_ci(list(data[name][b].values())) for b in budgets]
        style = "--" if "post-hoc" in name else "-" if name.endswith("joint") else ":"
        ax.errorbar(budgets, [s.mean for s in stats], yerr=np.nan_to_num([s.half_width for s in stats]),
                    linestyle=style, marker="o", capsize=3, label=name)
    ax.set(xscale="log", xlabel="airtime budget C·T_max (Mbit)", ylabel="test accuracy (after the codecs)",
           title="Accuracy vs airtime budget")
    ax.legend(fontsize=7)
    return save(fig, path)


def joint_heatmaps(rows: list[Row], budget_mbit: float | None, path: Path) -> tuple[Path, Row] | None:
    """Per-module rank and precision of one joint run (the first seed of the best joint method at ``budget_mbit``,
    default the tightest budget), as two layer × module heat-maps; None without a joint run."""
    from airlora.sweep.figures import heatmap_panels

    joint = [r for r in rows if kind(r) == "joint"]
    if not joint:
        return None
    budgets = sorted({round(r["capacity_bps"] * r["t_max_s"] / 1e6, 6) for r in joint})
    budget = budget_mbit if budget_mbit in budgets else budgets[0]
    at = [r for r in joint if round(r["capacity_bps"] * r["t_max_s"] / 1e6, 6) == budget]
    by_method: dict[str, list[Row]] = {}
    for r in at:
        by_method.setdefault(r["method"], []).append(r)
    method = max(by_method, key=lambda m: float(np.mean([r["test_accuracy"] for r in by_method[m]])))
    run = min(by_method[method], key=lambda r: r["seed"])
    panels = {f"{label(method)} joint, {budget:.3g} Mbit: rank": (run["ranks"], float(max(run["ranks"].values()) or 1)),
              "bits per value": (run["precisions"], 32.0)}
    return heatmap_panels(panels, path, unit="rank / bits"), run


def delivery_text(run: Row) -> str:
    """The delivery of one joint run, from its 'run' post-hoc export: bytes by kind, airtime, edge vs cloud."""
    record = (run.get("posthoc") or {}).get("run")
    if not record or record.get("status") != "ok":
        return "(no 'run' export of this run: add `posthoc: {exports: [run]}` to the sweep file)"
    used = sent_bits(run["ranks"], record["precisions"])
    return (f"Run `{run['run_id']}` (seed {run['seed']}), precisions used {'/'.join(map(str, used))} bits, head at "
            f"{record['head_bits']}: payload {record['payload_bytes']:,} bytes + scales {record['scale_bytes']:,} + "
            f"overhead {record['overhead_bytes']:,} on the air (header {record['header_bytes']:,}, config "
            f"{record['config_bytes']:,}, manifest {record['manifest_bytes']:,} bytes raw; reserved "
            f"{record['reserved_overhead_bytes']:,}); airtime {record['airtime_s']:.4f} s of T_max "
            f"{record['t_max_s']:g} s ({'fits' if record['fits_t_max'] else 'OVER'}); edge accuracy "
            f"{record['edge_test_accuracy']:.4f}, cloud {record['cloud_test_accuracy']:.4f} (largest logit difference "
            f"{record['max_abs_logit_diff']:.2g}).")
