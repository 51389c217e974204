"""Advisory locks on run directories and request outputs, so that concurrent runs lose nothing.

``hold(path)`` locks the folder ``path`` (which need not exist yet) for one process: a study
stage's run directory while the stage decides reuse / resume / fresh and runs, a request's
``--out`` while it is checked and written. Two files sit next to the folder, in its parent::

    .<name>.lock      the lock itself (``filelock.FileLock``: an OS file lock, released by the
                      kernel when the holder exits, however it exits)
    .<name>.holder    JSON ``{"pid", "host", "since", "what"}`` of the holder, written once the
                      lock is taken and removed when it is released

A second process either waits until the holder is done (``wait=True``) or stops at once with
:class:`LockBusy` naming the holder's pid and host. A holder that died without releasing (e.g.
SIGKILL) leaves only its ``.holder`` file behind: the kernel has freed the lock, the next
process takes it and warns that it takes over the stale lock of that pid (on the same host, the
pid is checked to be gone).

A request's ``--out`` must leave nothing next to it when the request fails, so its lock files
go to ``host_lock_dir()`` instead (named by the sha256 of the output's real path): they keep
two requests of one host apart; across hosts, ``--out`` is still never replaced without
``--overwrite`` (the output is renamed into place, which fails onto an existing output).
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import json
import os
import socket
import tempfile
from collections.abc import Callable, Iterator
from typing import Any

import filelock
from absl import logging

from oneshui_jax import files
from oneshui_jax.errors import ConfigError

WAIT_HINT = ("run again once it has finished (its result is then reused), or with "
             "--config.wait_for_lock=True to wait for it")


class LockBusy(ConfigError):
    """Another process holds the lock and the caller chose not to wait for it."""


def host_lock_dir() -> str:
    """A folder of this host for locks that must leave nothing next to what they lock."""
    return os.path.join(tempfile.gettempdir(), f"oneshui_jax-locks-{os.getuid()}")


def lock_files(path: str, lock_dir: str | None = None) -> tuple[str, str]:
    """``(lock file, holder file)`` of the folder ``path``: hidden siblings in its parent, or,
    with ``lock_dir``, files there named by the sha256 of ``path``'s real path."""
    path = os.path.abspath(path.rstrip(os.sep) or os.sep)
    if lock_dir is not None:
        key = hashlib.sha256(os.path.realpath(path).encode()).hexdigest()[:32]
        return os.path.join(lock_dir, f"{key}.lock"), os.path.join(lock_dir, f"{key}.holder")
    parent, name = os.path.split(path)
    return (os.path.join(parent, f".{name}.lock"), os.path.join(parent, f".{name}.holder"))


def read_holder(path: str, lock_dir: str | None = None) -> dict[str, Any] | None:
    """The recorded holder of the lock on ``path`` (pid, host, since, what), or None."""
    try:
        with open(lock_files(path, lock_dir)[1], encoding="utf-8") as f:
            holder = json.load(f)
    except (OSError, ValueError):
        return None
    return holder if isinstance(holder, dict) else None


def pid_alive(pid: int) -> bool:
    """True if a process ``pid`` exists on this host (zombies count as gone)."""
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    try:  # a killed child not yet reaped by its parent is a zombie: gone for our purposes
        with open(f"/proc/{pid}/stat", encoding="utf-8") as f:
            return f.read().rsplit(")", 1)[-1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def describe(holder: dict[str, Any] | None) -> str:
    """``pid P on host H (since T)``, or ``another process`` when nothing was recorded."""
    if not holder:
        return "another process"
    since = f", since {holder['since']}" if holder.get("since") else ""
    return f"pid {holder.get('pid')} on host {holder.get('host')}{since}"


def _is_stale(holder: dict[str, Any]) -> bool:
    return holder.get("host") == socket.gethostname() and not pid_alive(holder.get("pid"))


@contextlib.contextmanager
def hold(path: str, *, wait: bool = True, what: str = "", hint: str = WAIT_HINT,
         warn: Callable[[str], None] = logging.warning,
         lock_dir: str | None = None) -> Iterator[None]:
    """Holds the lock on the folder ``path`` for the block (module docstring).

    ``what`` says what the holder does (e.g. ``stage pretrain``), for the other process's
    messages. ``wait=False``: :class:`LockBusy` at once when another process holds it, its one
    line ending with ``hint``. ``warn`` gets the line saying that it waits, or that it takes
    over a stale lock. ``lock_dir``: where the lock files go (``lock_files``).
    """
    lock_file, holder_file = lock_files(path, lock_dir)
    os.makedirs(os.path.dirname(lock_file), exist_ok=True)
    lock = filelock.FileLock(lock_file)
    try:
        lock.acquire(timeout=0)
    except filelock.Timeout:
        holder = read_holder(path, lock_dir)
        doing = f" ({holder['what']})" if holder and holder.get("what") else ""
        if not wait:
            raise LockBusy(
                f"{path} is being run by {describe(holder)}{doing}; {hint} (lock file "
                f"{lock_file})") from None
        warn(f"{path} is being run by {describe(holder)}{doing}; waiting for it to finish")
        lock.acquire()
    try:
        previous = read_holder(path, lock_dir)
        if previous and previous.get("pid") != os.getpid():
            state = "no longer running" if _is_stale(previous) else "it did not release it"
            warn(f"taking over the stale lock on {path} left by {describe(previous)} ({state})")
        with files.atomic_open(holder_file) as f:
            json.dump({"pid": os.getpid(), "host": socket.gethostname(),
                       "since": datetime.datetime.now(datetime.UTC).isoformat(
                           timespec="seconds"), "what": what}, f)
        yield
    finally:
        with contextlib.suppress(OSError):
            os.remove(holder_file)
        lock.release()
