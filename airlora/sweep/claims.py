"""The claims table: each claim of the paper, our paired difference over seeds, and a verdict."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from airlora.sweep.stats import Estimate, paired, verdict
from airlora.sweep.tables import label, markdown, of

Row = dict[str, Any]
AIRLLM = "ppo+ddim-mlp"


def _values(rows: list[Row], keep: Callable[[Row], bool], field: str = "test_accuracy",
            key: Callable[[Row], Any] = lambda r: r["seed"]) -> dict[Any, float]:
    return {key(r): r[field] for r in rows if keep(r)}


def _method(name: str) -> Callable[[Row], bool]:
    return lambda r: r["method"] == name


def _late_reward(r: Row) -> float:
    curve = r["reward_curve"]
    return float(np.mean(curve[len(curve) // 2:]))


def _claim(claim: str, ours: str, diff: Estimate, sign: int, scale: float, unit: str,
           differ: tuple[int, int] | None = None) -> list[str]:
    """One line of the table; ``differ``: (pairs whose delivered adapters differ, pairs), None where the claim is
    not about what is delivered (a reward curve)."""
    shown = "–" if differ is None else f"{differ[0]} of {differ[1]}"
    if diff.n == 0:
        return [claim, ours, "not measured (no paired runs)", shown, "–"]
    if differ is not None and differ[0] == 0:
        return [claim, ours, f"{diff.format(2, scale)} {unit}".strip(), shown,
                "not testable here (the same adapter delivered in every pair)"]
    return [claim, ours, f"{diff.format(2, scale)} {unit}".strip(), shown, verdict(diff, sign)]


def on_air_bits(row: Row) -> int:
    """The bits a run's delivery put on the air (rows from before the codecs: its transmitted bits)."""
    return row.get("on_air_bits") or row["transmitted_bits"]


def delivered(row: Row) -> tuple[tuple, tuple, int]:
    """What a run delivered: its ranks and precisions per module and its on-air bits (older rows: the ranks and
    the transmitted bits)."""
    ranks = tuple(sorted(row["ranks"].items()))
    precisions = tuple(sorted((row.get("precisions") or {}).items()))
    return ranks, precisions, on_air_bits(row)


def differing(rows: list[Row], a: Callable[[Row], bool], b: Callable[[Row], bool]) -> tuple[int, int]:
    """(seeds at which the runs kept by ``a`` and ``b`` delivered different adapters, seeds both have)."""
    left = {r["seed"]: delivered(r) for r in rows if a(r)}
    right = {r["seed"]: delivered(r) for r in rows if b(r)}
    common = set(left) & set(right)
    return sum(left[k] != right[k] for k in common), len(common)


def _accuracy_claim(claim: str, ours: str, rows: list[Row], a: Callable[[Row], bool],
                    b: Callable[[Row], bool]) -> list[str]:
    """Accuracy of ``a`` − ``b``, paired by seed, in points, claimed positive."""
    return _claim(claim, ours, paired(_values(rows, a), _values(rows, b)), 1, 100, "pp", differing(rows, a, b))


