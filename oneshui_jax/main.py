r"""Command line of the study: ``python -m oneshui_jax.main --config=configs/<dataset>.py[:arg]``.

    python -m oneshui_jax.main --config=configs/synthfaces.py
    python -m oneshui_jax.main --config=configs/synthfaces.py:N=50 --config.seed=1 \
        --config.train.epochs=5 --config.stages='("pretrain",)'

``--config.x=y`` overrides any config field (tuples, not lists, for sequences). ``--distributed``
joins a multi-host run (``oneshui_jax/sharding.py``; ``launch/slurm.sh``,
``launch/local_multiprocess.sh``). The stages in
``config.stages`` run in order (see ``oneshui_jax.study``); the results table is printed and
written with plots to ``config.workdir``. Any bad input (flag, config file, override, data,
checkpoint) prints one ``error: ...`` line on stderr and exits with status 2, as the other
command lines do. Ctrl-C or SIGTERM, at any moment, prints one line (the stage it stopped in,
that finished stages and the last save are kept, the command that resumes: the same one) and
exits with status 130 (Ctrl-C) or 143 (SIGTERM): ``oneshui_jax.interrupts``.
"""

from __future__ import annotations

from oneshui_jax import interrupts

if __name__ == "__main__":  # as a command, not imported: before the imports below, so that
    interrupts.quiet_start()  # an interrupt while they load is one line too

import linecache
import logging as std_logging
import os
import re
import sys
import traceback
from typing import NoReturn

import jax
import ml_collections
from absl import app, flags, logging
from ml_collections import config_flags

from oneshui_jax import config_lib, files, report, sharding, study
from oneshui_jax.errors import CheckpointError, ConfigError, DataError

DEFAULT_CONFIG = "configs/synthfaces.py"
INTERRUPTED_STATUS = 130  # 128 + SIGINT, as a shell reports a program ended by Ctrl-C
TERMINATED_STATUS = 143  # 128 + SIGTERM
EXPECTED_FLAGS = "expected --config=FILE[:ARG] and --config.FIELD=VALUE overrides (see --help)"
# The command line the config flag reads its overrides from: filled by parse_flags, so that
# defining the flag (at import) reads no sys.argv and cannot fail.
_ARGV: list[str] = []
_CONFIG = config_flags.DEFINE_config_file(
    "config", DEFAULT_CONFIG, "Study configuration (ml_collections file).",
    lock_config=True, sys_argv=_ARGV)
_DISTRIBUTED = flags.DEFINE_bool(
    "distributed", False, "Join a multi-host run (jax.distributed): the coordinator, process "
    "count and id come from the three flags below, or from SLURM's variables under srun.")
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None, "HOST:PORT of process 0 (with --distributed).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Processes of the run.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index, 0 first.")
_HEARTBEAT = flags.DEFINE_integer(
    "heartbeat_timeout_s", sharding.HEARTBEAT_TIMEOUT_S, "With --distributed: seconds without "
    "a sign of life from a process after which the others stop (JAX's default is 100).",
    lower_bound=1)


def fail(message: str) -> NoReturn:
    """Ends the program as every command line of the package does on bad input: one
    ``error: ...`` line on stderr, exit status 2."""
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(2)


def _last_line(text: str) -> str:
    """The last line of ``text`` without an exception-name prefix (absl and ml_collections embed
    tracebacks and attempt lists in some messages)."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return re.sub(r"^\w*(Error|Exception): ", "", lines[-1]) if lines else ""


def _one_line(error: Exception) -> str:
    """``flag --NAME=VALUE: what went wrong[; expected TYPE]``, one line, from absl's error."""
    first, *rest = str(error).strip().splitlines() or [type(error).__name__]
    line = f"{first.split(': ', 1)[0]}: {_last_line(str(error))}" if rest else first
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
_CONFIG_MODULE = f"{_CONFIG.name}_config"


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
    value = None if returned_none else flags.FLAGS[_CONFIG.name].value
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
    for name in [n for n in flags.FLAGS if n.startswith(f"{_CONFIG.name}.")]:
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
            getattr(_CONFIG.value, "dataset", None)  # a config file that failed to load raises
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
        fail(f"--config {_config_file(argv)}: cannot load the config file ({_last_line(str(e))});"
             f" expected a Python file defining get_config(), such as {DEFAULT_CONFIG}")
    except flags.UnrecognizedFlagError as e:
        fail(f"{_one_line(e)}; {EXPECTED_FLAGS}")
    except (flags.Error, TypeError, ValueError) as e:
        fail(_one_line(e))
    finally:
        absl_logger.removeFilter(quiet)
        absl_logger.setLevel(level)
    return rest


def resume_command() -> str:
    """The command line that started this process, as a shell would take it back."""
    return interrupts.same_command("oneshui_jax.main")


# Where ``study.run`` was, by the call its frame was making (a piece of its line).
_STUDY_CALLS = (("prepare(", "while reading the data and making the split, before the first "
                             "stage"),
                ("initial_params(", "while loading the initial model, before the first stage"),
                ("privacy.run(", "in the privacy attacks, after the stages"),
                ("write_report(", "while writing the report, after the stages"))


