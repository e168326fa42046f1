"""One `airlora run`: build, train, deliver the best checkpoint, and write config, metrics and summary."""

from __future__ import annotations

import json
import shutil
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import save_file

from airlora import distributed
from airlora.allocators.base import call
from airlora.checkpoint import load_checkpoint, read_pointer, remove_checkpoints
from airlora.codecs import common_bits
from airlora.config import RunConfig, flatten, from_dict, merge
from airlora.data import split_statistics
from airlora.deliveries import budget_front, per_snr_deliveries
from airlora.errors import AirloraError
from airlora.io import atomic_path, write_json_atomic
from airlora.loader import Loader
from airlora.session import Session, build_session, resolved_config
from airlora.surrogate import PRETRAINED_DIR, pretrain_before_run
from airlora.tracking import TENSORBOARD_DIR, WANDB_DIR, Tracker, open_tracker, resolve_report_to
from airlora.trainer import TrainResult, evaluate, restore, train, write_step_files

RUN_FILES = ("config.json", "metrics.csv", "ranks.csv", "precisions.csv", "summary.json", "adapter.safetensors",
             "checkpoint.json", "policy.pt", "policy_metrics.csv", "report.md")
"""Every file name a run writes into its folder (policy.*: the airllm allocator's ``save``), besides these patterns."""
RUN_FILE_PATTERNS = ("checkpoint-*.pt", ".*.tmp")
"""Checkpoints, and the temporary files of atomic writes a killed run can leave."""
RUN_DIRS = (TENSORBOARD_DIR, WANDB_DIR, "figures", PRETRAINED_DIR)
"""Folders a run writes (its live logs, ``airlora.tracking``) or that are made from it (``airlora report RUN``'s
figures, with report.md among RUN_FILES), and the policy it pretrained first: replaced with the run by
``--overwrite``."""


def run_files(out: Path) -> tuple[list[Path], list[str]]:
    """The files and folders of ``out`` a run writes, and the names of every other entry (sorted)."""
    ours = {out / name for name in RUN_FILES} | {p for pattern in RUN_FILE_PATTERNS for p in out.glob(pattern)}
    folders = {out / name for name in RUN_DIRS}
    entries = list(out.iterdir()) if out.is_dir() else []
    mine = [p for p in entries if (p in ours and p.is_file()) or (p in folders and p.is_dir())]
    return sorted(mine), sorted(p.name for p in entries if p not in mine)


def prepare_out_dir(out: Path, overwrite: bool, resume: bool = False) -> None:
    """Refuse to mix two runs' results in one folder unless asked to replace them (or to continue one).

    ``--overwrite`` replaces a run's own files only; a folder that also holds anything else (notes, an export of
    the old run) is refused before anything is written, so the folder is wholly the old run or wholly the new one.
    """
    if out.exists() and not out.is_dir():
        raise AirloraError(f"--out {str(out)!r} is a file; expected a folder for the run")
    if overwrite:
        _, others = run_files(out)
        if others:
            raise AirloraError(f"--overwrite: {str(out)!r} also holds {', '.join(others)}, which an airlora run does "
                               "not write; move them away or choose another folder (--overwrite replaces a run's "
                               "own files only, so the folder never mixes two runs)")
    if (out / "summary.json").exists() and not overwrite:
        what = "; nothing to resume" if resume else "; choose another folder or --overwrite"
        raise AirloraError(f"--out {str(out)!r} already holds a finished run{what}")
    if read_pointer(out) is not None and not (overwrite or resume):
        raise AirloraError(f"--out {str(out)!r} holds an unfinished run with a checkpoint; add --resume to continue "
                           "it or --overwrite to start again")


def start_out_dir(out: Path, overwrite: bool) -> None:
    """Create the run folder once the inputs have been read (a rejected run leaves nothing behind)."""
    out.mkdir(parents=True, exist_ok=True)
    if overwrite:
        remove_checkpoints(out)
        (out / "summary.json").unlink(missing_ok=True)  # first: a folder without it is no finished run
        for path in run_files(out)[0]:
            if path.is_dir():
                shutil.rmtree(path)
            else:
                path.unlink()


