"""``python -m oneshui_jax.select``: choose MetaUnlearn's settings on simulated requests. An alias
of the command line ``oneshui_jax/cli/select.py`` (the selection itself:
``oneshui_jax/study/select.py``): it runs it as ``__main__`` without importing it."""

import runpy

if __name__ == "__main__":
    runpy.run_module("oneshui_jax.cli.select", run_name="__main__")