def claims(rows: list[Row]) -> list[list[str]]:
    """One line per claim whose experiment is in ``rows``: [claim, our comparison, difference, pairs delivering
    different adapters, verdict]."""
    out = []
    table3, snr, rmax = of(rows, "table3"), of(rows, "snr"), of(rows, "r_max")
    per_snr = not snr
    snr = snr or delivery_rows(table3)
    pred, sched, lam = of(rows, "prediction_type"), of(rows, "schedule"), of(rows, "lambda")
    if table3:
        for other, claim in (("adalora", "AirLLM is more accurate than AdaLoRA (Table III: 95.53 vs 95.18 %)"),
                             ("ppo", "The PPO+DDIM hierarchy is more accurate than PPO alone (Table III: 95.53 vs "
                                     "94.50 %)"),
                             ("ddim", "The hierarchy is more accurate than DDIM alone (Table III: 95.53 vs 94.72 %)"),
                             ("ppo+ddpm", "DDIM refinement is more accurate than DDPM (Table III: 95.53 vs 95.41 %)"),
                             ("ppo+ddim-unet", "The MLP denoiser is more accurate than the U-Net (Table III: 95.53 vs "
                                               "95.30 %)"),
                             ("uniform", "AirLLM is more accurate than uniform ranks (ours, not in the paper)"),
                             ("heuristic", "AirLLM is more accurate than the channel heuristic (ours, not in the "
                                           "paper)")):
            if other in ("uniform", "heuristic") and not any(r["method"] == other for r in table3):
                continue
            out.append(_accuracy_claim(claim, f"accuracy AirLLM − {label(other)}, paired by seed", table3,
                                       _method(AIRLLM), _method(other)))
        late = {m: _values(table3, _method(m), "reward_curve") for m in (AIRLLM, "ppo")}
        diff = paired({k: _late_reward({"reward_curve": v}) for k, v in late[AIRLLM].items()},
                      {k: _late_reward({"reward_curve": v}) for k, v in late["ppo"].items()})
        after = " (both started from pretrained policies)" if any(r.get("pretrain") for r in table3) else ""
        out.append(_claim("PPO+DDIM converges faster than PPO (20–30 % faster)",
                          f"mean reward over the second half of training{after}, AirLLM − PPO", diff, 1, 1, ""))
    for snr_value in sorted({r["snr_setting"] for r in snr}, key=float):
        at = [r for r in snr if r["snr_setting"] == snr_value]
        for other in ("adalora", "uniform", "heuristic", "random"):
            if not any(r["method"] == other for r in at):
                continue
            paper = "(Fig. 4; +0.36–0.46 pp)" if other == "adalora" else "(ours, not in the paper)"
            where = f"delivered at {snr_value} dB" if per_snr else f"at {snr_value} dB"
            out.append(_accuracy_claim(f"AirLLM is more accurate than {label(other)} {where} {paper}",
                                       f"accuracy AirLLM − {label(other)}, paired by seed", at, _method(AIRLLM),
                                       _method(other)))
    for r_max in sorted({r["r_max"] for r in rmax}):
        at = [r for r in rmax if r["r_max"] == r_max]
        air_p = _values(at, _method(AIRLLM), "transmitted_params")
        ada_p = _values(at, _method("adalora"), "transmitted_params")
        saving = paired({k: 1 - v / ada_p[k] for k, v in air_p.items() if k in ada_p}, {k: 0.0 for k in ada_p})
        out.append(_claim(f"AirLLM sends fewer parameters than AdaLoRA at r_max {r_max} (Table IV; 10–12.5 %)",
                          "1 − params AirLLM / params AdaLoRA, paired by seed", saving, 1, 100, "%",
                          differing(at, _method(AIRLLM), _method("adalora"))))
        out.append(_accuracy_claim(f"AirLLM is more accurate than AdaLoRA at r_max {r_max} (Table IV)",
                                   "accuracy AirLLM − AdaLoRA, paired by seed", at, _method(AIRLLM),
                                   _method("adalora")))
    if pred:
        for p in ("epsilon", "v_prediction"):
            out.append(_accuracy_claim(f"{p} prediction is more accurate than x0 prediction (Table V b)",
                                       f"accuracy {p} − sample, paired by seed", pred,
                                       lambda r, p=p: r["prediction_type"] == p,
                                       lambda r: r["prediction_type"] == "sample"))
    if {0.1, 1.0} <= {r["reward_lambda"] for r in lam}:
        out.append(_accuracy_claim("λ = 0.1 is more accurate than λ = 1 (Table V a: 95.30 vs 95.07 %)",
                                   "accuracy λ 0.1 − λ 1, paired by seed", lam, lambda r: r["reward_lambda"] == 0.1,
                                   lambda r: r["reward_lambda"] == 1.0))
    if sched:
        for other in ("linear", "squaredcos_cap_v2"):
            out.append(_accuracy_claim(f"The scaled-linear schedule is more accurate than {other} (Fig. 8)",
                                       f"accuracy scaled_linear − {other}, paired by seed", sched,
                                       lambda r: r["beta_schedule"] == "scaled_linear",
                                       lambda r, o=other: r["beta_schedule"] == o))
    return out


def delivery_rows(rows: list[Row]) -> list[Row]:
    """One row per (run, SNR) of the runs delivered at every SNR of their schedule (train.deliver_every_snr): the
    run's row with that delivery's accuracy, ranks, precisions and size, and ``snr_setting`` its SNR (Fig. 4 from
    one run)."""
    out = []
    for row in rows:
        for d in row.get("deliveries") or ():
            out.append(row | {"snr_setting": f"{d['snr_db']:g}"} | {
                key: d[key] for key in ("test_accuracy", "ranks", "precisions", "transmitted_params",
                                        "transmitted_bits", "on_air_bits", "budget_ok")})
    return out


def claims_table(rows: list[Row]) -> str:
    return markdown(["claim", "our comparison", "difference (mean ± 95 % CI)", "pairs delivering different adapters",
                     "verdict"], claims(rows))
