"""Live logging of a run (``train.report_to``): TensorBoard event files or an offline Weights & Biases run.

Names are CleanRL's kind (``charts/…``, ``losses/…``, ``policy/…``) and stable; the x-axis of every scalar is the
step index of metrics.csv (0-based). The README lists them; ``STEP_SCALARS`` and the methods below are the source.

- every step: ``charts/*`` and ``perf/*`` from the step's metrics.csv row, and the histogram ``charts/ranks`` of the
  36 (layers × 6) ranks applied (``charts/bits`` of the precisions of the modules sent, when several are allowed);
- each evaluation: ``eval/val_accuracy`` (at the delivered ranks) and ``eval/best_val_accuracy``; at the end, at the
  last step, ``eval/test_accuracy`` (the delivered adapter, after its codecs) and, with ``train.deliver_every_snr``,
  ``eval/test_accuracy_{snr}dB``;
- each row an allocator adds to ``Allocator.metric_rows`` (airllm: one per episode): ``losses/{key}`` for keys with
  "loss", ``policy/{key}`` for the others, at the step the row appeared;
- once: the resolved config as hparams (TensorBoard's HParams tab) and as text (``config``).

A resumed run continues the same TensorBoard log: its writer is opened with ``purge_step`` = the checkpoint's step,
so TensorBoard drops whatever the stopped process had logged from that step on, and each step appears once. The
trainer flushes the log at every checkpoint, so nothing before a checkpoint is lost to a kill. A resumed run's
wandb log is a new offline run named ``{run}-resume-{step}`` in the group ``{run}``: within each run no step repeats.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from airlora.errors import AirloraError

TENSORBOARD_DIR = "tensorboard"
WANDB_DIR = "wandb"
STEP_SCALARS = {
    "charts/loss": "loss", "charts/reward": "reward", "charts/eta": "eta", "charts/airtime_s": "airtime_s",
    "charts/snr_db": "snr_db", "charts/total_rank": "total_rank", "charts/transmitted_params": "transmitted_params",
    "charts/on_air_bits": "transmitted_bits", "charts/budget_ok": "budget_ok",
    "charts/lexical_entropy": "lexical_entropy", "charts/oov_rate": "oov_rate", "perf/step_s": "step_s",
    "perf/rss_mb": "rss_mb",
}
"""Per-step scalar -> its metrics.csv column (besides charts/t_max_s, charts/capacity_mbps, charts/learning_rate,
charts/mean_rank, and perf/decision_ms, perf/apply_ms, perf/update_ms, in ms)."""
HPARAM_METRICS = ("eval/test_accuracy", "eval/best_val_accuracy", "charts/reward")
"""The scalars the HParams tab shows beside each run's config."""
LAYOUT = {"airlora": {
    "airtime vs T_max (s)": ["Multiline", ["charts/airtime_s", "charts/t_max_s"]],
    "loss and reward": ["Multiline", ["charts/loss", "charts/reward"]],
    "validation accuracy": ["Multiline", ["eval/val_accuracy", "eval/best_val_accuracy"]],
}}
"""TensorBoard's Custom Scalars tab: the charts read together on one plot."""


def available(backend: str) -> bool:
    """True when the package ``backend`` needs is installed (nothing is imported)."""
    return importlib.util.find_spec({"tensorboard": "tensorboard", "wandb": "wandb"}[backend]) is not None


def resolve_report_to(report_to: str) -> str:
    """The backend a run logs to: 'auto' is TensorBoard when installed, else 'none'; an asked-for backend that is
    not installed is a one-line error (raised before the run's folder is made)."""
    if report_to == "auto":
        return "tensorboard" if available("tensorboard") else "none"
    if report_to != "none" and not available(report_to):
        extra = "tensorboard" if report_to == "tensorboard" else "'airlora[wandb]'"
        raise AirloraError(f"train.report_to = {report_to!r} but {report_to} is not installed; pip install {extra}, "
                           "or --report-to none")
    return report_to


