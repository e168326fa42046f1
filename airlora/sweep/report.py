"""``airlora report DIR``: report.md with the paper's tables, the claims table and PNG figures, from the rows."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from airlora.errors import AirloraError
from airlora.io import write_json_atomic, write_text_atomic
from airlora.sweep import figures, front, points
from airlora.sweep.claims import claims_table, delivery_rows
from airlora.sweep.goal import goal, goal_table
from airlora.sweep.tables import of, table_by, table_methods, table_settings

Row = dict[str, Any]

SNR_NOTE = ("Each run's SNR is fixed at the value shown (the other experiments draw it per step from "
            "the configured list).")


def load_rows(sweep_dir: Path) -> list[Row]:
    """The rows of ``results.jsonl`` in a sweep folder."""
    path = sweep_dir / "results.jsonl"
    if not path.is_file():
        raise AirloraError(f"{str(sweep_dir)!r} has no results.jsonl; run `airlora sweep CONFIG --out {sweep_dir}` "
                           "first")
    rows = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            raise AirloraError(f"{path}: line {number} is not JSON") from None
    return rows


def _header(name: str, rows: list[Row]) -> list[str]:
    ok = [r for r in rows if r["status"] == "ok"]
    seeds = sorted({r["seed"] for r in ok})
    steps = sorted({r["steps"] for r in ok})
    models = sorted({r["model"] for r in ok})
    data = sorted({r["dataset"] for r in ok})
    return [
        f"# Sweep report: {name}", "",
        f"{len(ok)} finished runs ({len(rows) - len(ok)} failed), seeds {seeds}, {', '.join(map(str, steps))} "
        f"training steps per run, model {', '.join(models)}, data {', '.join(data)}.",
        "Every number is the mean ± the half-width of a 95 % Student-t interval over seeds, with n the number of "
        "seeds; comparisons are paired by seed (same data split and initialisation). Accuracy is on the test "
        "split, of the delivered adapter (the best validation checkpoint that fits the link).", "",
    ]


def _section(lines: list[str], title: str, body: str, figure: Path | None = None, note: str = "") -> None:
    lines += [f"## {title}", ""]
    if note:
        lines += [note, ""]
    lines += [body, ""]
    if figure is not None:
        lines += [f"![{title}](figures/{figure.name})", ""]


def write_report(sweep_dir: Path, out: Path | None = None) -> Path:
    """Write ``report.md`` and ``figures/*.png`` for the sweep in ``sweep_dir``; return the report's path."""
    rows = load_rows(sweep_dir)
    out = out or sweep_dir
    figs = out / "figures"
    plan = sweep_dir / "plan.json"
    name = json.loads(plan.read_text())["name"] if plan.is_file() else sweep_dir.name
    ok = [r for r in rows if r["status"] == "ok"]
    if not ok:
        raise AirloraError(f"{sweep_dir}: no finished runs to report on")
    lines = _header(name, rows)
    lines += ["## Claims of the paper, checked", "",
              "holds / does not hold: the 95 % interval of the paired difference excludes 0 on the claimed / the "
              "other side; inconclusive: it contains 0. Not testable here: in every pair both runs delivered the "
              "same adapter (the same rank and precision per module). A difference in accuracy there comes from "
              "the ranks chosen during training, not from the allocation that is delivered, which is what the "
              "claim is about. The pairs column counts the seeds whose two runs delivered different adapters; "
              "the interval is over all pairs.", "", claims_table(rows), ""]
    table3 = of(rows, "table3")
    check = goal(table3) if table3 else None
    if check and check["delivery"] is not None:
        _section(lines, "AirLLM against the best baseline", goal_table(check),
                 note="Per budget, the baseline (AdaLoRA, uniform, channel heuristic) of highest mean test accuracy, "
                      "and AirLLM's paired difference to it (points) and its share of that baseline's on-air bits, "
                      "mean ± 95 % CI over seeds. All in budget: every compared delivery fits C·T_max and no "
                      "training step went over it. As delivered: each run's own delivery (channel.delivery_snr_db), "
                      "the allocator's decision at the evaluation that chose the best checkpoint. Delivered at X dB "
                      "(train.deliver_every_snr): the decision at the end of training for that SNR's budget, applied "
                      "to the same checkpoint, so at the delivery SNR it can differ from the run's own delivery.")
        write_json_atomic(out / "goal.json", check)

    if table3:
        _section(lines, "Table III: methods", table_methods(table3),
                 figures.reward_curves(table3, "method", figs / "fig3_reward_curves.png", "Reward per method"))
    if snr := of(rows, "snr"):
        _section(lines, "Accuracy vs SNR (Fig. 4)", table_by(snr, "snr_setting", "SNR (dB)"),
                 figures.accuracy_vs(snr, "snr_setting", figs / "fig4_accuracy_vs_snr.png", "SNR (dB)",
                                     "Accuracy vs SNR"), SNR_NOTE)
    elif per_snr := delivery_rows(table3):
        _section(lines, "Accuracy vs SNR (Fig. 4, every SNR delivered from one run)",
                 table_by(per_snr, "snr_setting", "SNR (dB)", fields=(
                     ("test accuracy", "test_accuracy", 4, 1.0), ("on-air Mbit", "on_air_bits", 3, 1e-6))),
                 figures.accuracy_vs(per_snr, "snr_setting", figs / "fig4_accuracy_vs_snr.png", "SNR (dB)",
                                     "Accuracy vs SNR, per-SNR delivery"),
                 "Each Table III run, trained with the SNR drawn per step, delivered its best checkpoint at every "
                 "SNR of the schedule (train.deliver_every_snr): the allocator's decision for that channel's budget.")
    if rmax := of(rows, "r_max"):
        _section(lines, "Table IV: AdaLoRA vs AirLLM per r_max", table_by(
            rmax, "r_max", "r_max", fields=(("test accuracy", "test_accuracy", 4, 1.0),
                                            ("transmitted params", "transmitted_params", 0, 1.0))))
    if lam := of(rows, "lambda"):
        _section(lines, "Table V (a): λ", table_by(
            lam, "reward_lambda", "λ", methods=False,
            fields=(("test accuracy", "test_accuracy", 4, 1.0), ("mean reward", "mean_reward", 3, 1.0),
                    ("transmitted params", "transmitted_params", 0, 1.0))),
            figures.reward_curves(lam, "reward_lambda", figs / "fig5_reward_vs_lambda.png", "Reward per λ",
                                  name=lambda v: f"λ = {v:g}"))
    if pred := of(rows, "prediction_type"):
        _section(lines, "Table V (b): prediction type", table_by(
            pred, "prediction_type", "prediction", methods=False,
            fields=(("test accuracy", "test_accuracy", 4, 1.0), ("mean reward", "mean_reward", 3, 1.0))),
            figures.reward_curves(pred, "prediction_type", figs / "fig6_reward_per_prediction.png",
                                  "Reward per prediction type", name=str))
    if ddim := of(rows, "ddim_steps"):
        _section(lines, "Table VI: time vs DDIM inference steps", table_by(
            ddim, "inference_steps", "DDIM steps", methods=False,
            fields=(("decision (ms)", "mean_decision_s", 2, 1e3), ("training step (s)", "mean_step_s", 3, 1.0),
                    ("run wall (s)", "wall_s", 1, 1.0), ("test accuracy", "test_accuracy", 4, 1.0))),
            note="Decision = state → PPO → guided reverse diffusion → ranks, per step, on one thread.")
    train_steps = of(rows, "ddpm_train_steps")
    if train_steps:
        _section(lines, "Diffusion training steps", table_by(train_steps, "train_timesteps", "T", methods=False))
    if train_steps and ddim:
        lines += ["![Fig. 7](figures/" + figures.steps_panels(train_steps, ddim, figs / "fig7_steps.png").name + ")",
                  ""]
    if sched := of(rows, "schedule"):
        _section(lines, "Noise schedules and rank heat-maps (Fig. 8)",
                 table_by(sched, "beta_schedule", "schedule", methods=False),
                 figures.rank_heatmaps(sched, figs / "fig8_rank_heatmaps.png"))
    if budget_front := of(rows, front.EXPERIMENT):
        table, check = front.front_table(budget_front)
        _section(lines, "Accuracy vs airtime budget: rank-only, post-hoc int8 and joint", table,
                 front.accuracy_vs_budget(budget_front, figs / "accuracy_vs_budget.png"),
                 "Test accuracy of what each run delivers, after its codecs (post-hoc rows: the fp32 runs exported at "
                 "int8 and evaluated on the edge, no extra training), mean ± 95 % CI over seeds; one fixed SNR per "
                 "run, the budget C·T_max in Mbit. The second table pairs, seed by seed, the best joint method with "
                 "the best rank-only one (post-hoc included) at each budget.")
        test = check["test_point"]
        heat = front.joint_heatmaps(budget_front, test["budget_mbit"] if test else None,
                                    figs / "joint_rank_bits.png")
        if heat is not None:
            path, run = heat
            lines += [f"![Per-module rank and precision of one joint run](figures/{path.name})", "",
                      front.delivery_text(run), ""]
        write_json_atomic(out / "budget_front.json", check)
    if any(r.get("budget_front") for r in ok):
        _section(lines, "Where allocation can matter: accuracy against on-air bits per budget", points.goal_table(ok),
                 points.accuracy_vs_bits(ok, figs / "accuracy_vs_bits.png"),
                 "Every delivery of every run: its own, and its one trained adapter delivered at each budget of "
                 "train.deliver_t_max_s (in the delivery regime training does not depend on the budget). Ceiling: the "
                 "best mean accuracy at the task's largest budget. Headroom: ceiling minus the best baseline. The "
                 "learned allocator is compared with that baseline, paired by seed; goal: ≥ 1 point above it, or "
                 "not worse with ≤ 75 % of its bits, where the headroom is ≥ 1.5 points.")
        lines += [points.front_table(ok), ""]
    _section(lines, "Accuracy vs bits on air, every setting", table_settings(ok),
             figures.pareto(ok, figs / "pareto_accuracy_vs_bits.png"),
             "Every distinct setting of the sweep, whatever its experiment; a setting's runs differ only in the seed.")
    failed = [r for r in rows if r["status"] != "ok"]
    if failed:
        lines += ["## Failed runs", ""] + [f"- `{r['run_id']}`: {r['error'].splitlines()[0]}" for r in failed] + [""]
    path = out / "report.md"
    write_text_atomic(path, "\n".join(lines))
    return path
