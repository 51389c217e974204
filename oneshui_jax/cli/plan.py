r"""``python -m oneshui_jax.cli.plan``: what a study would do with each of its stages, decided
without running any (``oneshui_jax/study/plan.py``; the sweep's skip, ``launch/sweep.py``).

    python -m oneshui_jax.cli.plan --config=configs/synthfaces.py --config.seed=1

Takes the study's ``--config=FILE[:ARG]`` and ``--config.FIELD=VALUE`` arguments and prints one
JSON line, ``{"done": bool, "reason": str, "stages": [{"stage", "run_dir", "decision", "reason",
"reference"}]}``; bad input is one ``error:`` line, exit status 2.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from collections.abc import Sequence

from oneshui_jax.cli.common import last_line
from oneshui_jax.cli.config_flags import load_config
from oneshui_jax.errors import CheckpointError, ConfigError, DataError
from oneshui_jax.study import plan


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if any(a in ("--help", "-h", "--helpfull") for a in args):
        print(__doc__.strip())
        return 0
    try:
        done, reason, plans = plan.check(load_config(args))
    except (ValueError, ConfigError, DataError, CheckpointError) as e:
        print(f"error: {last_line(str(e)) or e}", file=sys.stderr)
        return 2
    print(json.dumps({"done": done, "reason": reason,
                      "stages": [dataclasses.asdict(p) for p in plans]}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
