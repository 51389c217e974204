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
command lines do. Ctrl-C prints one line (the stage it stopped in, that finished stages and the
last save are kept, the command that resumes: the same one) and exits with status 130.
"""

from __future__ import annotations

import logging as std_logging
import os
import re
import shlex
import sys
import traceback
from typing import NoReturn

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from oneshui_jax import report, sharding, study
from oneshui_jax.errors import CheckpointError, ConfigError, DataError

DEFAULT_CONFIG = "configs/synthfaces.py"
INTERRUPTED_STATUS = 130  # 128 + SIGINT, as a shell reports a program ended by Ctrl-C
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


def parse_flags(argv: list[str]) -> list[str]:
    """absl flag parsing; every error (unknown flag or config field, an override of the wrong
    type, a config file that does not load or rejects its argument) is one line, exit 2."""
    argv = list(argv)
    if not any(re.match(r"^--?config(=|$)", arg) for arg in argv[1:]):
        argv.insert(1, f"--config={DEFAULT_CONFIG}")  # the default, parsed with the overrides
    _ARGV[:] = argv
    try:
        rest = flags.FLAGS(argv)
        getattr(_CONFIG.value, "dataset", None)  # a config file that failed to load raises here
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
    return rest


def resume_command() -> str:
    """The command line that started this process, as a shell would take it back."""
    return shlex.join(["python", "-m", "oneshui_jax.main", *sys.argv[1:]])


def _interrupted_in(tb) -> str:
    """Where the study was when Ctrl-C came: the innermost stage run in the traceback ``tb``
    (``study.stages`` keeps the stage's name in a local ``stage``), else before or after the
    stages."""
    study_dir = f"{os.sep}oneshui_jax{os.sep}study{os.sep}"
    stage, prepared = None, False
    for frame, _ in traceback.walk_tb(tb):
        if study_dir not in frame.f_code.co_filename:
            continue
        if isinstance(frame.f_locals.get("stage"), str):
            stage = frame.f_locals["stage"]
        prepared = prepared or "ctx" in frame.f_locals
    if stage:
        return f"in stage {stage}"
    if prepared:
        return "after the stages (the privacy attacks or the report)"
    return "before the first stage (reading the data and making the split)"


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
    try:
        if _DISTRIBUTED.value or _COORDINATOR.value:
            sharding.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
            if not sharding.is_primary():  # one process speaks: the primary
                logging.set_verbosity(logging.WARNING)
        records = study.run(config)
    except (ConfigError, DataError, CheckpointError) as e:
        fail(str(e))
    except KeyboardInterrupt as e:
        print(f"interrupted (Ctrl-C) {_interrupted_in(e.__traceback__)}; the finished stages and "
              f"the last save of an unfinished one are kept under {config.checkpoint_dir}; to "
              f"resume, run the same command: {resume_command()}", file=sys.stderr)
        # The stage's context managers (lock, checkpointer) have already unwound. Leave without
        # the interpreter's teardown: with the interrupted step's runtime threads still about,
        # it can crash after the line above (a segfault, seen in one run of the test suite).
        logging.flush()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(INTERRUPTED_STATUS)
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
