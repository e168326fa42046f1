"""Atomic file writes: a reader never sees a half-written result (temporary file, fsync, then rename).

Every writer of a result goes through ``atomic_path``: text, JSON and CSV here, and the files a library writes
itself (``torch.save``, safetensors' ``save_file``, matplotlib's ``savefig``) by handing it the temporary path.
"""

from __future__ import annotations

import csv
import io
import json
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """A temporary path next to ``path`` to write to; on leaving the block it is fsynced and renamed onto ``path``.

    The temporary file is in the same folder (a rename across file systems is not atomic) and named
    ``.{name}.XXXXXXXX.tmp``: hidden, unique per writer, and matched by a run folder's ``.*.tmp`` clean-up. An
    exception inside the block removes it and leaves ``path`` as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        # The writer (torch.save, save_file, savefig) has closed its own handle; fsync needs one, so reopen.
        with tmp.open("rb") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_text_atomic(path: str | Path, text: str) -> None:
    """Write ``text`` to ``path`` via a temporary file in the same folder and an atomic rename."""
    with atomic_path(path) as tmp, tmp.open("w", encoding="utf-8", newline="") as handle:
        handle.write(text)


def write_json_atomic(path: str | Path, data: Any) -> None:
    """JSON with sorted-free, indented layout, written atomically."""
    write_text_atomic(path, json.dumps(data, indent=2) + "\n")


def write_csv_atomic(path: str | Path, rows: list[dict[str, Any]], columns: list[str]) -> None:
    """A CSV with a header row, written atomically; missing values are left empty."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, extrasaction="raise", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    write_text_atomic(path, buffer.getvalue())
