"""Command line: ``airlora run``, ``pretrain-policy``, ``channel``, ``export``, ``edge``, ``sweep`` and ``report``.

User errors print one line ``airlora: error: …`` and exit with status 2; ``--debug`` shows the traceback.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path
from typing import Any

from airlora.errors import AirloraError


def _snr_overrides(value: str) -> dict[str, Any]:
    """``--snr-db``: one number, a comma-separated list, or a trace file (one dB value per line)."""
    if Path(value).is_file():
        return {"channel.snr_schedule": "trace", "channel.snr_trace": value}
    try:
        values = [float(v) for v in value.split(",") if v.strip()]
    except ValueError:
        values = []
    if not values:
        raise AirloraError(f"--snr-db {value!r}: expected a number, a comma-separated list (--snr-db=-5,0,5) "
                           "or an existing trace file")
    return {"channel.snr_db": values}


def _bits_list(value: str) -> list[int]:
    """``--bits``: one number of bits per value or a comma-separated list (checked against the codecs by the config)."""
    try:
        bits = [int(v) for v in value.split(",") if v.strip()]
    except ValueError:
        bits = []
    if not bits:
        raise AirloraError(f"--bits {value!r}: expected a number of bits or a comma-separated list, e.g. --bits 8 or "
                           "--bits 4,8,16,32")
    return bits


def _add_channel_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--snr-db", help="SNR in dB: a number, a list (write --snr-db=-5,0,5) or a trace file")
    p.add_argument("--bandwidth-hz", type=float, help="bandwidth W in Hz (default: scale-matched to the model)")
    p.add_argument("--t-max-s", type=float, help="latency budget T_max in seconds (default 1)")
    p.add_argument("--fading", choices=["rayleigh", "awgn", "rician"], help="fading model (default rayleigh)")
    p.add_argument("--r-max", type=int, help="largest rank per module (default 8)")
    p.add_argument("--bits", help="precisions a module may be sent at, bits per value: one (fixed) or a list, e.g. "
                   "--bits 4,8,16,32 (default 32)")
    p.add_argument("--model", help="local Hugging Face checkpoint folder (default: the packaged all-MiniLM-L6-v2)")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``airlora`` command."""
    parser = argparse.ArgumentParser(prog="airlora", description=__doc__.splitlines()[0])
    parser.add_argument("--debug", action="store_true", help="show Python tracebacks for errors")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="fine-tune with per-module ranks under a wireless delivery budget")
    run.add_argument("--config", help="YAML or JSON config file; flags override it")
    run.add_argument("--allocator", help="rank allocator (default uniform)")
    run.add_argument("--steps", type=int, help="training steps (default 300)")
    run.add_argument("--seed", type=int, help="seed (default 42)")
    run.add_argument("--lambda", dest="reward_lambda", type=float, help="λ in R = −U − λ·η (default 0.1)")
    run.add_argument("--data", help="'tweets', 'tweets3' (3 classes), a GLUE SST-2 folder, a .tsv/.csv/.parquet file "
                     "or hf:NAME[/CONFIG]")
    run.add_argument("--eval-every", type=int, help="steps between validation passes (default 100)")
    run.add_argument("--regime", choices=["delivery", "paper"],
                     help="what the channel constrains: 'delivery' (default; training ranks stay stable, the allocator "
                          "decides the delivery) or 'paper' (each step's ranks under that step's channel)")
    run.add_argument("--policy-variant", choices=["ppo", "ddim", "ppo+ddpm", "ppo+ddim-mlp", "ppo+ddim-unet"],
                     help="airllm: which parts of the hierarchy run (default ppo+ddim-mlp)")
    run.add_argument("--policy", dest="policy_path", help="airllm: start from the policy.pt of an earlier run")
    run.add_argument("--out", required=True, help="folder for config.json, metrics.csv and summary.json")
    run.add_argument("--overwrite", action="store_true", help="replace a finished run already in --out")
    run.add_argument("--resume", action="store_true",
                     help="continue the run in --out from its last checkpoint (its config.json unless --config)")
    run.add_argument("--set", dest="sets", action="append", default=[], metavar="PATH=VALUE",
                     help="set any config value, e.g. --set train.lr=1e-3 (repeatable; also on --resume)")
    run.add_argument("--quiet", action="store_true", help="no progress bar")
    run.add_argument("--report-to", choices=["auto", "tensorboard", "wandb", "none"],
                     help="live log: TensorBoard event files in OUT/tensorboard, an offline wandb run in OUT/wandb, or "
                          "none (default auto: TensorBoard when installed)")
    run.add_argument("--match-bits-of", metavar="RUN_DIR",
                     help="adalora: set the final adapter's on-air bits to those of another finished run")
    _add_channel_flags(run)

    pretrain = sub.add_parser("pretrain-policy", help="airllm: train the policy on a loss surrogate calibrated from "
                              "the model, for `airlora run --policy DIR/policy.pt`")
    pretrain.add_argument("--config", help="YAML or JSON config file of the run it is for; flags override it")
    pretrain.add_argument("--out", required=True, help="folder for policy.pt, calibration.json, policy_metrics.csv")
    pretrain.add_argument("--episodes", type=int, help="episodes on the surrogate (default 1000)")
    pretrain.add_argument("--policy-variant", choices=["ppo", "ddim", "ppo+ddpm", "ppo+ddim-mlp", "ppo+ddim-unet"],
                          help="which parts of the hierarchy (default ppo+ddim-mlp)")
    pretrain.add_argument("--seed", type=int, help="seed (default 42)")
    pretrain.add_argument("--lambda", dest="reward_lambda", type=float, help="λ in R = −U − λ·η (default 0.1)")
    pretrain.add_argument("--data", help="the run's data (the probe batches come from its training split)")
    pretrain.add_argument("--set", dest="sets", action="append", default=[], metavar="PATH=VALUE",
                          help="set any config value, e.g. --set policy.pretrain.loss_gap=0.1 (repeatable)")
    pretrain.add_argument("--overwrite", action="store_true", help="replace a policy already in --out")
    pretrain.add_argument("--quiet", action="store_true", help="no progress bar")
    _add_channel_flags(pretrain)

    channel = sub.add_parser("channel", help="capacity, budget and the largest uniform rank that fits")
    _add_channel_flags(channel)

    export = sub.add_parser("export", help="write a run's adapter as a PEFT adapter, each module at its codec")
    export.add_argument("run_dir", help="a finished `airlora run --out` folder")
    export.add_argument("--bits", type=int, choices=[32, 16, 8, 4],
                        help="send every module and the head at this precision (default: the precisions the run "
                             "chose and budgeted)")
    export.add_argument("--out", required=True, help="folder for the PEFT adapter, its delivery manifest and its model "
                        "card (README.md)")
    export.add_argument("--overwrite", action="store_true", help="replace an export already in --out")
    export.add_argument("--format", dest="adapter_format", choices=["adalora", "lora", "gguf"], default="adalora",
                        help="adalora: PEFT AdaLoRA, the triplets as trained (default); lora: plain PEFT LoRA with λ "
                             "and the scaling folded in, for any LoRA tool; gguf: llama.cpp's GGUF LoRA adapter "
                             "(Llama decoders); see docs/delivery-formats.md")

    sweep = sub.add_parser("sweep", help="run a grid of runs from a sweep file (resumable); writes results.jsonl")
    sweep.add_argument("sweep_file", help="sweep YAML/JSON, e.g. configs/smoke.yaml")
    sweep.add_argument("--out", required=True, help="folder for plan.json, runs/ and results.jsonl")
    sweep.add_argument("--backend", choices=["local", "ray"], default="local",
                       help="local process pool (default) or Ray actors")
    sweep.add_argument("--workers", type=int, help="runs at once (default: the file's, else one per core)")
    sweep.add_argument("--address", help="ray: address of an existing cluster (default: start a local one)")
    sweep.add_argument("--set", dest="sets", action="append", default=[], metavar="PATH=VALUE",
                       help="override a base config value for every run, e.g. --set train.steps=50 (repeatable)")
    sweep.add_argument("--no-worker-cache", dest="worker_cache", action="store_false",
                       help="build every run from scratch in its worker instead of reusing the worker's read data, "
                       "tokenizer and tokenised splits (the same results)")
    sweep.add_argument("--quiet", action="store_true", help="no progress bar")

    report = sub.add_parser("report", help="a sweep's tables, figures and claims table, or one run's figures, as "
                            "report.md and figures/*.png")
    report.add_argument("dir", help="the --out folder of `airlora sweep` or of one `airlora run`")
    report.add_argument("--out", help="folder for report.md and figures/ (default: DIR)")

    edge = sub.add_parser("edge", help="as the device: verify a delivery, attach it with PEFT, evaluate; prints JSON")
    edge.add_argument("adapter_dir", help="the --out folder of `airlora export`")
    edge.add_argument("--base", required=True,
                      help="base model folder ('minilm', 'smollm2-135m' for the packaged ones)")
    edge.add_argument("--data", help="test data (default: the run's own test split)")
    edge.add_argument("--sha256", help="payload SHA-256 the sender printed; must match too")
    edge.add_argument("--runtime", choices=["peft", "llama.cpp"], default="peft",
                      help="peft: transformers + PEFT (default); llama.cpp: a --format gguf delivery on the base "
                           "model's GGUF (--base: a .gguf file, 'smollm2-135m' or a folder prepared from a GGUF), "
                           "needs pip install 'airlora[llamacpp]'")
    return parser


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    """Dotted config paths for every flag the user gave."""
    pairs = {
        "allocator": "allocator", "steps": "train.steps", "seed": "train.seed",
        "reward_lambda": "train.reward_lambda", "data": "data.source", "eval_every": "train.eval_every",
        "regime": "train.regime",
        "bandwidth_hz": "channel.bandwidth_hz", "t_max_s": "channel.t_max_s", "fading": "channel.fading",
        "r_max": "adapter.r_max", "model": "model",
        "policy_variant": "policy.variant", "policy_path": "policy.load_path", "episodes": "policy.pretrain.episodes",
        "report_to": "train.report_to",
    }
    out = {path: getattr(args, name) for name, path in pairs.items() if getattr(args, name, None) is not None}
    if args.snr_db is not None:
        out.update(_snr_overrides(args.snr_db))
    if getattr(args, "bits", None) is not None:
        out["channel.bits"] = _bits_list(args.bits)
    if getattr(args, "quiet", False):
        out["train.progress"] = False
    return out


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``airlora`` console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    args.command_line = shlex.join(["airlora", *(sys.argv[1:] if argv is None else argv)])  # quoted by model cards
    try:
        commands = {"run": _cmd_run, "channel": _cmd_channel, "export": _cmd_export, "edge": _cmd_edge,
                    "sweep": _cmd_sweep, "report": _cmd_report, "pretrain-policy": _cmd_pretrain}
        return commands[args.command](args)
    except AirloraError as err:
        if args.debug:
            raise
        print(f"airlora: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("airlora: interrupted", file=sys.stderr)
        return 130
    except Exception as err:  # a process of a distributed job died or hung: one line, not a traceback per process
        from airlora.distributed import fault_message

        message = None if args.debug else fault_message(err)
        if message is None:
            raise
        print(f"airlora: error: {message}", file=sys.stderr)
        return 1


def _cmd_run(args: argparse.Namespace) -> int:
    from airlora.config import RunConfig, load_config, merge
    from airlora.distributed import launched_rank
    from airlora.report import print_summary
    from airlora.runner import run, saved_config

    if args.resume and args.overwrite:
        raise AirloraError("--resume continues the run in --out and --overwrite replaces it; choose one")
    if args.config:
        config = load_config(args.config)
    elif args.resume:
        config = saved_config(Path(args.out))  # a clear error when --out holds no run
    else:
        config = RunConfig()
    config = merge(config, _overrides(args) | _parse_sets(args.sets))
    if args.match_bits_of is not None:
        from airlora.allocators.adalora import target_bits_of

        if config.allocator != "adalora":
            raise AirloraError(f"--match-bits-of sets the adalora allocator's target; the allocator is "
                               f"{config.allocator!r} (add --allocator adalora)")
        config = merge(config, {"adalora.target_bits": target_bits_of(args.match_bits_of)})
    summary = run(config, Path(args.out), overwrite=args.overwrite, resume=args.resume, command=args.command_line)
    if launched_rank() == 0:  # one summary for a job of several processes
        print_summary(summary, Path(args.out))
    return 0


def _cmd_pretrain(args: argparse.Namespace) -> int:
    from airlora.config import RunConfig, load_config, merge
    from airlora.surrogate import pretrain_policy

    config = load_config(args.config) if args.config else RunConfig()
    config = merge(config, {**_overrides(args), **_parse_sets(args.sets), "allocator": "airllm"})
    record = pretrain_policy(config, Path(args.out), overwrite=args.overwrite)
    shares = record["share_of_gap_on_surrogate"]
    last = shares[max(shares, key=int)]
    print(f"pretrained {config.policy.variant} for {record['episodes']} episodes on the surrogate of {config.model} "
          f"in {record['pretrain_s']:.0f} s (calibration {record['calibration_s']:.1f} s); share of the uniform -> "
          f"optimum gap closed there: {last:.2f}")
    print(f"policy: {Path(args.out) / 'policy.pt'}; use it with: airlora run --allocator airllm --policy "
          f"{Path(args.out) / 'policy.pt'} …")
    return 0


def _cmd_channel(args: argparse.Namespace) -> int:
    from airlora.config import RunConfig, merge
    from airlora.report import print_channel

    config = merge(RunConfig(), _overrides(args))
    print_channel(config)
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from airlora.codecs import sent_bits
    from airlora.export import export_adapter

    m = export_adapter(args.run_dir, args.bits, Path(args.out), overwrite=args.overwrite, command=args.command_line,
                       adapter_format=args.adapter_format)
    fits = "fits" if m["fits_t_max"] else "OVER T_max"
    used = sent_bits(m["ranks"], m["precisions"])
    what = (f"{m['bits_per_param']} bits/value" if m["bits_per_param"]
            else f"modules at {'/'.join(map(str, used))} bits, head at {m['head_bits']}")
    print(f"exported {m['run_dir']} -> {args.out} ({_FORMAT_TEXT[m['adapter_format']]}, {what}"
          f"{'' if m['precisions_of_run'] else '; not the precisions the run chose'})")
    print(f"payload {m['payload_bytes']:,} bytes + scales {m['scale_bytes']:,} bytes ({m['transmitted_params']:,} "
          f"params)")
    print(f"overhead {m['overhead_bytes']:,} bytes on the air (zlib of "
          f"{'the GGUF file besides its tensors' if m['adapter_format'] == 'gguf' else 'safetensors header'} "
          f"{m['header_bytes']:,}, "
          f"adapter_config.json {m['config_bytes']:,}, delivery.json {m['manifest_bytes']:,}: "
          f"{m['overhead_raw_bytes']:,} bytes raw)" + (f"; the run reserved {m['reserved_overhead_bytes']:,}"
                                                       if m["reserved_overhead_bytes"] is not None else ""))
    print(f"on air {m['on_air_bits']:,} bits; airtime {m['airtime_s']:.4f} s at {m['snr_db']:g} dB "
          f"(C {m['capacity_bps'] / 1e6:.3f} Mbit/s) of T_max {m['t_max_s']:g} s: {fits}")
    print(f"sha256 {m['sha256'][m['payload_file']]}  {m['payload_file']}")
    print(f"model card {Path(args.out) / 'README.md'}")
    return 0


_FORMAT_TEXT = {"adalora": "PEFT AdaLoRA adapter", "lora": "PEFT LoRA adapter", "gguf": "GGUF LoRA adapter"}


def _parse_sets(sets: list[str]) -> dict[str, Any]:
    """``--set PATH=VALUE`` pairs; values are read as YAML scalars (numbers, booleans, lists)."""
    import yaml

    out = {}
    for item in sets:
        path, sep, value = item.partition("=")
        if not sep or not path:
            raise AirloraError(f"--set {item!r}: expected PATH=VALUE, e.g. --set train.steps=50")
        out[path] = yaml.safe_load(value)
    return out


def _cmd_sweep(args: argparse.Namespace) -> int:
    from airlora.sweep.execute import execute
    from airlora.sweep.grid import load_sweep

    if args.workers is not None and args.workers < 1:
        raise AirloraError(f"--workers {args.workers}: expected an integer >= 1")
    sweep = load_sweep(args.sweep_file, _parse_sets(args.sets))
    rows = execute(sweep, Path(args.out), backend=args.backend, workers=args.workers, address=args.address,
                   progress=not args.quiet, worker_cache=args.worker_cache)
    failed = [r for r in rows if r["status"] != "ok"]
    print(f"sweep {sweep.name}: {len(rows) - len(failed)} of {len(sweep.runs)} runs finished, {len(failed)} failed; "
          f"rows in {Path(args.out) / 'results.jsonl'}")
    for row in failed:
        print(f"  failed {row['run_id']}: {row['error'].splitlines()[0] if row['error'] else ''}")
    return 1 if failed else 0


def _cmd_report(args: argparse.Namespace) -> int:
    folder, out = Path(args.dir), Path(args.out) if args.out else None
    if (folder / "summary.json").is_file():
        from airlora.run_report import write_run_report

        path = write_run_report(folder, out)
    elif (folder / "results.jsonl").is_file() or (folder / "plan.json").is_file():
        from airlora.sweep.report import write_report

        path = write_report(folder, out)
    else:
        raise AirloraError(f"{args.dir!r} holds neither a finished run (summary.json, from `airlora run --out`) nor a "
                           "sweep (results.jsonl, from `airlora sweep --out`)")
    print(f"report written to {path}, figures in {path.parent / 'figures'}")
    return 0


def _cmd_edge(args: argparse.Namespace) -> int:
    import json

    if args.runtime == "llama.cpp":
        from airlora.edge_llamacpp import llamacpp_evaluate

        result = llamacpp_evaluate(args.adapter_dir, args.base, data=args.data, expected_sha256=args.sha256)
    else:
        from airlora.edge import edge_evaluate

        result = edge_evaluate(args.adapter_dir, args.base, data=args.data, expected_sha256=args.sha256)
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
