"""Writing a file so that readers see the old file or the new one, never half."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

#: The name of the JSON Lines record file the monitor, `replay` and `watch` write into a
#: run folder, and that the readers and the sidecar look for.
RECORD_FILE = "redundancy.jsonl"


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> None:
    """Write `data` to a temporary file in the same folder, fsync it, rename it over `path`.

    The rename replaces a symlink at `path` rather than writing through it.
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json_atomic(path: str | os.PathLike, data: Any, indent: int = 2) -> None:
    """`data` as JSON (NaN refused: clean it to null first), written atomically."""
    write_bytes_atomic(path, json.dumps(data, indent=indent, allow_nan=False).encode("utf-8"))
