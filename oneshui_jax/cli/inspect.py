"""Inspect checkpoints: print a run's parameter tree and metadata, check it, or compare two runs
(the run directories of ``oneshui_jax.checkpoints``; the work is ``oneshui_jax/inspect.py``).

    python -m oneshui_jax.inspect RUN_DIR                 # tree + metadata of a run
    python -m oneshui_jax.inspect RUN_DIR/train_state     # latest resumable training state
    python -m oneshui_jax.inspect --diff RUN_A RUN_B      # ||a - b|| / ||a|| per tensor
    python -m oneshui_jax.inspect RUN_DIR --json          # the same, machine-readable
    python -m oneshui_jax.inspect --verify RUN_DIR        # re-read params/, artifacts/ and
                                                          # metadata.json, check their sha256

The tree is read from orbax metadata, without loading any array; ``--diff`` loads both parameter
sets (verifying their hashes); ``--verify`` checks every parameter, the method's artifacts and
``metadata.json`` against the hashes the run records. A path that is not a checkpoint, one whose
parameters, artifacts or metadata are unreadable or do not match their hash, or a malformed
command line prints one ``error: ...`` line and exits with status 2.
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Sequence

from absl import flags

from oneshui_jax import inspect as inspect_lib
from oneshui_jax.cli import common
from oneshui_jax.errors import CheckpointError

FLAGS = common.command_flags()
_DIFF = flags.DEFINE_bool(
    "diff", False, "compare two runs, PATH_A PATH_B: per-tensor relative change "
    "||a - b|| / ||a||", flag_values=FLAGS)
_VERIFY = flags.DEFINE_bool(
    "verify", False, "read PATH's parameters (and artifacts) and check them against the sha256 "
    "in its metadata.json, and metadata.json against its own recorded hash (exit status 2 when "
    "anything differs or is unreadable)", flag_values=FLAGS)
_JSON = flags.DEFINE_bool("json", False, "print a JSON summary instead", flag_values=FLAGS)

EITHER = "give either PATH or --diff PATH_A PATH_B"


def _paths(argv: Sequence[str] | None) -> list[str]:
    """The positional run directories: PATH (a run directory or its train_state/ folder), or
    with ``--diff`` PATH_A PATH_B."""
    paths = common.parse(FLAGS, argv, __doc__)
    if _DIFF.value and len(paths) == 1:
        common.fail(f"--diff takes two run directories, PATH_A PATH_B; got one ({paths[0]})")
    if len(paths) != (2 if _DIFF.value else 1):
        common.fail(EITHER if len(paths) < 2 else f"{EITHER}; got {len(paths)} paths: {paths}")
    if _VERIFY.value and _DIFF.value:
        common.fail("--verify needs PATH (a run directory)")
    return paths


def main(argv: Sequence[str] | None = None) -> int:
    """The command line on ``argv`` (default ``sys.argv[1:]``); returns the exit status (2: not
    a usable checkpoint). A malformed command line raises ``SystemExit(2)`` after its one
    line, ``--help`` ``SystemExit(0)``."""
    paths = _paths(argv)
    logging.getLogger("absl").setLevel(logging.CRITICAL)  # errors are reported as one line
    try:
        if _DIFF.value:
            summary = inspect_lib.diff_summary(*paths)
        elif _VERIFY.value:
            summary = inspect_lib.verify_summary(paths[0])
        else:
            summary = inspect_lib.run_summary(paths[0])
    except CheckpointError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if _JSON.value:
        print(json.dumps(summary, indent=2))
    elif _DIFF.value:
        print(inspect_lib.format_diff(summary))
    else:
        print(inspect_lib.format_verify(summary) if _VERIFY.value
              else inspect_lib.format_summary(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
