"""The report's PNG figures (paper Figs. 3–8, and the accuracy vs on-air bits plane), with matplotlib."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only; no display needed
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from airlora.io import atomic_path  # noqa: E402
from airlora.ranks import MODULES, parse_key  # noqa: E402
from airlora.sweep.stats import mean_ci  # noqa: E402
from airlora.sweep.tables import group, label, methods_in, setting  # noqa: E402

Row = dict[str, Any]


def save(fig: plt.Figure, path: Path) -> Path:
    """Write the figure atomically (a reader never sees half a PNG) and close it."""
    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, dpi=120, format="png")  # the temporary name ends in .tmp, so say the format
    finally:
        plt.close(fig)
    return path


def _curve_band(curves: list[list[float]]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Mean curve over seeds and its 95 % band, on the episodes every seed reached."""
    n = min(len(c) for c in curves)
    stats = [mean_ci([c[i] for c in curves]) for i in range(n)]
    mean = np.array([s.mean for s in stats])
    half = np.nan_to_num(np.array([s.half_width for s in stats]))
    return np.arange(1, n + 1), mean, half


def reward_curves(rows: list[Row], key: str, path: Path, title: str, name=label) -> Path:
    """Mean episode reward per group (method, λ or prediction type), mean over seeds with a 95 % band."""
    fig, ax = plt.subplots(figsize=(6.4, 4), layout="constrained")
    for value, chunk in group(rows, key).items():
        x, mean, half = _curve_band([r["reward_curve"] for r in chunk])
        ax.plot(x, mean, label=f"{name(value)} (n={len(chunk)})")
        ax.fill_between(x, mean - half, mean + half, alpha=0.2)
    ax.set(xlabel="episode", ylabel="mean reward R = −U − λη", title=title)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return save(fig, path)


def accuracy_vs(rows: list[Row], key: str, path: Path, xlabel: str, title: str, by_method: bool = True) -> Path:
    """Test accuracy (mean ± 95 % CI over seeds) against a numeric setting, one line per method."""
    fig, ax = plt.subplots(figsize=(6.4, 4), layout="constrained")
    parts = group(rows, "method") if by_method else {"all": rows}
    for method in (methods_in(rows) if by_method else ["all"]):
        points = sorted(group(parts[method], lambda r: float(str(r[key]).split(",")[0])).items())
        est = [mean_ci([r["test_accuracy"] for r in chunk]) for _, chunk in points]
        ax.errorbar([x for x, _ in points], [e.mean for e in est], yerr=[np.nan_to_num(e.half_width) for e in est],
                    marker="o", capsize=3, label=label(method) if by_method else None)
    ax.set(xlabel=xlabel, ylabel="test accuracy", title=title)
    if by_method:
        ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return save(fig, path)


def steps_panels(train_rows: list[Row], infer_rows: list[Row], path: Path) -> Path:
    """Paper Fig. 7: accuracy vs DDPM training steps T and vs DDIM inference steps T_diff."""
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8), sharey=True, layout="constrained")
    for ax, rows, key, xlabel in ((axes[0], train_rows, "train_timesteps", "diffusion training steps T"),
                                  (axes[1], infer_rows, "inference_steps", "DDIM inference steps")):
        points = sorted(group(rows, key).items())
        est = [mean_ci([r["test_accuracy"] for r in chunk]) for _, chunk in points]
        ax.errorbar([x for x, _ in points], [e.mean for e in est], yerr=[np.nan_to_num(e.half_width) for e in est],
                    marker="o", capsize=3)
        ax.set(xlabel=xlabel)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("test accuracy")
    return save(fig, path)


def layer_module_grid(values: dict[str, float]) -> np.ndarray:
    """A mapping "layers.{i}.{module}" -> value as a (layers, 6) array in the canonical module order."""
    layers = 1 + max(parse_key(k)[0] for k in values)
    grid = np.zeros((layers, len(MODULES)))
    for key, value in values.items():
        layer, module = parse_key(key)
        grid[layer, MODULES.index(module)] = value
    return grid


