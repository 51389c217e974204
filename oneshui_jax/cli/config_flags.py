"""The ``--config=FILE[:ARG]`` flag and its ``--config.FIELD=VALUE`` overrides, parsed into one
``error:`` line on any mistake: the flags of every command that runs (part of) a study
(``python -m oneshui_jax.main``, ``oneshui_jax.select``).

``parse_flags`` is the ``flags_parser`` of ``absl.app.run``; ``CONFIG.value`` is then the
study's ``ml_collections.ConfigDict`` (``configs/``, README "Configs").
"""

from __future__ import annotations

import logging as std_logging
import re
import sys
from collections.abc import Sequence

import ml_collections
from absl import flags, logging
from ml_collections import config_flags

from oneshui_jax import config_lib
from oneshui_jax.cli.common import fail, last_line

DEFAULT_CONFIG = "configs/synthfaces.py"
EXPECTED_FLAGS = "expected --config=FILE[:ARG] and --config.FIELD=VALUE overrides (see --help)"
# The command line the config flag reads its overrides from: filled by parse_flags, so that
# defining the flag (at import) reads no sys.argv and cannot fail.
_ARGV: list[str] = []
CONFIG = config_flags.DEFINE_config_file(
    "config", DEFAULT_CONFIG, "Study configuration (ml_collections file).",
    lock_config=True, sys_argv=_ARGV)
def _one_line(error: Exception) -> str:
    """``flag --NAME=VALUE: what went wrong[; expected TYPE]``, one line, from absl's error."""
    first, *rest = str(error).strip().splitlines() or [type(error).__name__]
    line = f"{first.split(': ', 1)[0]}: {last_line(str(error))}" if rest else first
    name = re.match(r"^flag --([\w.]+)=", line)
    if name and name[1].startswith("config.") and name[1] in flags.FLAGS:  # an override
        line += f"; expected a value of type {flags.FLAGS[name[1]].flag_type()}"
    return line


def _config_file(argv: list[str]) -> str:
    """The config file named by ``--config=FILE[:ARG]`` (or ``--config FILE``) in ``argv``."""
    for i, arg in enumerate(argv):
        if re.match(r"^--?config(=|$)", arg):
            value = arg.split("=", 1)[1] if "=" in arg else "".join(argv[i + 1:i + 2])
            return value.split(":", 1)[0]
    return DEFAULT_CONFIG


# ml_collections loads the config file as this module; a module of that name left from an earlier
# load (the default config, read when the flag is defined) would lend its get_config() to a file
# that defines none.
_CONFIG_MODULE = f"{CONFIG.name}_config"


class _NoneConfigWarning(std_logging.Filter):
    """Drops ml_collections' warning that get_config() returned None, and remembers it
    (``seen``): parse_flags reports it as its one error line."""

    seen = False

    def filter(self, record: std_logging.LogRecord) -> bool:
        if "get_config() returned None" in record.getMessage():
            self.seen = True
            return False
        return True


def _config_file_failure(error: BaseException | None, argv: list[str],
                         returned_none: bool) -> str | None:
    """The error line when the config file itself failed: its own code raised ``error`` (at
    load or in get_config()), it defines no get_config(), or get_config() returned something
    other than a ConfigDict (``returned_none``: ml_collections saw None; ``error`` None: parsing
    went through); None when the failure is elsewhere (a flag, an override, a file that cannot
    be read)."""
    path = _config_file(argv)
    line = config_lib.raised_in_file(error, path) if error is not None else None
    if line:
        return line
    module = sys.modules.get(_CONFIG_MODULE)
    if (isinstance(error, AttributeError) and module is not None
            and not callable(getattr(module, "get_config", None))):
        return (f"--config {path} defines no get_config(); expected a Python file defining "
                f"get_config() that returns an ml_collections.ConfigDict, such as "
                f"{DEFAULT_CONFIG}")
    value = None if returned_none else flags.FLAGS[CONFIG.name].value
    if returned_none or (error is None and not isinstance(value, ml_collections.ConfigDict)):
        what = "None" if value is None else f"a {type(value).__name__}"
        return (f"--config {path}: get_config() returned {what}; expected an "
                f"ml_collections.ConfigDict")
    return None