def _interrupted_in(tb) -> str:
    """Where the study was when the traceback ``tb`` was raised: by the call ``study.run`` was
    making (reading the data, loading the initial model, the privacy attacks, the report), else
    the stage (``study.stages`` keeps its name in a local ``stage``; the innermost wins: a
    method's implicit pretrain)."""
    frames = list(traceback.walk_tb(tb))
    run = next(((f, line) for f, line in frames if f.f_code.co_name == "run"
                and f.f_code.co_filename.endswith(os.path.join("study", "__init__.py"))), None)
    if run is None:
        return _STUDY_CALLS[0][1]
    call = linecache.getline(run[0].f_code.co_filename, run[1])
    for piece, where in _STUDY_CALLS:
        if piece in call:
            return where
    stages = [f.f_locals["stage"] for f, _ in frames if isinstance(f.f_locals.get("stage"), str)]
    return f"in stage {stages[-1]}" if stages else "between the stages"


def _lost_process_line(error: BaseException) -> str:
    """What a process of a multi-process run says when a computation failed in XLA: most often
    a collective whose peer is gone (killed, crashed, out of memory)."""
    detail = " ".join(_last_line(str(error)).split())
    detail = re.sub(r"(Error dispatching computation: )+", "", detail)
    if len(detail) > 160:
        detail = detail[:157] + "..."
    return (f"process {jax.process_index()} of {jax.process_count()}: a computation failed, "
            f"most likely because another process of this run stopped (see its log): {detail}")


def _exit_now(status: int) -> NoReturn:
    """Leaves with ``status`` at once (logs and streams flushed), without the interpreter's
    teardown, which would wait for, or print the tracebacks of, background threads (orbax's
    writers) failing on the same disk."""
    logging.flush()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


class _OwnInfoOnly(std_logging.Filter):
    """Keeps this package's INFO lines and every library's warnings, minus known noise."""

    NOISE = ("OpenCV is not installed", "Using custom data configuration")

    def filter(self, record: std_logging.LogRecord) -> bool:
        if f"{os.sep}oneshui_jax{os.sep}" in record.pathname:
            return True
        return record.levelno >= std_logging.WARNING and not any(
            n in record.getMessage() for n in self.NOISE)


def main(argv):
    if len(argv) > 1:
        fail(f"unexpected arguments {argv[1:]}; {EXPECTED_FLAGS}")
    logging.get_absl_handler().addFilter(_OwnInfoOnly())
    config = _CONFIG.value
    with interrupts.handle():
        try:
            if _DISTRIBUTED.value or _COORDINATOR.value:
                sharding.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value,
                                    heartbeat_timeout_s=_HEARTBEAT.value)
                if not sharding.is_primary():  # one process speaks: the primary
                    logging.set_verbosity(logging.WARNING)
            records = study.run(config)
        except (ConfigError, DataError, CheckpointError) as e:
            fail(str(e))
        except OSError as e:  # a full disk, a folder made read-only meanwhile, ...
            print(f"error: {files.os_error_line(e)} ({_interrupted_in(e.__traceback__)}); the "
                  f"finished stages and the last save of an unfinished one are kept under "
                  f"{config.checkpoint_dir}; once it is fixed, run the same command: "
                  f"{resume_command()}", file=sys.stderr)
            _exit_now(2)  # without waiting for background writers that hit the same disk
        except jax.errors.JaxRuntimeError as e:
            if jax.process_count() == 1:
                raise
            print(f"error: {_lost_process_line(e)} ({_interrupted_in(e.__traceback__)}); the "
                  f"finished stages and the last save of an unfinished one are kept under "
                  f"{config.checkpoint_dir}; once every process can run, start them all again "
                  f"with the same commands: {resume_command()}", file=sys.stderr)
            _exit_now(2)  # before JAX's shutdown barrier, which would wait, then abort
        except KeyboardInterrupt as e:  # Ctrl-C or SIGTERM (interrupts.Interrupted)
            interrupts.leave(e, f"{_interrupted_in(e.__traceback__)}; the finished stages and "
                             f"the last save of an unfinished one are kept under "
                             f"{config.checkpoint_dir}; to resume, run the same command: "
                             f"{resume_command()}")
    if not sharding.is_primary():
        return
    print(f"\n{report.subject(records)} ({jax.devices()[0].platform.upper()}):")
    print(report.markdown_table(records, report.metric_name(config.dataset)))
    forget = {r["method"]: r["forget"]["metric"] for r in records}
    if {"pretrain", "retrain"} <= set(forget):
        print(f"forget {report.metric_name(config.dataset)}: pretrain {forget['pretrain']:.2f} "
              f"vs retrain {forget['retrain']:.2f} "
              f"(memorisation gap {forget['pretrain'] - forget['retrain']:+.2f})")
    print(f"results: {os.path.join(config.workdir, 'results.md')}")


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
