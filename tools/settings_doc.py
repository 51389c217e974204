"""Writes ``docs/method-settings.md``: every method's settings, from its ``Config`` dataclass.

    python tools/settings_doc.py            # writes docs/method-settings.md
    python tools/settings_doc.py --check    # exit 1 if the page is not current

The page is ``oneshui_jax.unlearn.settings_doc.settings_reference()``.
"""

from __future__ import annotations

import argparse
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PATH = os.path.join(ROOT, "docs", "method-settings.md")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true",
                        help="write nothing; exit 1 if the page is not current")
    args = parser.parse_args(argv)
    from oneshui_jax.unlearn.settings_doc import settings_reference

    page = settings_reference()
    if args.check:
        current = open(PATH, encoding="utf-8").read() if os.path.exists(PATH) else None
        if current != page:
            print(f"{PATH} is not current: run python tools/settings_doc.py", file=sys.stderr)
            return 1
        return 0
    with open(PATH, "w", encoding="utf-8") as f:
        f.write(page)
    print(f"wrote {PATH}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
