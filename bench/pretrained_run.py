"""A real run from a pretrained policy: pretrain on the calibrated surrogate, then airllm, uniform and heuristic.

    python bench/pretrained_run.py [--steps 300] [--episodes 1000] [--out docs/results/pretrained-run]

On the default model and data (MiniLM + tweets, r_max 8, −5…15 dB, seed 42): `airlora pretrain-policy`, then
`airlora run` with the airllm allocator started from that policy, and uniform and heuristic on the same seed, each
delivered at every SNR of the schedule (train.deliver_every_snr). Writes into --out: the policy folder, the three
run folders (a finished run is not redone), results.json, table.md and ranks.png (the calibrated importances and
the delivered ranks as layer × module heat-maps).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as `python bench/x.py` from a checkout

from airlora.config import RunConfig, merge  # noqa: E402
from airlora.io import write_json_atomic, write_text_atomic  # noqa: E402
from airlora.runner import run  # noqa: E402
from airlora.surrogate import pretrain_policy  # noqa: E402
from airlora.sweep.figures import heatmap_panels  # noqa: E402

ALLOCATORS = ("airllm", "uniform", "heuristic")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--episodes", type=int, default=1000)
    parser.add_argument("--out", default="docs/results/pretrained-run")
    args = parser.parse_args(argv)
    out = Path(args.out)
    base = merge(RunConfig(), {"train.steps": args.steps, "train.deliver_every_snr": True, "train.progress": False})
    policy_dir = out / "policy"
    if not (policy_dir / "calibration.json").is_file():
        pretrain_policy(merge(base, {"allocator": "airllm", "policy.pretrain.episodes": args.episodes}), policy_dir,
                        overwrite=True)
    calibration = json.loads((policy_dir / "calibration.json").read_text())
    summaries = {}
    for name in ALLOCATORS:
        folder = out / "runs" / name
        if not (folder / "summary.json").is_file():
            over = {"allocator": name}
            if name == "airllm":
                over["policy.load_path"] = str(policy_dir / "policy.pt")
            t0 = time.perf_counter()
            run(merge(base, over), folder, overwrite=True)
            print(f"{name}: {time.perf_counter() - t0:.0f} s", flush=True)
        summaries[name] = json.loads((folder / "summary.json").read_text())
    write_json_atomic(out / "results.json", {"calibration_s": calibration["calibration_s"],
                                             "pretrain_s": calibration["pretrain_s"], "summaries": summaries})
    write_text_atomic(out / "table.md", table(summaries, calibration))
    panels = {"calibrated importance": (calibration["importance"], None)}
    for name, snr in (("airllm", -5.0), ("airllm", 5.0), ("airllm", 15.0), ("heuristic", -5.0), ("uniform", -5.0)):
        delivery = next(d for d in summaries[name]["deliveries"] if d["snr_db"] == snr)
        panels[f"{name} at {snr:g} dB ({sum(delivery['ranks'].values())} ranks)"] = (delivery["ranks"], 8)
    heatmap_panels(panels, out / "ranks.png")
    print((out / "table.md").read_text())


def table(summaries: dict[str, dict], calibration: dict) -> str:
    lines = [f"Pretraining: calibration {calibration['calibration_s']:.1f} s, {calibration['episodes']} episodes on "
             f"the surrogate {calibration['pretrain_s']:.0f} s.", "",
             "| allocator | SNR dB | total rank | params on air | airtime s | fits | test accuracy |",
             "|---|---|---|---|---|---|---|"]
    for name, s in summaries.items():
        for d in s["deliveries"]:
            mark = " (primary)" if d["snr_db"] == s["snr_db"] else ""
            lines.append(f"| {name} | {d['snr_db']:g}{mark} | {sum(d['ranks'].values())} | "
                         f"{d['transmitted_params']:,} | {d['airtime_s']:.3f} | {d['budget_ok']} | "
                         f"{d['test_accuracy']:.4f} |")
    lines += ["", "| allocator | wall s | train s | mean step s | decision overhead | steps over budget |",
              "|---|---|---|---|---|---|"]
    for name, s in summaries.items():
        lines.append(f"| {name} | {s['wall_s']:.0f} | {s['train_s']:.0f} | {s['mean_step_s']:.3f} | "
                     f"{s['decision_overhead_ratio']:.4f} | {s['steps_over_budget']} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
