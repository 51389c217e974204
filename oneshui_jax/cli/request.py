"""Serve a deletion request: unlearn a person from a model given their portraits, with the method
of a study's method run; write the new model and a receipt (paper section 3, 1-SHUI at test
time; the work is ``oneshui_jax/serve/``).

    python -m oneshui_jax.unlearn --checkpoint RUN_DIR --portrait a.jpg [--portrait b.jpg ...]
        [--identity ID ...] [--labels SPEC ...] --out DIR [--artifacts METHOD_RUN_DIR]
        [--method NAME] [--request_id ID] [--overwrite]

(``python -m oneshui_jax.serve`` is the same command.) Every error a user can cause, a
malformed command line included, is one ``error: ...`` line on stderr and exit status 2, with
nothing written; so is an OSError while writing. Ctrl-C or SIGTERM is one line and 130 / 143.
"""

from __future__ import annotations

from oneshui_jax import interrupts

if __name__ == "__main__":  # as a command, not imported: before the imports below, so that
    interrupts.quiet_start()  # an interrupt while they load is one line too

import logging
import sys
from collections.abc import Sequence

from absl import flags

from oneshui_jax import files
from oneshui_jax.cli import common
from oneshui_jax.errors import CheckpointError, ConfigError, DataError
from oneshui_jax.serve.service import serve_request, summary

PROG = "python -m oneshui_jax.unlearn"

FLAGS = common.command_flags()
_CHECKPOINT = flags.DEFINE_string(
    "checkpoint", None, "a method run directory (e.g. <ckpt>/<dataset>/<model>/"
    "meta_unlearn_<N>_<seed>), an earlier request's output, or a pretrained run with "
    "--artifacts", flag_values=FLAGS, required=True)
_PORTRAIT = flags.DEFINE_multi_string(
    "portrait", None, "an image of the person (any format PIL reads)",
    flag_values=FLAGS, required=True)
_OUT = flags.DEFINE_string("out", None, "a new run directory", flag_values=FLAGS, required=True)
_ARTIFACTS = flags.DEFINE_string(
    "artifacts", None, "the method run whose method and artifacts to use (default: "
    "--checkpoint's own, or the one an earlier request recorded)", flag_values=FLAGS)
_METHOD = flags.DEFINE_string(
    "method", None, "optional check: the method the method run must have been made by",
    flag_values=FLAGS)
_IDENTITY = flags.DEFINE_multi_integer(
    "identity", None, "training identity id: once for all portraits or once per portrait",
    flag_values=FLAGS)
_LABELS = flags.DEFINE_multi_string(
    "labels", None, "labels of one portrait, in portrait order: 0,1,0,... (multi-hot) or a "
    "class index; default: the model's predictions", flag_values=FLAGS)
_REQUEST_ID = flags.DEFINE_string(
    "request_id", None, "id of the request (default: a random uuid4)", flag_values=FLAGS)
_OVERWRITE = flags.DEFINE_bool(
    "overwrite", False, "replace --out if it holds an earlier request's output",
    flag_values=FLAGS)


def main(argv: Sequence[str] | None = None) -> int:
    """The command line on ``argv`` (default ``sys.argv[1:]``); returns the exit status (2: a
    request that cannot be served). A malformed command line raises ``SystemExit(2)`` after
    its one line, ``--help`` ``SystemExit(0)``."""
    logging.getLogger("absl").setLevel(logging.ERROR)
    parsed = False
    try:
        with interrupts.handle():
            common.no_arguments(common.parse(FLAGS, argv, __doc__))
            parsed = True
            receipt = serve_request(
                _CHECKPOINT.value, _PORTRAIT.value, _OUT.value, artifacts_dir=_ARTIFACTS.value,
                identities=_IDENTITY.value, labels=_LABELS.value, request_id=_REQUEST_ID.value,
                method=_METHOD.value, overwrite=_OVERWRITE.value)
    except (CheckpointError, ConfigError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # --out was checked up front; a race, a full disk (nothing is kept)
        out = _OUT.value if parsed else ""
        print(f"error: {files.os_error_line(e, out)} (--out {out if parsed else '?'} cannot be "
              f"written; nothing of the request was kept)", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:  # Ctrl-C or SIGTERM: write_output removed its temporary copy
        kept = (f"nothing of the request was written and {_CHECKPOINT.value} is unchanged"
                if parsed else "nothing was written")
        interrupts.leave(e, f"while serving the request; {kept}; to retry, run the same "
                         f"command: {interrupts.same_command(PROG.split()[-1], argv)}")
    print(summary(receipt))
    return 0


if __name__ == "__main__":
    sys.exit(main())
