"""Writes ``docs/method-settings.md``: every method's settings, from its ``Config`` dataclass.

    python tools/settings_doc.py            # writes docs/method-settings.md
    python tools/settings_doc.py --check    # exit 1 if the page is not current

The page is ``oneshui_jax.unlearn.settings_doc.settings_reference()``.
"""

from __future__ import annotations

import argparse
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PATH = os.path.join(ROOT, "docs", "method-settings.md")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true",
                        help="write nothing; exit 1 if the page is not current")
    args = parser.parse_args(argv)
    from hparams_table import write_or_check  # tools/, beside this script

    from oneshui_jax.unlearn.settings_doc import settings_reference

    return write_or_check(PATH, settings_reference(), args.check, "python tools/settings_doc.py")

if __name__ == "__main__":
    raise SystemExit(main())