class Tracker:
    """What the trainer logs to; this base logs nothing (``train.report_to: none``)."""

    backend = "none"

    def scalars(self, step: int, values: Mapping[str, float]) -> None:
        """Log ``tag -> value`` at ``step``."""

    def histogram(self, step: int, tag: str, values: np.ndarray, edges: np.ndarray) -> None:
        """Log the histogram of ``values`` over the bin ``edges`` at ``step``."""

    def flush(self) -> None:
        """Everything logged so far on disk (called at checkpoints)."""

    def close(self) -> None:
        """Flush and release the log."""

    # ---- what the trainer and the run call; the names are built here, once ----

    def step(self, step: int, row: Mapping[str, Any], ranks: Mapping[str, int], precisions: Mapping[str, int] | None,
             t_max_s: float, r_max: int, lr: float, several_bits: bool) -> None:
        """The step's metrics.csv ``row`` and its applied ``ranks`` (and ``precisions``)."""
        values = {tag: float(row[column]) for tag, column in STEP_SCALARS.items()}
        values |= {"charts/t_max_s": t_max_s, "charts/capacity_mbps": row["capacity_bps"] / 1e6,
                   "charts/learning_rate": lr, "charts/mean_rank": row["total_rank"] / max(len(ranks), 1),
                   "perf/decision_ms": 1e3 * row["decision_s"], "perf/apply_ms": 1e3 * row["apply_s"],
                   "perf/update_ms": 1e3 * row["update_s"]}
        self.scalars(step, values)
        self.histogram(step, "charts/ranks", np.fromiter(ranks.values(), dtype=np.float64),
                       np.arange(r_max + 2) - 0.5)
        if several_bits and precisions is not None:
            sent = np.array([precisions[k] for k, r in ranks.items() if r], dtype=np.float64)
            if sent.size:
                self.histogram(step, "charts/bits", sent, np.array([0.5, 6, 12, 24, 40]))  # int4, int8, fp16, fp32

    def episode(self, step: int, row: Mapping[str, Any]) -> None:
        """One row of ``Allocator.metric_rows``: ``losses/{key}`` (keys with "loss") and ``policy/{key}``."""
        values = {}
        for key, value in row.items():
            if key == "episode" or isinstance(value, bool) or not isinstance(value, (int, float, np.number)):
                continue
            values[f"losses/{key}" if "loss" in key else f"policy/{key}"] = float(value)
        self.scalars(step, values)

    def evaluation(self, step: int, values: Mapping[str, float]) -> None:
        """Accuracies, as ``eval/{name}``."""
        self.scalars(step, {f"eval/{name}": float(v) for name, v in values.items()})


class TensorBoardTracker(Tracker):
    """Event files in ``log_dir`` through torch's ``SummaryWriter``."""

    backend = "tensorboard"

    def __init__(self, log_dir: Path, purge_step: int | None, hparams: dict[str, Any] | None,
                 config_text: str) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(log_dir), purge_step=purge_step, flush_secs=30)
        if hparams is not None:  # a new log (a fresh run, or a resume from step 0, whose purge drops the old one)
            from torch.utils.tensorboard.summary import hparams as hparams_summary

            writer = self.writer._get_file_writer()
            for summary in hparams_summary(hparams, dict.fromkeys(HPARAM_METRICS, math.nan)):
                writer.add_summary(summary)  # in this run's own folder, not add_hparams' extra sub-run
            self.writer.add_text("config", config_text, 0)
            self.writer.add_custom_scalars(LAYOUT)

    def scalars(self, step: int, values: Mapping[str, float]) -> None:
        for tag, value in values.items():
            self.writer.add_scalar(tag, value, step)

    def histogram(self, step: int, tag: str, values: np.ndarray, edges: np.ndarray) -> None:
        self.writer.add_histogram(tag, values, step, bins=edges)

    def flush(self) -> None:
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class WandbTracker(Tracker):
    """A Weights & Biases run, offline unless ``WANDB_MODE`` says otherwise (``wandb sync`` uploads it later)."""

    backend = "wandb"

    def __init__(self, out: Path, resume_step: int | None, hparams: dict[str, Any]) -> None:
        import wandb

        self.wandb = wandb
        name = out.name if not resume_step else f"{out.name}-resume-{resume_step}"
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "airlora"), dir=str(out), name=name,
                              group=out.name, mode=os.environ.get("WANDB_MODE", "offline"), config=hparams,
                              settings=wandb.Settings(console="off", silent=True), reinit="create_new")

    def scalars(self, step: int, values: Mapping[str, float]) -> None:
        self.run.log(dict(values), step=step)

    def histogram(self, step: int, tag: str, values: np.ndarray, edges: np.ndarray) -> None:
        self.run.log({tag: self.wandb.Histogram(np_histogram=np.histogram(values, bins=edges))}, step=step)

    def close(self) -> None:
        self.run.finish()


def hparams_of(resolved: Mapping[str, Any]) -> dict[str, Any]:
    """The resolved config as flat ``{"train.lr": 0.005, …}`` with values TensorBoard's HParams accepts (numbers,
    text, booleans; None and lists as text)."""
    from airlora.config import flatten

    out = {}
    for key, value in flatten(dict(resolved)).items():
        if key.startswith("history"):
            continue
        out[key] = value if isinstance(value, (bool, int, float, str)) else json.dumps(value)
    return out


def open_tracker(backend: str, out: Path, resume_step: int | None, resolved: Mapping[str, Any]) -> Tracker:
    """The tracker of ``backend`` ('tensorboard', 'wandb' or 'none') for the run in ``out``; ``resume_step`` is the
    step a resumed run continues from (None for a new run)."""
    if backend == "none":
        return Tracker()
    hparams = hparams_of(resolved)
    if backend == "wandb":
        (out / WANDB_DIR).mkdir(exist_ok=True)
        return WandbTracker(out, resume_step, hparams)
    fresh = not resume_step
    text = "```json\n" + json.dumps(dict(resolved), indent=2) + "\n```"
    return TensorBoardTracker(out / TENSORBOARD_DIR, resume_step, hparams if fresh else None, text)
