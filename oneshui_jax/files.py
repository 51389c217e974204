"""Files that are never half-written (write to a temporary name in the same folder, then
rename), and ``to_json``: any record of the package (configs, splits, metrics, results) as plain
JSON values.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import sys
import tempfile
from collections.abc import Iterator, Mapping
from typing import IO, Any

import numpy as np


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
    with naming(path):
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


class FileSet:
    """The files of one :func:`atomic_set`: ``open(name, mode)`` writes one of them to a
    temporary name in the folder."""

    def __init__(self, folder: str):
        self.folder = folder
        self.pending: list[tuple[str, str]] = []  # (temporary path, final path)

    @contextlib.contextmanager
    def open(self, name: str, mode: str = "w", **kwargs: Any) -> Iterator[IO]:
        if "b" not in mode:
            kwargs.setdefault("encoding", "utf-8")
        path = os.path.join(self.folder, name)
        with naming(path):
            fd, tmp = tempfile.mkstemp(dir=self.folder, prefix=".tmp_",
                                       suffix=os.path.splitext(name)[1])
            self.pending.append((tmp, path))
            os.chmod(tmp, 0o666 & ~_UMASK)
            with os.fdopen(fd, mode, **kwargs) as f:
                yield f


@contextlib.contextmanager
def atomic_set(folder: str) -> Iterator[FileSet]:
    """Writes several files of ``folder`` as one: each ``files.open(name)`` of the block writes
    to a temporary name, and only when the whole block succeeds are they renamed onto their
    names (a rename takes no space). A full disk or any error on the way removes the temporary
    files and leaves every file of the folder as it was: never half a set (results.json of one
    run beside results.md of another)."""
    with naming(folder):
        os.makedirs(folder, exist_ok=True)
    fileset = FileSet(folder)
    try:
        yield fileset
        for tmp, path in fileset.pending:
            os.replace(tmp, path)
    except BaseException:
        for tmp, _ in fileset.pending:
            if os.path.exists(tmp):
                os.remove(tmp)
        raise


@contextlib.contextmanager
def naming(path: str) -> Iterator[None]:
    """Gives ``path`` to an OSError raised inside that names no file (a write that fails with
    "No space left on device" names none), so the one-line error can say where."""
    try:
        yield
    except OSError as e:
        if e.filename is None and e.errno:
            raise OSError(e.errno, e.strerror, path) from e
        raise


def cannot_create(path: str) -> str | None:
    """Why ``path`` (a file or folder to create) cannot be created, or None when it can.

    Checks the nearest existing folder above it: it must be a folder, and writable. For the
    command lines' up-front checks, so that a bad output path is refused before any work.
    """
    folder = os.path.dirname(os.path.abspath(path))
    while not os.path.lexists(folder):
        folder = os.path.dirname(folder)
    if not os.path.isdir(folder):
        return f"{folder} is a file, not a folder"
    if not os.access(folder, os.W_OK | os.X_OK):
        return f"the folder {folder} is not writable"
    return None


def cannot_write_in(folder: str) -> str | None:
    """Why files cannot be written in ``folder`` (existing, or to be created), or None when they
    can: ``cannot_create`` of a file inside it (the folder itself, if it exists, must then be a
    writable folder)."""
    return cannot_create(os.path.join(folder, "_"))


# What the OS says when a write cannot go on, as libraries that wrap the error (orbax,
# tensorstore) embed it in their messages.
OS_REASONS = ("No space left on device", "Disk quota exceeded", "Read-only file system",
              "Permission denied", "File too large", "Input/output error")


def os_reason(error: BaseException) -> str | None:
    """The OS's reason for ``error`` or one of its causes ("No space left on device", ...),
    or None when none of them is an OS failure to read or write."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OSError) and error.strerror:
            return error.strerror
        text = str(error)
        for reason in OS_REASONS:
            if reason in text:
                return reason
        error = error.__cause__ or error.__context__
    return None


def os_error_line(error: OSError, fallback_path: str = "") -> str:
    """``"<the OS's reason>: <path>"`` for an OSError (e.g. "No space left on device:
    /ckpt/run/params"): the reason first, as the shell's tools say it."""
    reason = error.strerror or str(error)
    path = error.filename or fallback_path
    return f"{reason}: {path}" if path else reason


def save_json(obj: Any, path: str, **kwargs: Any) -> None:
    """Writes ``obj`` as JSON to ``path`` atomically."""
    with atomic_open(path) as f:
        json.dump(obj, f, **kwargs)


def to_json(obj: Any) -> Any:
    """``obj`` as plain JSON values (dict, list, str, int, float, bool, None).

    Dict keys become strings, tuples and lists lists, numpy scalars and arrays and jax arrays
    Python values and (nested) lists, objects with ``to_dict()`` (``ml_collections.ConfigDict``)
    and dataclass instances dicts (as ``dataclasses.asdict``); float NaN and infinities stay
    floats. Anything else raises TypeError naming its type and where it was found (a key path
    such as ``config.model[0]``); a container that contains itself raises ValueError.
    """
    return _to_json(obj, "", set())


def _to_json(obj: Any, path: str, open_containers: set[int]) -> Any:
    if obj is None or type(obj) in (str, int, float, bool):
        return obj
    if isinstance(obj, np.generic):  # before float: np.float64 is a float
        return _to_json(obj.item(), path, open_containers)
    for plain in (str, int, float):  # subclasses (enums, ...) as the plain value
        if isinstance(obj, plain):
            return plain(obj)
    if isinstance(obj, np.ndarray) or _is_jax_array(obj):
        return _to_json(np.asarray(obj).tolist(), path, open_containers)
    if isinstance(obj, Mapping | list | tuple):
        if id(obj) in open_containers:
            raise ValueError(f"circular reference at {path or '(top level)'}")
        open_containers.add(id(obj))
        try:
            if isinstance(obj, Mapping):
                return {str(k): _to_json(v, f"{path}.{k}" if path else str(k), open_containers)
                        for k, v in obj.items()}
            return [_to_json(v, f"{path}[{i}]", open_containers) for i, v in enumerate(obj)]
        finally:
            open_containers.discard(id(obj))
    if hasattr(obj, "to_dict"):  # ml_collections.ConfigDict
        return _to_json(obj.to_dict(), path, open_containers)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        fields = {f.name: getattr(obj, f.name) for f in dataclasses.fields(obj)}
        return _to_json(fields, path, open_containers)
    raise TypeError(f"{type(obj).__name__} at {path or '(top level)'} is not JSON-serialisable")


def _is_jax_array(obj: Any) -> bool:
    """Whether ``obj`` is a jax array, without importing jax (none exists unless it is loaded)."""
    jax = sys.modules.get("jax")
    return jax is not None and isinstance(obj, jax.Array)
