"""AirLLM against the best baseline at each budget: accuracy and bits, paired by seed (the project's goal).

The goal: AirLLM at or above the accuracy of the best baseline (the one of highest mean accuracy among AdaLoRA,
uniform and the channel heuristic) with at most 75 % of its on-air bits, and no run over its budget.
"""

from __future__ import annotations

from typing import Any

from airlora.sweep.claims import AIRLLM, delivery_rows, differing, on_air_bits
from airlora.sweep.stats import mean_ci, paired
from airlora.sweep.tables import label, markdown

Row = dict[str, Any]
BASELINES = ("adalora", "uniform", "heuristic")
BITS_SHARE = 0.75
"""The most of the best baseline's on-air bits AirLLM may use for the goal."""


def compare(rows: list[Row]) -> dict[str, Any] | None:
    """AirLLM against the most accurate baseline among ``rows`` (one budget), paired by seed: None without both.

    ``met``: AirLLM's mean paired accuracy difference is ≥ 0, its mean share of the baseline's bits ≤ BITS_SHARE and
    no compared run went over its budget (a point estimate; the table shows the interval beside it)."""
    by = {m: {r["seed"]: r for r in rows if r["method"] == m} for m in (AIRLLM, *BASELINES)}
    present = [m for m in BASELINES if by[m]]
    if not by[AIRLLM] or not present:
        return None
    best = max(present, key=lambda m: mean_ci([r["test_accuracy"] for r in by[m].values()]).mean)
    seeds = sorted(set(by[AIRLLM]) & set(by[best]))
    if not seeds:
        return None
    accuracy = paired({s: by[AIRLLM][s]["test_accuracy"] for s in seeds},
                      {s: by[best][s]["test_accuracy"] for s in seeds})
    bits = mean_ci([on_air_bits(by[AIRLLM][s]) / on_air_bits(by[best][s]) for s in seeds])
    compared = [r for m in (AIRLLM, *BASELINES) for r in by[m].values()]
    in_budget = all(r["budget_ok"] and not r.get("steps_over_budget") for r in compared)
    changed, pairs = differing(rows, lambda r: r["method"] == AIRLLM, lambda r: r["method"] == best)
    return {"best_baseline": best, "n": len(seeds),
            "airllm_accuracy": mean_ci([by[AIRLLM][s]["test_accuracy"] for s in seeds]).mean,
            "baseline_accuracy": mean_ci([by[best][s]["test_accuracy"] for s in seeds]).mean,
            "accuracy_diff": accuracy.mean, "accuracy_diff_half_width": accuracy.half_width,
            "bits_ratio": bits.mean, "bits_ratio_half_width": bits.half_width,
            "differ": changed, "pairs": pairs, "in_budget": in_budget,
            "met": accuracy.mean >= 0 and bits.mean <= BITS_SHARE and in_budget}


def goal(rows: list[Row]) -> dict[str, Any]:
    """The comparison at the delivery budget of the Table III runs, and at each SNR they were also delivered at."""
    per_snr = delivery_rows(rows)
    at = {snr: compare([r for r in per_snr if r["snr_setting"] == snr])
          for snr in sorted({r["snr_setting"] for r in per_snr}, key=float)}
    return {"delivery": compare(rows), "per_snr": {k: v for k, v in at.items() if v is not None}}


def goal_table(check: dict[str, Any]) -> str:
    """The markdown table of ``goal``: one line per budget."""
    body = []
    for where, c in [("as delivered", check["delivery"])] + [(f"delivered at {snr} dB", c)
                                                                for snr, c in check["per_snr"].items()]:
        if c is None:
            continue
        body.append([where, label(c["best_baseline"]), f"{c['baseline_accuracy']:.4f}", f"{c['airllm_accuracy']:.4f}",
                     f"{100 * c['accuracy_diff']:+.2f} ± {100 * c['accuracy_diff_half_width']:.2f}",
                     f"{c['bits_ratio']:.2f} ± {c['bits_ratio_half_width']:.2f}", f"{c['differ']} of {c['pairs']}",
                     "yes" if c["in_budget"] else "NO", "met" if c["met"] else "missed"])
    return markdown(["budget", "best baseline", "its accuracy", "AirLLM accuracy", "AirLLM − best (pp, 95 % CI)",
                     "AirLLM bits / best's", "pairs delivering different adapters", "all in budget",
                     f"goal (mean ≥ its accuracy, ≤ {BITS_SHARE:.0%} of its bits, all in budget)"], body)
