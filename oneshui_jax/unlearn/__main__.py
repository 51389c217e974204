"""``python -m oneshui_jax.unlearn``: serve a deletion request (see :mod:`oneshui_jax.serve`).

    python -m oneshui_jax.unlearn --checkpoint RUN_DIR --method meta_unlearn \\
        --portrait a.jpg [--portrait b.jpg ...] --identity ID --out DIR [--meta_loss RUN_DIR]
"""

import sys

from oneshui_jax import serve

if __name__ == "__main__":
    sys.exit(serve.main())
