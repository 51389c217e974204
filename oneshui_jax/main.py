r"""The study: ``python -m oneshui_jax.main --config=configs/<dataset>.py[:arg]``.

    python -m oneshui_jax.main --config=configs/synthfaces.py
    python -m oneshui_jax.main --config=configs/synthfaces.py:N=50 --config.seed=1 \
        --config.train.epochs=5 --config.stages='("pretrain",)'

Flags -> ``study.run`` -> the report's summary. ``--config.x=y`` overrides any config field
(``cli/config_flags.py``; tuples, not lists); ``--distributed`` joins a multi-host run
(``sharding``; ``launch/slurm.sh``). Bad input is one ``error: ...`` line, exit status 2; Ctrl-C or
SIGTERM at any moment is one line (where the study was, what is kept, the command that resumes:
the same one) and exit status 130 or 143 (``interrupts``).
"""

from __future__ import annotations

from oneshui_jax import interrupts

if __name__ == "__main__":  # as a command, not imported: before the imports below, so that
    interrupts.quiet_start()  # an interrupt while they load is one line too

import sys

import jax
from absl import app, flags, logging

from oneshui_jax import files, report, sharding, study
from oneshui_jax.cli.common import exit_now, fail, last_line, quiet_logs
from oneshui_jax.cli.config_flags import CONFIG, EXPECTED_FLAGS, parse_flags
from oneshui_jax.errors import CheckpointError, ConfigError, DataError

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


def lost_process_line(error: BaseException) -> str:
    """What a process of a multi-process run says when a computation failed in XLA: most often
    a collective whose peer is gone (killed, crashed, out of memory)."""
    detail = " ".join(last_line(str(error)).replace("Error dispatching computation: ", "").split())
    detail = detail if len(detail) <= 160 else detail[:157] + "..."
    return (f"process {jax.process_index()} of {jax.process_count()}: a computation failed, "
            f"most likely because another process of this run stopped (see its log): {detail}")


def main(argv):
    if len(argv) > 1:
        fail(f"unexpected arguments {argv[1:]}; {EXPECTED_FLAGS}")
    quiet_logs()
    config, status = CONFIG.value, study.Status()
    kept = (f"the finished stages and the last save of an unfinished one are kept under "
            f"{config.checkpoint_dir}")
    again = interrupts.same_command("oneshui_jax.main")
    with interrupts.handle():
        try:
            if _DISTRIBUTED.value or _COORDINATOR.value:
                sharding.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value,
                                    heartbeat_timeout_s=_HEARTBEAT.value)
                if not sharding.is_primary():  # one process speaks: the primary
                    logging.set_verbosity(logging.WARNING)
            records = study.run(config, status)
        except (ConfigError, DataError, CheckpointError) as e:
            fail(str(e))
        except OSError as e:  # a full disk, a folder made read-only meanwhile, ...
            print(f"error: {files.os_error_line(e)} ({status.where}); {kept}; once it is fixed, "
                  f"run the same command: {again}", file=sys.stderr)
            exit_now(2)  # without waiting for background writers that hit the same disk
        except jax.errors.JaxRuntimeError as e:
            if jax.process_count() == 1:
                raise
            print(f"error: {lost_process_line(e)} ({status.where}); {kept}; once every process "
                  f"can run, start them all again with the same commands: {again}",
                  file=sys.stderr)
            exit_now(2)  # before JAX's shutdown barrier, which would wait, then abort
        except KeyboardInterrupt as e:  # Ctrl-C or SIGTERM (interrupts.Interrupted)
            interrupts.leave(e, f"{status.where}; {kept}; to resume, run the same command: "
                             f"{again}")
    if sharding.is_primary():  # one process speaks
        print(report.summary(records, config.dataset, jax.devices()[0].platform.upper(),
                             config.workdir))


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
