#!/usr/bin/env bash
# The test suite (CPU, offline): lint, then pytest. Extra arguments go to pytest.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
ruff check .
exec python -m pytest -q "$@"