def parse_flags(argv: list[str]) -> list[str]:
    """absl flag parsing; every error (unknown flag or config field, an override of the wrong
    type, a config file that does not load, rejects its argument, raises, defines no
    get_config() or returns no ConfigDict) is one line, exit 2. Callable more than once in a
    process (the overrides of an earlier call are forgotten)."""
    argv = list(argv)
    if not any(re.match(r"^--?config(=|$)", arg) for arg in argv[1:]):
        argv.insert(1, f"--config={DEFAULT_CONFIG}")  # the default, parsed with the overrides
    _ARGV[:] = argv
    for name in [n for n in flags.FLAGS if n.startswith(f"{CONFIG.name}.")]:
        delattr(flags.FLAGS, name)  # an earlier call's overrides, defined again by this one
    sys.modules.pop(_CONFIG_MODULE, None)
    quiet = _NoneConfigWarning()
    absl_logger = logging.get_absl_logger()
    level = absl_logger.level
    absl_logger.setLevel(min(level or std_logging.WARNING, std_logging.WARNING))  # let it reach
    absl_logger.addFilter(quiet)
    try:
        try:
            rest = flags.FLAGS(argv)
            getattr(CONFIG.value, "dataset", None)  # a config file that failed to load raises
        except Exception as e:
            line = _config_file_failure(e, argv, quiet.seen)
            if line:
                fail(line)
            raise
        line = _config_file_failure(None, argv, quiet.seen)  # returned None or another object
        if line:
            fail(line)
    except (AttributeError, KeyError) as e:
        words = str(e).replace("\\n", " ").replace("\\", "").replace("'", "").split()
        field, hint = (words[0].strip('"'), " ".join(words[1:])) if words else ("?", "")
        fail(f"unknown config field {field!r}. {hint}" if hint else f"unknown config field "
             f"{field!r}; expected a field that --config {_config_file(argv)} defines")
    except (OSError, SyntaxError) as e:  # ml_collections defers an OSError to the first use
        fail(f"--config {_config_file(argv)}: cannot load the config file ({last_line(str(e))});"
             f" expected a Python file defining get_config(), such as {DEFAULT_CONFIG}")
    except flags.UnrecognizedFlagError as e:
        fail(f"{_one_line(e)}; {EXPECTED_FLAGS}")
    except (flags.Error, TypeError, ValueError) as e:
        fail(_one_line(e))
    finally:
        absl_logger.removeFilter(quiet)
        absl_logger.setLevel(level)
    return rest


def load_config(args: Sequence[str]):
    """The config ``python -m oneshui_jax.main ARGS`` runs, for ARGS of ``--config=FILE[:ARG]``
    and ``--config.FIELD=VALUE`` only: parsed as ``main`` parses them (ml_collections' config
    flag, locked), in a flag namespace of its own, so it can be called for many commands in one
    process. Relative paths are read from the current folder. ValueError, one line, naming the
    argument at fault where it can."""
    args = list(args)
    if not any(re.match(r"^--config(=|$)", a) for a in args):
        raise ValueError("expected --config=FILE[:ARG] among the arguments")
    other = [a for a in args if not re.match(r"^--config([.=]|$)", a)]
    if other:
        raise ValueError(f"unexpected arguments {other}; expected --config=FILE[:ARG] and "
                         "--config.FIELD=VALUE overrides")
    namespace = flags.FlagValues()
    argv = ["plan", *args]
    holder = config_flags.DEFINE_config_file("config", None, "the study's config",
                                             flag_values=namespace, lock_config=True,
                                             sys_argv=argv)
    try:
        namespace(argv)
        config = holder.value
        config.get("dataset")  # a config file that failed to load raises here
    except (AttributeError, KeyError) as e:
        text = str(e).replace("\\n", " ").replace("\\", "").replace("'", "")
        field, _, hint = text.strip().partition(" ")
        raise ValueError(f"unknown config field {field.strip(chr(34))!r}; "
                         + (hint.strip() or "expected a field the config file defines")) from None
    except Exception as e:  # the config file's own code raised, or a flag, or the file
        path = next((a.split("=", 1)[1].split(":", 1)[0] for a in args
                     if a.startswith("--config=")), "")
        line = config_lib.raised_in_file(e, path) if path else None
        if line is None and not isinstance(e, flags.Error | OSError | SyntaxError | TypeError
                                           | ValueError):
            raise
        raise ValueError(line or last_line(str(e)) or type(e).__name__) from None
    if config is None:
        raise ValueError("the config file returned no config")
    return config
