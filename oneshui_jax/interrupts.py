"""Interrupts that are never lost: Ctrl-C (SIGINT) and SIGTERM during a study, a selection or a
request.

Python turns SIGINT into a ``KeyboardInterrupt`` raised wherever the main thread happens to be.
When that is inside a garbage-collection callback or a ``__del__`` (JAX and grain run many), the
exception is printed as "ignored" and the program runs on: a Ctrl-C in the first second of a
stage was once swallowed and the stage trained to the end and exited 0. SIGTERM (a scheduler's
stop, ``kill``) ends the process at once by default, leaving temporary folders behind.

``handle()`` installs one handler for both signals. It records the signal and raises
:class:`Interrupted` (a ``KeyboardInterrupt``), so an interrupt takes effect at once wherever it
can; and the loops of the package (every training step and epoch, every simulated request of
meta-training, every method epoch, every selection candidate, every reference model) call
:func:`check`, which raises it again if the first one was swallowed. The command lines catch it,
print one line (where it stopped, what is kept, the command that resumes) and exit with
``128 + signal``: 130 for Ctrl-C, 143 for SIGTERM.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import signal
import sys
import threading
from collections.abc import Iterator
from typing import NoReturn

NAMES = {signal.SIGINT: "Ctrl-C", signal.SIGTERM: "SIGTERM"}
INTERRUPTED_STATUS = 128 + signal.SIGINT  # 130: as a shell reports a program ended by Ctrl-C
TERMINATED_STATUS = 128 + signal.SIGTERM  # 143

_DEFAULTS = {signal.SIGINT: signal.default_int_handler, signal.SIGTERM: signal.SIG_DFL}

_pending: int | None = None  # the first signal received while handled, until cleared


class Interrupted(KeyboardInterrupt):
    """Raised for a handled SIGINT or SIGTERM; ``status`` is the exit status a shell expects."""

    def __init__(self, signum: int):
        super().__init__(NAMES.get(signum, f"signal {signum}"))
        self.signum = signum

    @property
    def name(self) -> str:
        """``Ctrl-C`` or ``SIGTERM``."""
        return NAMES.get(self.signum, f"signal {self.signum}")

    @property
    def status(self) -> int:
        """``128 + signal``: 130 for Ctrl-C, 143 for SIGTERM."""
        return 128 + int(self.signum)


def _on_signal(signum: int, frame) -> None:
    global _pending
    if _pending is None:
        _pending = signum
    raise Interrupted(signum)


def pending() -> int | None:
    """The signal received since the handler was installed (or cleared), None if none."""
    return _pending


def check() -> None:
    """Raises :class:`Interrupted` if a handled signal arrived: the loops' guard against an
    interrupt whose first exception was swallowed (see the module docstring). Cheap: one global
    read."""
    if _pending is not None:
        raise Interrupted(_pending)


def clear() -> None:
    """Forgets a received signal (after it has been dealt with, e.g. by a test)."""
    global _pending
    _pending = None


def as_interrupted(error: BaseException) -> Interrupted:
    """``error`` as an :class:`Interrupted`: a plain ``KeyboardInterrupt`` (raised before the
    handler was installed, or by code that raises its own) counts as Ctrl-C."""
    if isinstance(error, Interrupted):
        return error
    return Interrupted(_pending or signal.SIGINT)


@contextlib.contextmanager
def handle() -> Iterator[None]:
    """Installs the handler for SIGINT and SIGTERM for the block (main thread only; elsewhere a
    no-op) and restores the previous handlers after it. A signal left pending is cleared on the
    way out. A signal this process was started with ignored stays ignored (``nohup``, and a
    shell script's background job, whose SIGINT the shell ignores so that a Ctrl-C in the
    terminal does not reach it), as Python itself does."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.getsignal(s) for s in NAMES}
    previous_hook = sys.unraisablehook
    clear()
    for s in NAMES:
        if previous[s] is not signal.SIG_IGN:
            signal.signal(s, _on_signal)
    sys.unraisablehook = _quiet_about_interrupts(previous_hook)
    try:
        yield
    finally:
        for s, handler in previous.items():  # quiet_start's handler would say "while starting"
            signal.signal(s, _DEFAULTS[s] if handler is _leave_while_starting else handler)
        sys.unraisablehook = previous_hook
        clear()


def _quiet_about_interrupts(previous_hook):
    """An ``sys.unraisablehook`` that says nothing about a swallowed :class:`Interrupted`: Python
    would print it as "Exception ignored in ... Traceback" (from a JAX garbage-collection
    callback, say) before the command's one line. The signal is recorded and :func:`check`
    raises it again, so nothing is lost. Any other unraisable exception goes to
    ``previous_hook``."""

    def hook(unraisable) -> None:
        if isinstance(unraisable.exc_value, Interrupted):
            return
        previous_hook(unraisable)

    return hook


def quiet_start() -> None:
    """A command line's first statement, before its heavy imports (JAX alone takes seconds): a
    Ctrl-C or SIGTERM in that time ends the process with one line (``interrupted (Ctrl-C) while
    starting; nothing was done``) and 130 / 143, instead of a ``KeyboardInterrupt`` traceback
    from inside an import. :func:`handle` takes over once the command runs. Signals ignored at
    start stay ignored; off the main thread it does nothing."""
    if threading.current_thread() is not threading.main_thread():
        return
    for s in NAMES:
        if signal.getsignal(s) is not signal.SIG_IGN:
            signal.signal(s, _leave_while_starting)


def _leave_while_starting(signum: int, frame) -> NoReturn:
    print(f"interrupted ({NAMES[signum]}) while starting; nothing was done", file=sys.stderr)
    sys.stderr.flush()
    os._exit(128 + signum)


def same_command(module: str, argv=None) -> str:
    """The command line ``python -m <module> <argv>`` (default: this process's arguments) as a
    shell would take it back: what the interrupt line offers to resume or retry."""
    return shlex.join(["python", "-m", module, *(sys.argv[1:] if argv is None else argv)])


def leave(error: BaseException, message: str) -> NoReturn:
    """Ends a command line after an interrupt: ``interrupted (<Ctrl-C|SIGTERM>) <message>`` as
    the last line on stderr, then exit status ``128 + signal`` without the interpreter's teardown
    (with the interrupted step's runtime threads still about, the teardown can crash after the
    line: a segfault was seen once). Context managers (locks, checkpointers, temporary folders)
    have unwound by the time the command line catches the interrupt."""
    interrupted = as_interrupted(error)
    print(f"interrupted ({interrupted.name}) {message}", file=sys.stderr)
    with contextlib.suppress(Exception):
        from absl import logging

        logging.flush()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(interrupted.status)
