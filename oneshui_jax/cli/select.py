r"""``python -m oneshui_jax.select``: MetaUnlearn's settings chosen on simulated requests of
training identities (``oneshui_jax/study/select.py``), never on the study's request.

    python -m oneshui_jax.select --config=configs/synthfaces.py [--config.seed=0] [--out DIR]

Takes the study's flags (``--config=FILE[:ARG]`` and ``--config.FIELD=VALUE``) and ``--out``;
writes ``selection.{json,md}`` there and prints the table. Bad input is one ``error:`` line, exit
status 2; Ctrl-C or SIGTERM keeps the finished candidates (130 / 143).
"""

from __future__ import annotations

from oneshui_jax import interrupts

if __name__ == "__main__":  # as a command, not imported: before the imports below, so that
    interrupts.quiet_start()  # an interrupt while they load is one line too

import os

from absl import app, flags

from oneshui_jax import checkpoints
from oneshui_jax.cli.common import fail, quiet_logs
from oneshui_jax.cli.config_flags import CONFIG, EXPECTED_FLAGS, parse_flags
from oneshui_jax.errors import CheckpointError, ConfigError, DataError
from oneshui_jax.files import cannot_write_in, os_error_line
from oneshui_jax.study import select as select_lib

_OUT = flags.DEFINE_string("out", None, "Output folder (default: <config.workdir>/selection).")


def main(argv):
    if len(argv) > 1:
        fail(f"unexpected arguments {argv[1:]}; {EXPECTED_FLAGS}")
    quiet_logs()
    config = CONFIG.value
    out = _OUT.value or os.path.join(config.workdir, "selection")
    kept = os.path.join(out, "candidates")
    problem = cannot_write_in(kept)
    if problem:  # before any meta-training
        fail(f"--out {out}: {problem}")
    try:  # the pretrained model's run directory is read, never written into
        checkpoints.check_apart(out, (("the pretrained run it reads",
                                       select_lib.pretrain_dir(config)),))
    except ConfigError as e:
        fail(str(e))
    with interrupts.handle():
        try:
            result = select_lib.select(config, out)
            paths = select_lib.write(result, out)
        except (ConfigError, DataError, CheckpointError) as e:
            fail(str(e))
        except OSError as e:  # a full disk, a folder made read-only meanwhile
            fail(f"{os_error_line(e)} (during the selection; the finished candidates are kept "
                 f"in {kept} and reused)")
        except KeyboardInterrupt as e:  # Ctrl-C or SIGTERM
            interrupts.leave(e, f"during the selection; the finished candidates are kept in "
                             f"{kept} and reused; to resume, run the same command: "
                             f"{interrupts.same_command('oneshui_jax.select')}")
    print(select_lib.markdown(result))
    print(f"written: {paths['selection.md']}")


def run() -> None:
    """Parses the command line and runs :func:`main` (absl)."""
    app.run(main, flags_parser=parse_flags)


if __name__ == "__main__":
    run()
