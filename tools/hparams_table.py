"""Writes ``configs/HPARAMS.md``: the real-data configs' method settings per dataset and N.

    python tools/hparams_table.py            # writes configs/HPARAMS.md
    python tools/hparams_table.py --check    # exit 1 if the file differs from oneshui_jax/hparams

The table is ``oneshui_jax.config_lib.hparams_table()``: the reference's values (its ``const.py``
and ``parser.py``, ``oneshui_jax/hparams.py``) that ``configs/celeba.py``, ``celebahq.py`` and
``mufac.py`` give ``config.train`` and every method block for the paper's grid of N.
``tests/test_configs.py`` checks the file against it.
"""

from __future__ import annotations

import argparse
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PATH = os.path.join(ROOT, "configs", "HPARAMS.md")


def write_or_check(path: str, text: str, check: bool, command: str) -> int:
    """Writes ``text`` to ``path``; with ``check``, writes nothing and returns 1 (naming
    ``command``, which regenerates it) when the file is not ``text``. The exit status."""
    if check:
        current = open(path, encoding="utf-8").read() if os.path.exists(path) else None
        if current != text:
            print(f"{path} is not current: run {command}", file=sys.stderr)
            return 1
        return 0
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
    print(f"wrote {path}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true",
                        help="write nothing; exit 1 if configs/HPARAMS.md is not current")
    args = parser.parse_args(argv)
    from oneshui_jax import config_lib

    return write_or_check(PATH, config_lib.hparams_table(), args.check,
                          "python tools/hparams_table.py")

if __name__ == "__main__":
    sys.exit(main())
