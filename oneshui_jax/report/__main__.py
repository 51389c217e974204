"""``python -m oneshui_jax.report``: combine the results.json of several studies into one report.
An alias of the command line ``oneshui_jax/cli/report.py``: it runs it as ``__main__`` without
importing it, so that this library package stays below the command lines."""

import runpy

if __name__ == "__main__":
    runpy.run_module("oneshui_jax.cli.report", run_name="__main__")