def _read_config_json(out: Path) -> dict[str, Any]:
    path = out / "config.json"
    if not path.is_file():
        raise AirloraError(f"--resume: {str(out)!r} has no config.json; it holds no run to continue")
    try:
        data = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise AirloraError(f"--resume: {str(path)!r} is not valid JSON ({err})") from None
    if not isinstance(data, dict):
        raise AirloraError(f"--resume: {str(path)!r} is not a run's config (a JSON object expected)")
    return data


def saved_config(out: Path) -> RunConfig:
    """The config the run in ``out`` runs with (its config.json; derived values and the history dropped)."""
    data = _read_config_json(out)
    data.pop("resolved", None)
    data.pop("history", None)
    train = data.get("train")
    if isinstance(train, dict) and "regime" not in train:  # made before the regimes: the per-step MDP
        data["train"] = train | {"regime": "paper"}
    return from_dict(RunConfig, data)


def saved_history(out: Path) -> list[dict[str, Any]]:
    """The settings earlier resumes of the run in ``out`` changed (config.json's ``history``)."""
    return list(_read_config_json(out).get("history", []))


RESUME_MAY_CHANGE = ("train.lr", "train.head_lr", "train.steps", "train.eval_every", "train.eval_on_change",
                     "train.checkpoint_every", "train.patience", "train.progress", "train.threads", "train.device",
                     "train.autocast", "train.report_to", "train.distributed", "train.dist_backend",
                     "train.dist_timeout_s")
"""Settings a resumed run may change: none of them changes the steps already run, only the ones to come.

The lr schedule goes on from where it stood (see ``continue_schedule``); every change is recorded in config.json's
``history`` with the step it took effect at."""
RESUME_FIXED_FOR = {"adalora": ("train.steps",)}
"""Exceptions per allocator: AdaLoRA lays its rank-cut schedule (tinit, tfinal) over train.steps from the start."""


def check_same_run(saved: RunConfig, config: RunConfig) -> list[dict[str, Any]]:
    """A resumed run must be the run that was started, up to RESUME_MAY_CHANGE: the changes, or an error naming
    the first setting that may not change."""
    old, new = flatten(saved.to_dict()), flatten(config.to_dict())
    fixed = RESUME_FIXED_FOR.get(saved.allocator, ())
    changes = []
    for key in sorted(set(old) | set(new)):
        if old.get(key) == new.get(key):
            continue
        if key not in RESUME_MAY_CHANGE or key in fixed:
            why = f" (the {saved.allocator} allocator's schedule is laid out over it)" if key in fixed else ""
            raise AirloraError(f"--resume: {key} is {new.get(key)!r} but the run was started with {old.get(key)!r}"
                               f"{why}; resume with the same settings or start a new run (a resume may change "
                               f"{', '.join(RESUME_MAY_CHANGE)})")
        changes.append({"setting": key, "from": old.get(key), "to": new.get(key)})
    return changes