def heatmap_figure(panels: dict[str, tuple[dict[str, float], float | None]], unit: str | list[str] = "rank",
                   annotate: bool = False) -> plt.Figure:
    """One layer × module heat-map per panel: title -> (mapping, colour-scale maximum or None for the data's);
    ``unit``: the colour bars' label, or one per panel; ``annotate`` writes each cell's value in it."""
    fig, axes = plt.subplots(1, len(panels), figsize=(3.4 * len(panels), 3.8), squeeze=False, layout="constrained")
    units = [unit] * len(panels) if isinstance(unit, str) else unit
    for ax, (title, (values, vmax)), unit in zip(axes[0], panels.items(), units, strict=True):
        grid = layer_module_grid(values)
        image = ax.imshow(grid, cmap="viridis", vmin=0, vmax=vmax, aspect="auto")
        ax.set(title=title, xlabel="module", ylabel="layer", xticks=range(len(MODULES)), xticklabels=MODULES,
               yticks=range(grid.shape[0]))
        ax.title.set_fontsize(9)
        fig.colorbar(image, ax=ax, fraction=0.046, label=unit if vmax is not None else None)
        if annotate:
            top = vmax or float(grid.max()) or 1.0
            for (layer, m), value in np.ndenumerate(grid):
                ax.text(m, layer, f"{value:g}", ha="center", va="center", fontsize=7,
                        color="black" if value > 0.6 * top else "white")
    return fig


def heatmap_panels(panels: dict[str, tuple[dict[str, float], float | None]], path: Path, unit: str = "rank") -> Path:
    """``heatmap_figure`` written to ``path``."""
    return save(heatmap_figure(panels, unit), path)


def rank_heatmaps(rows: list[Row], path: Path) -> Path:
    """Paper Fig. 8: mean delivered rank per (layer, module), one panel per noise schedule."""
    panels = {}
    for schedule, chunk in group(rows, "beta_schedule").items():
        mean = {k: float(np.mean([r["ranks"][k] for r in chunk])) for k in chunk[0]["ranks"]}
        panels[f"{schedule} (n={len(chunk)})"] = (mean, chunk[0]["r_max"])
    return heatmap_panels(panels, path)


def pareto(rows: list[Row], path: Path) -> Path:
    """Accuracy vs on-air bits: every run as a dot, each setting's mean over seeds as a marker coloured by
    method, and the front of the setting means.

    No error bars here: with a handful of seeds a t-interval spans most of the plot; the table carries them."""
    fig, ax = plt.subplots(figsize=(6.8, 4.4), layout="constrained")
    means = []
    for method in methods_in(rows):
        settings = group([r for r in rows if r["method"] == method], setting)
        colour = None
        for chunk in settings.values():
            bits = np.array([r["transmitted_bits"] for r in chunk]) / 1e6
            acc = np.array([r["test_accuracy"] for r in chunk])
            dots = ax.scatter(bits, acc, s=10, alpha=0.3, color=colour)
            colour = dots.get_facecolor()[0][:3]
            ax.scatter(bits.mean(), acc.mean(), s=60, marker="D", edgecolor="black", color=colour)
            means.append((float(bits.mean()), float(acc.mean())))
        ax.scatter([], [], s=60, marker="D", edgecolor="black", color=colour,
                   label=f"{label(method)} ({len(settings)} setting{'s' * (len(settings) > 1)})")
    ax.plot(*zip(*pareto_front(means), strict=True), "k--", lw=1, label="Pareto front of the setting means")
    ax.set(xlabel="on-air adapter size (Mbit)", ylabel="test accuracy", title="Accuracy vs bits sent, every setting")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    return save(fig, path)


def pareto_front(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """The points no other point beats on both fewer bits and higher accuracy, by increasing bits."""
    front, best = [], -np.inf
    for bits, acc in sorted(points, key=lambda p: (p[0], -p[1])):
        if acc > best:
            front.append((bits, acc))
            best = acc
    return front
