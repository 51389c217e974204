"""``python -m oneshui_jax.serve``: serve a deletion request (the same as
``python -m oneshui_jax.unlearn``; see :mod:`oneshui_jax.serve.cli`)."""

import sys

from oneshui_jax.serve.cli import main

if __name__ == "__main__":
    sys.exit(main())