def continue_schedule(state: dict[str, Any], saved: RunConfig, config: RunConfig) -> None:
    """Carry a checkpoint's optimiser and LambdaLR state over to a changed train.lr, head_lr or steps, in place.

    At the resume step s the lr becomes (new lr / old lr) × the lr the run had at s, and from there it decays
    linearly to 0 at the new train.steps T: lr(t) = lr(s)·(T − t)/(T − s). A longer run stretches the rest of the
    decay, a shorter one steepens it; warm-up is unchanged. The schedule's factor f is recomputed from the new T by
    the trainer, so the base lr is scaled by f_old(s)/f_new(s) to keep lr(s) continuous.
    """
    from airlora.finetuner import linear_warmup_decay

    step, scheduler, groups = state["step"], state["scheduler"], state["optimizer"]["param_groups"]
    if scheduler["last_epoch"] != step:
        raise AirloraError(f"checkpoint of step {step} holds a schedule at step {scheduler['last_epoch']}; it cannot "
                           "be resumed")
    warmup = saved.train.warmup_steps
    old_factor = linear_warmup_decay(warmup, saved.train.steps)(step)
    new_factor = linear_warmup_decay(warmup, config.train.steps)(step)
    stretch = old_factor / new_factor if old_factor > 0 and new_factor > 0 else 1.0
    # FineTuner's parameter groups, in its order: the adapters (train.lr), then the task head (train.head_lr)
    lrs = ((saved.train.lr, config.train.lr), (saved.train.head_lr, config.train.head_lr))
    for g, (old_lr, new_lr) in enumerate(lrs):
        base = scheduler["base_lrs"][g] * (new_lr / old_lr) * stretch
        scheduler["base_lrs"][g] = groups[g]["initial_lr"] = base
        groups[g]["lr"] = scheduler["_last_lr"][g] = base * new_factor


def run(config: RunConfig, out: str | Path, overwrite: bool = False, resume: bool = False,
        command: str | None = None, loader: Loader | None = None) -> dict[str, Any]:
    """Run one fine-tuning job end to end and return its summary (also written to ``out``).

    ``resume`` continues the run in ``out`` from its last checkpoint (or from the start when it was stopped before
    its first one); a folder without the config.json of a started run is an error. ``command``: the command line
    that started it, kept in the summary (the model card quotes it). ``loader``: where the model and data come from
    (``airlora.loader``: a sweep worker's ``WarmCache``; by default read afresh).
    """
    started = time.perf_counter()
    out = Path(out)
    # several processes (torchrun, accelerate launch): rank 0 reads and writes the run folder, the others follow
    dist_backend = distributed.init(config.train, config.data.batch_size)
    main = distributed.is_main()
    if distributed.active() and config.train.distributed == "fsdp" and config.allocator == "airllm" and \
            config.policy.pretrain.before_run and not config.policy.load_path:
        raise AirloraError("policy.pretrain.before_run runs on rank 0 alone, which a sharded (train.distributed = "
                           "'fsdp') model cannot; pretrain first with `airlora pretrain-policy` and pass --policy")
    if not main:
        config = merge(config, {"train.progress": False})
    backend = resolve_report_to(config.train.report_to)
    checkpoint, history, at = distributed.on_main(_read_run_folder, config, out, overwrite, resume)
    t0 = time.perf_counter()
    session = build_session(config, loader)
    setup_s = time.perf_counter() - t0
    resolved = resolved_config(session) | {"history": history}
    resolved["resolved"]["report_to"] = backend
    pretrained = None
    if main:
        start_out_dir(out, overwrite)
        write_json_atomic(out / "config.json", resolved)
        if config.allocator == "airllm" and config.policy.pretrain.before_run and not config.policy.load_path:
            session, pretrained = pretrain_before_run(session, out, resume)
    session.allocator = distributed.main_decides(session.allocator, config.allocator)
    tracker = open_tracker(backend if main else "none", out, at, resolved)
    try:
        summary = _train_and_deliver(session, out, checkpoint, tracker, started)
    finally:
        tracker.close()
    summary["setup_s"] = setup_s
    summary["world_size"], summary["dist_backend"] = distributed.world_size(), dist_backend
    if session.device.type == "cuda":  # this process's (rank 0's) peak, for the GPU check
        summary["peak_gpu_mb"] = torch.cuda.max_memory_allocated() / 1e6
    if pretrained is not None:
        summary["pretrain"] = pretrained
    if command is not None:
        summary["command"] = command
    if main:
        write_json_atomic(out / "summary.json", summary)
        remove_checkpoints(out)  # a finished run is not resumed; its checkpoints only take space
    distributed.finish()
    return summary


