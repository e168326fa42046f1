"""``airlora report RUN_DIR``: the figures of one finished run, drawn from its files, as PNG in RUN_DIR/figures/.

Read: summary.json, metrics.csv (one row a step), ranks.csv (the ranks applied at each step) and, for airllm,
policy_metrics.csv (one row an episode). Each ``*_figure`` function builds a matplotlib Figure from a ``RunTables``
(so a test can read its data back); ``write_run_report`` saves them with the sweep report's atomic ``save`` and writes
report.md, which shows them with their captions.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.ticker import MaxNLocator

from airlora.errors import AirloraError
from airlora.io import write_text_atomic
from airlora.ranks import MODULES, parse_key
from airlora.sweep.figures import heatmap_figure, plt, save

Row = dict[str, Any]

CAPTIONS = {
    "training": "Training loss U of each step's batch (its moving mean in bold), and validation accuracy at each "
    "evaluation, with the delivered checkpoint starred and its test accuracy and the majority class as "
    "lines.",
    "reward": "Reward R = −U − λ·η per step, and η, the share of the airtime budget the step's ranks use (1: all "
    "of T_max); steps over the budget in red.",
    "airtime": "Airtime of each step's adapter against T_max, above the SNR the step drew; steps over T_max in red.",
    "delivered_ranks": "The delivered adapter: rank per layer × module (and, with several precisions, the bits per "
    "value each module is sent at; 0 = not sent).",
    "ranks_over_time": "The ranks applied at each step, one strip per module (rows: layers, columns: steps).",
    "policy": "airllm's policy, per episode: mean reward, PPO and refiner losses and diagnostics, guidance scale, "
    "decision time.",
}
"""Figure name (figures/{name}.png) -> what it shows; report.md prints these under the figures."""
POLICY_PANELS = {
    "mean_reward": "episode mean reward",
    "ppo_policy_loss": "PPO policy loss",
    "ppo_value_loss": "PPO value loss",
    "refiner_denoise_loss": "refiner denoising loss",
    "ppo_approx_kl": "PPO approx. KL",
    "ppo_clipfrac": "PPO clip fraction",
    "ppo_explained_variance": "PPO explained variance",
    "ppo_entropy": "PPO entropy",
    "guidance_scale": "guidance scale w",
    "critic_noise_std": "critic noise std",
    "decision_ms": "decision (ms)",
}
"""policy_metrics.csv column -> its panel's title; the columns a variant lacks (e.g. ppo alone) are left out."""


@dataclass
class RunTables:
    """The files of a finished run folder, numbers parsed (an empty cell is None, True/False a bool)."""

    summary: dict[str, Any]
    metrics: list[Row]
    ranks: list[Row] = field(default_factory=list)
    """ranks.csv rows: step, then "layers.{i}.{module}" -> rank; empty for runs older than the file."""
    policy: list[Row] = field(default_factory=list)
    """policy_metrics.csv rows (airllm), one per episode."""

    def column(self, name: str) -> np.ndarray:
        """One metrics.csv column over the steps."""
        return np.array([row[name] for row in self.metrics], dtype=float)


def _cell(text: str) -> Any:
    if text == "":
        return None
    if text in ("True", "False"):
        return text == "True"
    return float(text)


