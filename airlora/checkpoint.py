"""Resumable runs: the whole state of a run at a step, written atomically and read back without pickle.

A checkpoint is ``checkpoint-{step}.pt`` (``torch.save`` of tensors and plain Python values only, so
``torch.load(weights_only=True)`` reads it) plus ``checkpoint.json``, which names the file and its SHA-256.
The pointer is replaced only after the new file is complete, so a kill at any moment leaves one intact,
verifiable checkpoint; the one before is deleted after the pointer moves.
"""

from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from airlora.errors import AirloraError
from airlora.io import atomic_path, write_json_atomic

POINTER = "checkpoint.json"


def rng_state() -> dict[str, Any]:
    """Global RNG states (Python, NumPy, torch CPU) as weights_only-loadable values."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    version, state, gauss_next = random.getstate()
    return {
        "python": [version, list(state), gauss_next],
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss],
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def save_checkpoint(out: Path, step: int, payload: dict[str, Any]) -> Path:
    """Write the state after ``step`` steps; the previous checkpoint goes once the pointer names this one."""
    name = f"checkpoint-{step}.pt"
    with atomic_path(out / name) as tmp:
        torch.save(payload, tmp)
    old = read_pointer(out)
    write_json_atomic(out / POINTER, {"file": name, "step": step, "sha256": _sha256(out / name)})
    if old is not None and old["file"] != name:
        (out / old["file"]).unlink(missing_ok=True)
    return out / name


def read_pointer(out: Path) -> dict[str, Any] | None:
    path = out / POINTER
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError:
        raise AirloraError(f"{path} is not valid JSON; the checkpoint cannot be trusted") from None


def load_checkpoint(out: Path) -> dict[str, Any] | None:
    """The latest verified checkpoint of the run in ``out``, or None when it has none."""
    pointer = read_pointer(out)
    if pointer is None:
        return None
    path = out / pointer["file"]
    if not path.is_file():
        raise AirloraError(f"{out / POINTER} names {pointer['file']}, which is missing")
    if _sha256(path) != pointer["sha256"]:
        raise AirloraError(f"{path}: checksum mismatch (truncated or changed); cannot resume from it")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # a foreign file that passed the checksum of its own pointer
        raise AirloraError(f"{path} could not be read as an airlora checkpoint: {err}") from None


def remove_checkpoints(out: Path) -> None:
    """Delete the checkpoint files of a finished run."""
    pointer = read_pointer(out)
    (out / POINTER).unlink(missing_ok=True)
    if pointer is not None:
        (out / pointer["file"]).unlink(missing_ok=True)
    for stale in out.glob("checkpoint-*.pt"):
        stale.unlink()