def _read_run_folder(config: RunConfig, out: Path, overwrite: bool, resume: bool
                     ) -> tuple[dict[str, Any] | None, list[dict[str, Any]], int | None]:
    """Check ``out`` for this run and, on ``resume``, read its checkpoint: (checkpoint, history, its step)."""
    prepare_out_dir(out, overwrite, resume)
    if not resume:
        return None, [], None
    saved, history = saved_config(out), saved_history(out)
    changes = check_same_run(saved, config)
    checkpoint = load_checkpoint(out)
    at = 0 if checkpoint is None else checkpoint["step"]
    if config.train.steps <= at:
        raise AirloraError(f"--resume: train.steps = {config.train.steps} but the run is at step {at} already; "
                           f"give more than {at} steps")
    if checkpoint is not None and changes:
        continue_schedule(checkpoint, saved, config)
    history += [{"step": at, **change} for change in changes]
    return checkpoint, history, at


def _train_and_deliver(session: Session, out: Path, checkpoint: dict[str, Any] | None, tracker: Tracker,
                       started: float) -> dict[str, Any]:
    """Train, then deliver the best checkpoint: adapter.safetensors, the allocator's files, the summary (returned)."""
    config, main = session.config, distributed.is_main()
    result = train(session, out if main else None, checkpoint, tracker)  # out=None: only rank 0 writes
    if main:
        write_step_files(out, result.rows, result.rank_rows, result.precision_rows)
    restore(session, result.best)
    deliveries = per_snr_deliveries(session, result) if config.train.deliver_every_snr else None
    front = budget_front(session, result) if config.train.deliver_t_max_s else None
    session.adapters.set_ranks(result.best.ranks)  # the delivery decision: what is written, tested and sent
    precisions = delivered_precisions(session, result)
    if main:
        write_adapter(session, out / "adapter.safetensors", precisions)
    extras = call(session.allocator, "save", out)
    with session.as_delivered(result.best.ranks, precisions):  # the accuracy the edge gets, after the codecs
        test_accuracy = evaluate(session, session.test_batches)
    summary = summarise(session, result, test_accuracy, time.perf_counter() - started)
    summary.update(extras)
    accuracies = {"test_accuracy": test_accuracy}
    if front is not None:
        summary["budget_front"] = front
    if deliveries is not None:
        summary["deliveries"] = deliveries
        accuracies |= {f"test_accuracy_{d['snr_db']:g}dB": d["test_accuracy"] for d in deliveries}
    tracker.evaluation(result.rows[-1]["step"], accuracies)
    return summary


def delivered_precisions(session: Session, result: TrainResult) -> dict[str, int]:
    """The precision of every module in the delivery decision (the highest allowed where the checkpoint has none)."""
    return result.best.precisions or dict.fromkeys(result.best.ranks, session.head_bits)


def write_adapter(session: Session, path: Path, precisions: dict[str, int] | None = None) -> None:
    """The delivered adapter (active triplets and task head, fp32, before any codec) with what is needed to rebuild
    and send it.

    Tensors: ``{key}.lora_A`` (r, d_in) = Q_a, ``{key}.lora_B`` (d_out, r) = P_a, ``{key}.lora_E`` (r, 1) = λ_a,
    and ``head.{name}``. Metadata (strings): ranks, precisions (bits per module, the codecs ``airlora export`` sends
    them at) and head_bits, module names, scaling, r_max, model folder, num_labels (the head's classes).
    """
    tensors = {k: t.cpu() for k, t in session.adapters.active_tensors().items()}
    tensors.update({f"head.{name}": p.detach().cpu().contiguous() for name, p in session.head.items()})
    first = next(iter(session.adapters.modules.values()))
    metadata = {
        "format": "airlora-svd-adapter/1",
        "ranks": json.dumps(session.adapters.ranks()),
        "precisions": json.dumps(precisions or dict.fromkeys(session.adapters.ranks(), session.head_bits)),
        "head_bits": str(session.head_bits),
        "module_names": json.dumps(session.module_map.names),
        "scaling": repr(first.scaling),
        "r_max": str(session.adapters.r_max),
        "model_dir": str(session.model_dir),
        "num_labels": str(session.splits.num_labels),
        "architecture_family": session.module_map.family,
    }
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)


