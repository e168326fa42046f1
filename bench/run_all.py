"""Every benchmark, one JSON object. ``python bench/run_all.py [--quick]``.

--quick: fewer timing iterations and 60-step runs instead of the README's 300 (wall times then scale down).
Full: the README's default run (uniform, 300 steps) and the same with the AirLLM policy, ~10 minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import json

import bf16_autocast
import common  # noqa: F401  (puts the checkout on sys.path)
import ddim_steps
import decision_overhead
import default_run
import throughput_vs_peft


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a couple of minutes instead of ~10")
    quick = parser.parse_args().quick
    steps = 60 if quick else 300
    overhead = decision_overhead.measure(iters=10 if quick else 30)
    throughput = throughput_vs_peft.measure(iters=6 if quick else 20)
    ddim = ddim_steps.measure(calls=50 if quick else 200)
    bf16 = bf16_autocast.measure(iters=1 if quick else 2)
    default = default_run.measure("uniform", steps)
    airllm = default_run.measure("airllm", steps)
    print(json.dumps({
        "quick": quick,
        "decision_overhead_ratio": overhead["decision_overhead_ratio"],
        "throughput_vs_peft_lora": throughput["throughput_vs_peft_lora"],
        "throughput_vs_peft_lora_ranks_cut_to_4": throughput["throughput_vs_peft_lora_ranks_cut_to_4"],
        "default_run_wall_s": default["wall_s"],
        "ddim_steps_time": ddim,
        "peak_rss_mb": default["peak_rss_mb"],
        "airllm_run_s_per_step_all_in": airllm["s_per_step_all_in"],
        "bf16_step_time_vs_fp32": bf16["bf16_step_time_vs_fp32"],
        "details": {"decision_overhead": overhead, "throughput": throughput, "bf16_autocast": bf16,
                    "default_run": default, "airllm_run": airllm},
    }, indent=2))


if __name__ == "__main__":
    main()
