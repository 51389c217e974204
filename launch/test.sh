#!/usr/bin/env bash
# The test suite (CPU, offline): lint (ruff; lint-imports: the layers and no import cycles,
# contracts in pyproject.toml), the documentation site (mkdocs build --strict: a broken link or a
# page missing from mkdocs.yml fails; built into a temporary folder), then pytest on two workers (pytest-xdist, one test file per
# worker at a time, in the order of tests/schedule.py; the shared small study is built once, see
# tests/conftest.py). Extra arguments go to pytest (`-n 0` runs everything in one process;
# `-m "not slow"` is the quick tier). The compiler flags and the per-run compilation cache of
# tests/suite_settings.py apply. The 15 slowest tests are listed at the end.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
ruff check .
lint-imports
site="$(mktemp -d)"
NO_MKDOCS_2_WARNING=1 mkdocs build --strict --quiet --site-dir "$site"
rm -rf "$site"
exec python -m pytest -q -n 2 --dist loadfile --no-loadscope-reorder --durations=15 "$@"