def summarise(session: Session, result: TrainResult, test_accuracy: float, wall_s: float) -> dict[str, Any]:
    """summary.json: accuracy, the delivered adapter's ranks and size, and its airtime on its channel."""
    cfg, best = session.config, result.best
    ranks = session.adapters.ranks()  # the restored best checkpoint: what is delivered
    precisions = delivered_precisions(session, result)
    budget = session.budget(best.snr_db)
    params = budget.params(ranks)
    on_air_bits = budget.bits(ranks, precisions)
    train_labels = session.splits.train.labels
    majority = Counter(train_labels.tolist()).most_common(1)[0][0]
    rows = result.rows
    step_s = [r["step_s"] for r in rows]
    decision_s = [r["decision_s"] for r in rows]
    return {
        "allocator": cfg.allocator,
        "regime": cfg.train.regime,
        "model": str(session.model_dir) if cfg.model != "minilm" else "all-MiniLM-L6-v2",
        "dataset": session.splits.name,
        "dataset_sizes": session.splits.sizes(),
        "num_labels": session.splits.num_labels,
        "steps": result.steps_run,
        "seed": cfg.train.seed,
        "test_accuracy": test_accuracy,
        "val_accuracy": best.val_accuracy,
        "majority_baseline_accuracy": float(np.mean(session.splits.test.labels == majority)),
        "best_step": best.step,
        "stopped_early": result.stopped_early,
        "ranks": ranks,
        "final_step_ranks": result.final_ranks,
        "final_step_precisions": result.final_precisions,
        "r_max": cfg.adapter.r_max,
        "transmitted_params": params,
        "transmitted_params_paper_formula": session.paper_params(ranks),
        "adapter_params": params - session.head_params,
        "head_params": session.head_params,
        "precisions": precisions,
        "allowed_bits": list(cfg.channel.bits),
        "head_bits": session.head_bits,
        "bits_per_param": common_bits(ranks, precisions, session.head_bits),
        "transmitted_bits": on_air_bits - 8 * session.overhead_bytes,
        "delivery_overhead_bytes": session.overhead_bytes,
        "on_air_bits": on_air_bits,
        "snr_db": best.snr_db,
        "fading": cfg.channel.fading,
        "bandwidth_hz": session.bandwidth_hz,
        "bandwidth_is_scale_matched": session.bandwidth_is_scale_matched,
        "capacity_bps": budget.capacity_bps,
        "airtime_s": budget.airtime_s(ranks, precisions),
        "t_max_s": cfg.channel.t_max_s,
        "eta": budget.eta(ranks, precisions),
        "budget_ok": budget.feasible(ranks, precisions),
        "steps_over_budget": sum(not r["budget_ok"] for r in rows),
        "steps_where_nothing_fits": result.nothing_fits_steps,
        "reward_lambda": cfg.train.reward_lambda,
        "mean_reward": float(np.mean([r["reward"] for r in rows])),
        "train_data_stats": split_statistics(session.splits.train, session.vocabulary),
        "mean_step_s": float(np.mean(step_s)),
        "mean_decision_s": float(np.mean(decision_s)),
        "decision_overhead_ratio": float(np.mean(decision_s) / np.mean(step_s)),
        "mean_probe_s": float(np.mean([r.get("probe_s", 0.0) for r in rows])),
        "probe_overhead_ratio": float(np.mean([r.get("probe_s", 0.0) for r in rows]) / np.mean(step_s)),
        "mean_apply_s": float(np.mean([r["apply_s"] for r in rows])),
        "mean_update_s": float(np.mean([r["update_s"] for r in rows])),
        "eval_s": result.eval_s,
        "validations_skipped": result.validations_skipped,
        "train_s": result.train_s,
        "resumed_from_step": result.resumed_from_step,
        "wall_s": wall_s,
    }
