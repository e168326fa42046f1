"""The one atomic-write helper: the old file survives a failed write, nothing temporary is left, the data is fsynced."""

import os

import matplotlib.pyplot as plt
import pytest
import torch

from airlora import io as atomic
from airlora.checkpoint import save_checkpoint
from airlora.sweep.figures import save as save_figure


class Unpicklable:
    def __reduce__(self):
        raise RuntimeError("disk full")  # torch.save fails half-way through its archive


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "policy.pt"
    torch.save({"old": 1}, path)
    with pytest.raises(RuntimeError, match="disk full"), atomic.atomic_path(path) as tmp:
        torch.save({"new": Unpicklable()}, tmp)
    assert torch.load(path) == {"old": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["policy.pt"]


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="names the synced file from /proc")
def test_every_writer_fsyncs_before_the_rename(tmp_path, monkeypatch):
    synced, real_fsync = [], os.fsync

    def recording_fsync(fd):
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    monkeypatch.setattr(atomic.os, "fsync", recording_fsync)
    atomic.write_json_atomic(tmp_path / "a.json", {"x": 1})
    save_checkpoint(tmp_path, 3, {"step": torch.tensor(3)})
    save_figure(plt.figure(), tmp_path / "fig.png")
    # each write synced its own temporary file (.{name}.XXXXXXXX.tmp), which then became the result
    synced_for = sorted(os.path.basename(p)[1:].rsplit(".", 2)[0] for p in synced)
    written = sorted(p.name for p in tmp_path.iterdir())
    assert synced_for == written == ["a.json", "checkpoint-3.pt", "checkpoint.json", "fig.png"]
    assert (tmp_path / "fig.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
