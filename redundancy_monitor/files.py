"""Writing a file so that readers see the old file or the new one, never half."""

from __future__ import annotations

import json
import os
import secrets
from pathlib import Path
from typing import Any

#: The name of the JSON Lines record file the monitor, `replay` and `watch` write into a
#: run folder, and that the readers and the sidecar look for.
RECORD_FILE = "redundancy.jsonl"


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> None:
    """Write `data` to a temporary file in the same folder, fsync it, rename it over `path`.

    The rename replaces a symlink at `path` rather than writing through it. The file gets
    the mode of any new file (``0o666`` less the umask, e.g. ``0644``): readable by those
    a report is written for, unlike the private ``0600`` of `tempfile.mkstemp`.
    """
    path = Path(path)
    fd, tmp = _create_temporary(path)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _create_temporary(path: Path) -> tuple[int, Path]:
    """A new file beside `path`, opened for writing: never an existing file or a link."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
    flags |= getattr(os, "O_CLOEXEC", 0)
    for _ in range(100):
        tmp = path.parent / f".{path.name}.{secrets.token_hex(6)}.tmp"
        try:
            return os.open(tmp, flags, 0o666), tmp  # the kernel applies the umask
        except FileExistsError:
            continue
    raise FileExistsError(f"cannot create a temporary file beside {path}")


def write_json_atomic(path: str | os.PathLike, data: Any, indent: int = 2) -> None:
    """`data` as JSON (NaN refused: clean it to null first), written atomically."""
    write_bytes_atomic(path, json.dumps(data, indent=indent, allow_nan=False).encode("utf-8"))
