"""``python -m oneshui_jax.unlearn``: serve a deletion request (the command line is
:mod:`oneshui_jax.cli.request`; the work, :mod:`oneshui_jax.serve`).

    python -m oneshui_jax.unlearn --checkpoint RUN_DIR --portrait a.jpg [--portrait b.jpg ...]
        [--identity ID ...] --out DIR [--artifacts METHOD_RUN_DIR]

An alias: it runs the command line as ``__main__`` (whose first statement is
``interrupts.quiet_start()``) without importing it, so that this library package stays below
the command lines.
"""

import runpy

if __name__ == "__main__":
    runpy.run_module("oneshui_jax.cli.request", run_name="__main__")
