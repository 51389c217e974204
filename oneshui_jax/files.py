"""Files that are never half-written: write to a temporary name in the same folder, then rename."""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterator
from typing import IO, Any


def _read_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _read_umask()  # read once: os.umask is process-wide and not thread-safe


@contextlib.contextmanager
def atomic_open(path: str, mode: str = "w", **kwargs: Any) -> Iterator[IO]:
    """Opens a temporary file next to ``path``; renames it onto ``path`` when the block succeeds.

    Text modes default to UTF-8. On an error the temporary file is removed and ``path`` is left
    as it was.
    """
    if "b" not in mode:
        kwargs.setdefault("encoding", "utf-8")
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp_", suffix=os.path.splitext(path)[1])
    try:
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; give the usual permissions
        with os.fdopen(fd, mode, **kwargs) as f:
            yield f
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def save_json(obj: Any, path: str, **kwargs: Any) -> None:
    """Writes ``obj`` as JSON to ``path`` atomically."""
    with atomic_open(path) as f:
        json.dump(obj, f, **kwargs)
