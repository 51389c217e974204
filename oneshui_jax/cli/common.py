"""What every command line shares: one ``error: ...`` line and exit status 2 on bad input, an
immediate exit that skips the interpreter's teardown, the log filter that keeps the package's
own INFO lines, and the flags of one command (its own ``FlagValues``, ``--help``, a flag mistake
as one line naming the flag and what it expects)."""

from __future__ import annotations

import logging as std_logging
import os
import re
import sys
from collections.abc import Sequence
from typing import NoReturn

from absl import flags, logging

USAGE_STATUS = 2  # bad input: a flag, a file, a setting


def fail(message: str) -> NoReturn:
    """Ends the program as every command line of the package does on bad input: one
    ``error: ...`` line on stderr, exit status 2."""
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(USAGE_STATUS)


def last_line(text: str) -> str:
    """The last line of ``text`` without an exception-name prefix (absl and ml_collections embed
    tracebacks and attempt lists in some messages)."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return re.sub(r"^\w*(Error|Exception): ", "", lines[-1]) if lines else ""


def exit_now(status: int) -> NoReturn:
    """Leaves with ``status`` at once (logs and streams flushed), without the interpreter's
    teardown, which would wait for, or print the tracebacks of, background threads (orbax's
    writers) failing on the same disk."""
    logging.flush()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


class OwnInfoOnly(std_logging.Filter):
    """Keeps this package's INFO lines and every library's warnings, minus known noise."""

    NOISE = ("OpenCV is not installed", "Using custom data configuration")

    def filter(self, record: std_logging.LogRecord) -> bool:
        if f"{os.sep}oneshui_jax{os.sep}" in record.pathname:
            return True
        return record.levelno >= std_logging.WARNING and not any(
            n in record.getMessage() for n in self.NOISE)


def quiet_logs() -> None:
    """Installs :class:`OwnInfoOnly` on absl's handler (once)."""
    handler = logging.get_absl_handler()
    if not any(isinstance(f, OwnInfoOnly) for f in handler.filters):
        handler.addFilter(OwnInfoOnly())


# --------------------------------------------------------------------------------------------
# The flags of one command (request, inspect, convert, splits, report): each command defines them
# on its own ``FlagValues`` from :func:`command_flags` (several commands are imported into one
# process; the global ``flags.FLAGS`` is the study's) and reads ``argv`` with :func:`parse`:
# ``--help`` prints the command's docstring and its flags (absl's help text) and exits 0; any
# mistake is one ``error: ...`` line naming the flag and what was expected, exit status 2.
# A command that handles interrupts calls ``interrupts.quiet_start()`` as its first statement
# when run as ``__main__``, before its heavy imports (``cli/request.py``).


class _HelpRequested(Exception):
    """Raised by ``--help`` while parsing: before the required flags are checked."""


class _HelpFlag(flags.BooleanFlag):
    """``--help`` (``-h``): ends the parsing at once."""

    def __init__(self):
        super().__init__("help", False, "show this help and exit", short_name="h")

    def parse(self, argument) -> None:
        super().parse(argument)
        if self.value:
            raise _HelpRequested


def command_flags() -> flags.FlagValues:
    """A new ``FlagValues`` holding ``--help``, for the flags of the calling command module."""
    module = sys._getframe(1).f_globals.get("__name__", "")
    flag_values = flags.FlagValues()
    flags.DEFINE_flag(_HelpFlag(), flag_values=flag_values,  # listed with the command's flags
                      module_name=sys.argv[0] if module == "__main__" else module)
    return flag_values


def help_text(flag_values: flags.FlagValues, doc: str | None) -> str:
    """The command's docstring, then absl's list of its flags."""
    return f"{(doc or '').strip()}\n{flag_values.get_help()}"


def _expected(flag: flags.Flag, *, syntax: bool) -> str:
    """What ``flag`` takes: its choices, else (``syntax``) the kind of value, else its help."""
    choices = getattr(flag.parser, "enum_values", None)
    if choices:
        return "one of " + ", ".join(choices)
    if flag.boolean:
        return f"--{flag.name} or --no{flag.name} (true or false)"
    kind = getattr(flag.parser, "syntactic_help", "")
    if syntax and kind:
        return kind
    return " ".join((flag.help or kind or flag.flag_type()).split())


def flag_error_line(error: Exception, flag_values: flags.FlagValues) -> str:
    """absl's parsing ``error`` as one line naming the flag and what it expects."""
    text = " ".join(str(error).split())
    if isinstance(error, flags.UnrecognizedFlagError):
        names = sorted({flag_values[name].name for name in flag_values})
        guess = re.search(r"Did you mean: (.+?) ?\?$", text)
        hint = (" (did you mean " + " or ".join(f"--{n}" for n in guess[1].split(", ")) + "?)"
                if guess else "")
        return (f"unknown flag --{error.flagname}{hint}; expected "
                + ", ".join(f"--{n}" for n in names) + " (see --help)")
    missing = re.match(r"^Missing value for flag (-+)([\w-]+)", text)
    if missing and missing[2] in flag_values:
        flag = flag_values[missing[2]]
        return f"flag --{flag.name} has no value; expected {_expected(flag, syntax=False)}"
    named = re.match(r"^flag --([\w-]+)=(.*?): (.*)$", text)
    if named and named[1] in flag_values:
        flag = flag_values[named[1]]
        if "must have a value other than None" in named[3]:
            return f"flag --{flag.name} is required; expected {_expected(flag, syntax=False)}"
        if getattr(flag.parser, "enum_values", None):  # absl's reason lists them already
            return f"flag --{flag.name}={named[2]}: expected {_expected(flag, syntax=True)}"
        reason = ("not true or false" if "Non-boolean argument" in named[3]
                  else named[3].rstrip("."))
        return f"flag --{flag.name}={named[2]}: {reason}; expected {_expected(flag, syntax=True)}"
    return re.sub(r"^ERROR:+ ", "", text)  # --flagfile, --nobool=value, ...


def parse(flag_values: flags.FlagValues, argv: Sequence[str] | None, doc: str | None
          ) -> list[str]:
    """Reads ``argv`` (the arguments after the program; default ``sys.argv[1:]``) into
    ``flag_values`` and returns the positional arguments. Callable again in the same process:
    the values of an earlier call are forgotten first. ``--help``: prints :func:`help_text` and
    raises ``SystemExit(0)``; a mistake: :func:`fail`."""
    args = list(sys.argv[1:] if argv is None else argv)
    for name in flag_values:  # an earlier call's values (FlagValues.unparse_flags logs a line)
        flag_values[name].unparse()
    try:
        return flag_values([sys.argv[0] or "oneshui_jax", *args])[1:]
    except _HelpRequested:
        print(help_text(flag_values, doc))
        raise SystemExit(0) from None
    except (flags.Error, ValueError) as e:
        fail(flag_error_line(e, flag_values))


def no_arguments(rest: Sequence[str]) -> None:
    """Refuses positional arguments, for a command that takes flags only."""
    if rest:
        fail(f"unexpected arguments {list(rest)}; expected flags only (see --help)")
