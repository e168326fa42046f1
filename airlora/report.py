"""Human-readable output of a run and of the channel calculator (rich tables)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from airlora.channel import Budget, SnrSchedule, capacity_bps, scale_matched_bandwidth_hz
from airlora.config import RunConfig
from airlora.models import module_map_without_weights
from airlora.ranks import MODULES, parse_key


def rank_table(ranks: dict[str, int]) -> Table:
    """Ranks as a layer × module grid."""
    layers = sorted({parse_key(k)[0] for k in ranks})
    table = Table()
    table.add_column("layer", justify="right")
    for module in MODULES:
        table.add_column(module, justify="right")
    for layer in layers:
        table.add_row(str(layer), *(str(ranks[f"layers.{layer}.{m}"]) for m in MODULES))
    return table


def print_summary(summary: dict[str, Any], out: Path, console: Console | None = None) -> None:
    """The result of a run: accuracy, delivered ranks, on-air size and airtime against T_max."""
    console = console or Console()
    s = summary
    console.print(f"Delivered ranks (best checkpoint, step {s['best_step']}; r_max {s['r_max']}):")
    console.print(rank_table(s["ranks"]))
    ok = "[green]fits[/green]" if s["budget_ok"] else "[red]OVER BUDGET[/red]"
    lines = [
        f"allocator {s['allocator']} · model {s['model']} · data {s['dataset']} {s['dataset_sizes']}",
        f"test accuracy {s['test_accuracy']:.4f} (validation {s['val_accuracy']:.4f}, "
        f"majority class {s['majority_baseline_accuracy']:.4f}) after {s['steps']} steps",
        f"on air {s['transmitted_params']:,} params = {s['adapter_params']:,} adapter + {s['head_params']:,} head "
        f"(paper formula r·(2d_h+1): {s['transmitted_params_paper_formula']:,}); "
        f"{s['transmitted_bits']:,} bits at {_precision_text(s)} + {8 * s['delivery_overhead_bytes']:,} reserved for "
        f"the delivery's header, config and manifest = {s['on_air_bits']:,} bits",
        f"channel {s['snr_db']:g} dB {s['fading']}, W {s['bandwidth_hz'] / 1e6:.3f} MHz"
        f"{' (scale-matched)' if s['bandwidth_is_scale_matched'] else ''}, C {s['capacity_bps'] / 1e6:.3f} Mbit/s",
        f"airtime {s['airtime_s']:.3f} s of T_max {s['t_max_s']:g} s (η {s['eta']:.3f}): {ok}; "
        f"steps over budget: {s['steps_over_budget']}",
        f"wall {s['wall_s']:.1f} s · {s['mean_step_s'] * 1e3:.0f} ms/step · decision overhead "
        f"{s['decision_overhead_ratio']:.4f} · results in {out}",
    ]
    if not s["budget_ok"] and not any(s["ranks"].values()):
        lines.append(f"[red]nothing fits: even the task head alone ({s['head_params']:,} params, "
                     f"{s['transmitted_bits']:,} bits) and the delivery's overhead need more than T_max "
                     f"{s['t_max_s']:g} s at {s['snr_db']:g} dB; raise --t-max-s or --bandwidth-hz, or lower "
                     "--bits[/red]")
    if s["steps_where_nothing_fits"]:
        lines.append(f"[yellow]warning: at {s['steps_where_nothing_fits']} steps not even one triplet fit the "
                     "budget; those steps trained the head only (rank 0 everywhere)[/yellow]")
    for line in lines:
        console.print(line)


def _precision_text(s: dict[str, Any]) -> str:
    """'32 bits/param', or the mix of precisions the delivered modules use."""
    if s["bits_per_param"] is not None:
        return f"{s['bits_per_param']} bits/param"
    used = sorted({s["precisions"][k] for k, r in s["ranks"].items() if r})
    return f"{'/'.join(map(str, used))}-bit modules and a {s['head_bits']}-bit head"


def print_channel(config: RunConfig, console: Console | None = None) -> None:
    """Capacity, budget bits and the largest uniform rank that fits, per SNR, for the configured model."""
    console = console or Console()
    ch = config.channel
    values = sorted(set(SnrSchedule(ch, seed=0).values)) if ch.snr_schedule == "trace" else ch.snr_db
    module_map = module_map_without_weights(config.model, config.adapter.target_modules)
    bandwidth = ch.bandwidth_hz or scale_matched_bandwidth_hz(module_map.shapes)
    note = "" if ch.bandwidth_hz else " (scale-matched to the paper's OPT-1.3B at 100 MHz)"
    joint = len(ch.bits) > 1
    bits_text = f"{ch.bits_per_param} bits/param" if not joint else f"precisions {'/'.join(map(str, ch.bits))} bits"
    console.print(f"model {config.model}: {module_map.num_layers} layers × 6 modules ({module_map.family}); "
                  f"W = {bandwidth / 1e6:.4f} MHz{note}; T_max {ch.t_max_s:g} s; {bits_text}; "
                  f"fading {ch.fading}; adapter only (the task head and the delivery's overhead are not counted here)")
    table = Table()
    for col in ("SNR dB", "C Mbit/s", "budget bits", f"r={config.adapter.r_max} bits", "uniform rank",
                *(("uniform (rank, bits)",) if joint else ())):
        table.add_column(col, justify="right")
    for snr_db in values:
        cap = capacity_bps(snr_db, ch, bandwidth)
        budget = Budget.for_delivery(module_map.shapes, config.adapter.r_max, ch.bits, cap, ch.t_max_s)
        full = budget.bits({k: config.adapter.r_max for k in budget.keys})
        pair = budget.uniform_pair()
        table.add_row(f"{snr_db:g}", f"{cap / 1e6:.3f}", f"{cap * ch.t_max_s:,.0f}", f"{full:,}",
                      str(budget.max_uniform_rank()), *((f"{pair[0]}, {pair[1]}",) if joint else ()))
    console.print(table)
    console.print(f"uniform rank: the largest rank that fits on every module at once (at {ch.bits_per_param} bits)"
                  + ("; uniform (rank, bits): the largest rank at any allowed precision, then the highest precision "
                     "at that rank" if joint else ""))
