"""``python -m oneshui_jax.unlearn``: serve a deletion request (see :mod:`oneshui_jax.serve`).

    python -m oneshui_jax.unlearn --checkpoint RUN_DIR --portrait a.jpg [--portrait b.jpg ...]
        [--identity ID ...] --out DIR [--artifacts METHOD_RUN_DIR]
"""

import sys

from oneshui_jax import interrupts

if __name__ == "__main__":  # as a command, not imported: before the imports below, so that
    interrupts.quiet_start()  # an interrupt while they load is one line too

from oneshui_jax.serve.cli import main

if __name__ == "__main__":
    sys.exit(main())
