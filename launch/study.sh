#!/usr/bin/env bash
# The main job: the default study on the embedded SynthFaces data (CPU is enough).
# Extra arguments go to oneshui_jax.main, e.g. --config.num_identities=50 --config.seed=1.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
exec python -m oneshui_jax.main --config=configs/synthfaces.py "$@"
