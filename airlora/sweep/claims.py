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


def _claim(claim: str, ours: str, diff: Estimate, sign: int, scale: float, unit: str) -> list[str]:
    if diff.n == 0:
        return [claim, ours, "not measured (no paired runs)", "–"]
    return [claim, ours, f"{diff.format(2, scale)} {unit}".strip(), verdict(diff, sign)]


def claims(rows: list[Row]) -> list[list[str]]:
    """One line per claim whose experiment is in ``rows``: [claim, our comparison, difference, verdict]."""
    out = []
    table3, snr, rmax = of(rows, "table3"), of(rows, "snr"), of(rows, "r_max")
    pred, sched, lam = of(rows, "prediction_type"), of(rows, "schedule"), of(rows, "lambda")
    if table3:
        air = _values(table3, _method(AIRLLM))
        for other, claim in (("adalora", "AirLLM is more accurate than AdaLoRA (Table III: 95.53 vs 95.18 %)"),
                             ("ppo", "The PPO+DDIM hierarchy is more accurate than PPO alone (Table III: 95.53 vs "
                                     "94.50 %)"),
                             ("ddim", "The hierarchy is more accurate than DDIM alone (Table III: 95.53 vs 94.72 %)"),
                             ("ppo+ddpm", "DDIM refinement is more accurate than DDPM (Table III: 95.53 vs 95.41 %)"),
                             ("ppo+ddim-unet", "The MLP denoiser is more accurate than the U-Net (Table III: 95.53 vs "
                                               "95.30 %)")):
            out.append(_claim(claim, f"accuracy AirLLM − {label(other)}, paired by seed",
                              paired(air, _values(table3, _method(other))), 1, 100, "pp"))
        late = {m: _values(table3, _method(m), "reward_curve") for m in (AIRLLM, "ppo")}
        diff = paired({k: _late_reward({"reward_curve": v}) for k, v in late[AIRLLM].items()},
                      {k: _late_reward({"reward_curve": v}) for k, v in late["ppo"].items()})
        out.append(_claim("PPO+DDIM converges faster than PPO (20–30 % faster)",
                          "mean reward over the second half of training, AirLLM − PPO", diff, 1, 1, ""))
    for snr_value in sorted({r["snr_setting"] for r in snr}, key=float):
        at = [r for r in snr if r["snr_setting"] == snr_value]
        air = _values(at, _method(AIRLLM))
        for other in ("adalora", "uniform", "heuristic", "random"):
            paper = "(Fig. 4; +0.36–0.46 pp)" if other == "adalora" else "(ours, not in the paper)"
            out.append(_claim(f"AirLLM is more accurate than {label(other)} at {snr_value} dB {paper}",
                              f"accuracy AirLLM − {label(other)}, paired by seed",
                              paired(air, _values(at, _method(other))), 1, 100, "pp"))
    for r_max in sorted({r["r_max"] for r in rmax}):
        at = [r for r in rmax if r["r_max"] == r_max]
        air_p = _values(at, _method(AIRLLM), "transmitted_params")
        ada_p = _values(at, _method("adalora"), "transmitted_params")
        saving = paired({k: 1 - v / ada_p[k] for k, v in air_p.items() if k in ada_p}, {k: 0.0 for k in ada_p})
        out.append(_claim(f"AirLLM sends fewer parameters than AdaLoRA at r_max {r_max} (Table IV; 10–12.5 %)",
                          "1 − params AirLLM / params AdaLoRA, paired by seed", saving, 1, 100, "%"))
        out.append(_claim(f"AirLLM is more accurate than AdaLoRA at r_max {r_max} (Table IV)",
                          "accuracy AirLLM − AdaLoRA, paired by seed",
                          paired(_values(at, _method(AIRLLM)), _values(at, _method("adalora"))), 1, 100, "pp"))
    if pred:
        by = {p: _values(pred, lambda r, p=p: r["prediction_type"] == p) for p in ("epsilon", "v_prediction", "sample")}
        for p in ("epsilon", "v_prediction"):
            out.append(_claim(f"{p} prediction is more accurate than x0 prediction (Table V b)",
                              f"accuracy {p} − sample, paired by seed", paired(by[p], by["sample"]), 1, 100, "pp"))
    if {0.1, 1.0} <= {r["reward_lambda"] for r in lam}:
        out.append(_claim("λ = 0.1 is more accurate than λ = 1 (Table V a: 95.30 vs 95.07 %)",
                          "accuracy λ 0.1 − λ 1, paired by seed",
                          paired(_values(lam, lambda r: r["reward_lambda"] == 0.1),
                                 _values(lam, lambda r: r["reward_lambda"] == 1.0)), 1, 100, "pp"))
    if sched:
        by = {s: _values(sched, lambda r, s=s: r["beta_schedule"] == s)
              for s in ("scaled_linear", "linear", "squaredcos_cap_v2")}
        for other in ("linear", "squaredcos_cap_v2"):
            out.append(_claim(f"The scaled-linear schedule is more accurate than {other} (Fig. 8)",
                              f"accuracy scaled_linear − {other}, paired by seed",
                              paired(by["scaled_linear"], by[other]), 1, 100, "pp"))
    return out


def claims_table(rows: list[Row]) -> str:
    return markdown(["claim", "our comparison", "difference (mean ± 95 % CI)", "verdict"], claims(rows))
