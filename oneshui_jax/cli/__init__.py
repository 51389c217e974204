"""Every command line of oneshui_jax, one module each, all on absl flags.

The study itself is ``python -m oneshui_jax.main`` (``oneshui_jax/main.py``); the others live here
and keep their historical ``python -m`` names as thin aliases (README "Commands"). Shared
pieces: ``common`` (the one-line ``error:`` convention, exit codes, each command's own flags and
its ``--help``), ``config_flags`` (``--config=FILE[:ARG]`` and ``--config.FIELD=VALUE``
overrides, for every command that takes a study's config).

Commands (module: ``python -m`` name, what it does):

- ``request``: ``oneshui_jax.unlearn`` (or ``oneshui_jax.serve``), serve a deletion request:
  portraits in, unlearned model and receipt out (``oneshui_jax/serve/``);
- ``inspect``: ``oneshui_jax.inspect``, a run's parameter tree and metadata, ``--verify`` its
  hashes, ``--diff`` two runs;
- ``convert``: ``oneshui_jax.models.convert``, pretrained ViT weights into a run directory;
- ``splits``: ``oneshui_jax.splits``, a reference-exact identity split as JSON;
- ``report``: ``oneshui_jax.report``, the results of several studies combined into one report.
"""