def _read_csv(path: Path) -> list[Row]:
    with path.open(newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        try:
            return [{key: _cell(value) for key, value in row.items()} for row in reader]
        except (ValueError, TypeError):
            raise AirloraError(
                f"{str(path)!r}: line {reader.line_num} is not a row of numbers; the file was changed after the run"
            ) from None


def read_run(run_dir: Path) -> RunTables:
    """The tables of the finished run in ``run_dir``; a clear error when it is not one."""
    summary_path, metrics_path = run_dir / "summary.json", run_dir / "metrics.csv"
    missing = [path.name for path in (summary_path, metrics_path) if not path.is_file()]
    if missing:
        raise AirloraError(
            f"{str(run_dir)!r} has no {' and no '.join(missing)}; expected the --out folder of a finished `airlora run`"
        )
    try:
        summary = json.loads(summary_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise AirloraError(f"{str(summary_path)!r} is not valid JSON ({err})") from None
    optional = [run_dir / name for name in ("ranks.csv", "policy_metrics.csv")]
    ranks, policy = (_read_csv(path) if path.is_file() else [] for path in optional)
    return RunTables(summary, _read_csv(metrics_path), ranks, policy)


def _noisy_curve(ax: plt.Axes, steps: np.ndarray, values: np.ndarray, label: str) -> None:
    """A per-step curve, thin, with its centred moving mean over ~1/20 of the steps in bold."""
    ax.plot(steps, values, lw=0.8, alpha=0.45, label=label)
    window = max(1, len(values) // 20)
    if window > 1:
        kernel = np.ones(window) / window
        mean = np.convolve(values, kernel, mode="same") / np.convolve(np.ones_like(values), kernel, mode="same")
        ax.plot(steps, mean, lw=2, color="C0", label=f"mean over {window} steps")


def _title(run: RunTables, what: str) -> str:
    s = run.summary
    return f"{what}: {s['allocator']}, {s['dataset']}, {s['steps']} steps"


def _finish(ax: plt.Axes) -> None:
    """A grid, and the legend in a row above the panel, where it hides no data."""
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(
            fontsize=8,
            loc="lower left",
            bbox_to_anchor=(0, 1.01),
            ncols=4,
            frameon=False,
            borderaxespad=0,
            handlelength=1.5,
            columnspacing=1.2,
        )


def training_figure(run: RunTables) -> plt.Figure:
    """Loss per step (top) and validation accuracy at each evaluation (bottom)."""
    s, steps = run.summary, run.column("step")
    fig, (ax_loss, ax_acc) = plt.subplots(2, 1, sharex=True, figsize=(7, 5.6), layout="constrained")
    _noisy_curve(ax_loss, steps, run.column("loss"), "batch loss")
    ax_loss.set(ylabel="training loss U")
    fig.suptitle(_title(run, "Loss and accuracy"), fontsize=11)
    evals = [(row["step"], row["val_accuracy"]) for row in run.metrics if row["val_accuracy"] is not None]
    ax_acc.plot([s["best_step"]], [s["val_accuracy"]], "*", ms=16, color="C3", label="delivered checkpoint")
    if evals:
        ax_acc.plot(*zip(*evals, strict=True), "o-", ms=5, color="C1", label="validation")
    ax_acc.axhline(s["test_accuracy"], ls="--", color="C2", label=f"test, as delivered ({s['test_accuracy']:.3f})")
    ax_acc.axhline(
        s["majority_baseline_accuracy"],
        ls=":",
        color="grey",
        label=f"majority class ({s['majority_baseline_accuracy']:.3f})",
    )
    ax_acc.set(xlabel="step", ylabel="accuracy")
    _finish(ax_loss)
    _finish(ax_acc)
    return fig


def _over_budget(run: RunTables) -> np.ndarray:
    return ~np.array([bool(row["budget_ok"]) for row in run.metrics])


def reward_figure(run: RunTables) -> plt.Figure:
    """Reward per step (top) and η, the share of the budget used (bottom)."""
    steps, over = run.column("step"), _over_budget(run)
    fig, (ax_r, ax_eta) = plt.subplots(2, 1, sharex=True, figsize=(7, 5.6), layout="constrained")
    _noisy_curve(ax_r, steps, run.column("reward"), "reward")
    ax_r.set(ylabel="R = −U − λη")
    fig.suptitle(_title(run, f"Reward (λ = {run.summary['reward_lambda']:g}) and η"), fontsize=11)
    eta = run.column("eta")
    ax_eta.plot(steps, eta, ".-", lw=0.8, ms=4, label="η of the step's ranks")
    ax_eta.plot(steps[over], eta[over], "o", color="red", label=f"over budget ({int(over.sum())})")
    ax_eta.axhline(1.0, ls="--", color="black", lw=1, label="η = 1 (all of T_max)")
    ax_eta.set(xlabel="step", ylabel="η = airtime / T_max", ylim=(0, max(1.1, float(eta.max()) * 1.05)))
    _finish(ax_r)
    _finish(ax_eta)
    return fig


def airtime_figure(run: RunTables) -> plt.Figure:
    """Airtime per step against T_max (top), the step's SNR (bottom)."""
    steps, over, t_max_s = run.column("step"), _over_budget(run), run.summary["t_max_s"]
    fig, (ax_t, ax_snr) = plt.subplots(2, 1, sharex=True, figsize=(7, 5.2), height_ratios=(2, 1), layout="constrained")
    airtime = run.column("airtime_s")
    ax_t.plot(steps, airtime, ".-", lw=0.8, ms=4, label="airtime of the step's adapter")
    ax_t.plot(steps[over], airtime[over], "o", color="red", label=f"over T_max ({int(over.sum())} steps)")
    ax_t.axhline(t_max_s, ls="--", color="black", lw=1, label=f"T_max = {t_max_s:g} s")
    ax_t.set(ylabel="airtime (s)", ylim=(0, max(t_max_s, float(airtime.max())) * 1.1))
    fig.suptitle(_title(run, "Airtime against T_max"), fontsize=11)
    ax_snr.plot(steps, run.column("snr_db"), ".", ms=5, color="C4")
    ax_snr.set(xlabel="step", ylabel="SNR (dB)")
    _finish(ax_t)
    _finish(ax_snr)
    return fig


def delivered_ranks_figure(run: RunTables) -> plt.Figure:
    """The delivered ranks as a layer × module heat-map; a bits-per-module panel beside it with several precisions."""
    s = run.summary
    ranks = s["ranks"]
    panels = {f"delivered ranks (step {s['best_step']}, r_max {s['r_max']})": (ranks, float(s["r_max"]))}
    several = len(s.get("allowed_bits", [])) > 1
    if several:
        bits = {key: s["precisions"][key] if rank else 0 for key, rank in ranks.items()}
        panels["bits per value (0: not sent)"] = (bits, float(max(s["allowed_bits"])))
    layers = 1 + max(parse_key(key)[0] for key in ranks)
    return heatmap_figure(panels, unit=["rank", "bits per value"][: len(panels)], annotate=layers <= 12)


def ranks_over_time_figure(run: RunTables) -> plt.Figure:
    """The ranks applied at each step: one strip per module, layers down, steps across."""
    keys = [key for key in run.ranks[0] if key != "step"]
    layers = 1 + max(parse_key(key)[0] for key in keys)
    modules = [m for m in MODULES if any(parse_key(key)[1] == m for key in keys)]
    steps = [row["step"] for row in run.ranks]
    fig, axes = plt.subplots(
        len(modules), 1, sharex=True, figsize=(7.5, 0.9 * len(modules) + 1.4), layout="constrained", squeeze=False
    )
    extent = (steps[0] - 0.5, steps[-1] + 0.5, layers - 0.5, -0.5)
    for ax, module in zip(axes[:, 0], modules, strict=True):
        grid = np.array([[row.get(f"layers.{layer}.{module}", 0) for row in run.ranks] for layer in range(layers)])
        image = ax.imshow(
            grid,
            aspect="auto",
            cmap="viridis",
            vmin=0,
            vmax=run.summary["r_max"],
            interpolation="nearest",
            extent=extent,
        )
        ax.set_ylabel(module, rotation=0, ha="right", va="center")
        ax.set_yticks([0, layers - 1])
    axes[0, 0].set_title(_title(run, "Ranks over time (rows of a strip: layers)"), fontsize=10)
    axes[-1, 0].set_xlabel("step")
    fig.colorbar(image, ax=axes[:, 0], label="rank", fraction=0.03)
    return fig


def policy_figure(run: RunTables) -> plt.Figure:
    """airllm's policy_metrics.csv: one small panel per learning-curve column, over episodes."""
    columns = [c for c in POLICY_PANELS if c in run.policy[0]]
    cols = 4
    rows = -(-len(columns) // cols)
    fig, axes = plt.subplots(
        rows, cols, sharex=True, figsize=(11, 2.3 * rows + 0.6), layout="constrained", squeeze=False
    )
    episodes = [row["episode"] for row in run.policy]
    style = "o-" if len(episodes) <= 30 else "-"
    for ax, column in zip(axes.flat, columns, strict=False):
        ax.plot(episodes, [row[column] for row in run.policy], style, ms=3, lw=1)
        ax.set_title(POLICY_PANELS[column], fontsize=9)
        ax.yaxis.get_major_formatter().set_useOffset(False)  # an offset label would sit on the title
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    for i, ax in enumerate(axes.flat):
        if i >= len(columns):
            ax.set_visible(False)
        elif i + cols >= len(columns):  # the lowest panel of its column
            ax.set_xlabel("episode")
            ax.xaxis.set_tick_params(labelbottom=True)
    fig.suptitle(_title(run, f"Policy learning curves ({run.summary.get('policy_variant', 'airllm')})"), fontsize=10)
    return fig


def run_figures(run: RunTables) -> dict[str, Callable[[RunTables], plt.Figure]]:
    """The figures this run has the files for: name -> the function that draws it."""
    figures = {
        "training": training_figure,
        "reward": reward_figure,
        "airtime": airtime_figure,
        "delivered_ranks": delivered_ranks_figure,
    }
    if run.ranks:
        figures["ranks_over_time"] = ranks_over_time_figure
    if run.policy:
        figures["policy"] = policy_figure
    return figures


def write_run_report(run_dir: Path, out: Path | None = None) -> Path:
    """Write figures/*.png and report.md for the run in ``run_dir`` (into ``out``, default the run folder)."""
    run = read_run(run_dir)
    out = out or run_dir
    s = run.summary
    lines = [
        f"# Run report: {run_dir.name}",
        "",
        f"{s['allocator']} on {s['model']}, data {s['dataset']}, {s['steps']} steps (seed {s['seed']}); test "
        f"accuracy {s['test_accuracy']:.4f} as delivered (majority class {s['majority_baseline_accuracy']:.4f}); "
        f"{s['transmitted_params']:,} parameters, airtime {s['airtime_s']:.3f} s of T_max {s['t_max_s']:g} s "
        f"at {s['snr_db']:g} dB ({'fits' if s['budget_ok'] else 'OVER BUDGET'}).",
        "",
    ]
    for name, draw in run_figures(run).items():
        path = save(draw(run), out / "figures" / f"{name}.png")
        lines += [f"![{name}](figures/{path.name})", "", CAPTIONS[name], ""]
    path = out / "report.md"
    write_text_atomic(path, "\n".join(lines))
    return path
