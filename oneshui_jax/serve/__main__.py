"""``python -m oneshui_jax.serve``: serve a deletion request, the same as ``python -m
oneshui_jax.unlearn``. An alias: it runs the command line, :mod:`oneshui_jax.cli.request`, as
``__main__`` without importing it (this library package stays below the command lines)."""

import runpy

if __name__ == "__main__":
    runpy.run_module("oneshui_jax.cli.request", run_name="__main__")
