"""Combine the results.json of several studies (seeds, N) into one report: the paper's tables as
mean ± std over seeds (``oneshui_jax.report.records.combine``), written into ``--out``:
results.{json,md,csv} and the plots; results.md is printed.

    python -m oneshui_jax.report --out DIR RESULTS.json [RESULTS.json ...] [--group_by_config]

Their configs may differ only in the seeds, output paths, logging and N (and, between N, the
methods' settings); any other difference is refused, listed. Any bad input, a malformed command
line included, is one ``error:`` line and exit status 2, with nothing written.
"""

from __future__ import annotations

from collections.abc import Sequence

from absl import flags

from oneshui_jax.cli import common
from oneshui_jax.files import os_error_line
from oneshui_jax.report.records import combine

FLAGS = common.command_flags()
_OUT = flags.DEFINE_string("out", None, "the folder for results.{json,md,csv} and the plots",
                           flag_values=FLAGS, required=True)
_GROUP_BY_CONFIG = flags.DEFINE_bool(
    "group_by_config", False, "report studies of different configs (e.g. train.lr) as "
    "separate groups of rows, labelled by the settings that differ (the 'config' column), "
    "instead of refusing them; seeds are averaged within a group only", flag_values=FLAGS)

EXPECTED = "expected RESULTS.json ...: the results.json files of finished studies"


def main(argv: Sequence[str] | None = None) -> int:
    """The command line on ``argv`` (default ``sys.argv[1:]``): returns 0, or prints one
    ``error:`` line and raises ``SystemExit(2)``; ``--help`` raises ``SystemExit(0)``."""
    results = common.parse(FLAGS, argv, __doc__)
    if not results:
        common.fail(f"the following arguments are required: results; {EXPECTED}")
    out = _OUT.value
    try:
        written = combine(results, out, group_by_config=_GROUP_BY_CONFIG.value)
    except ValueError as e:
        common.fail(str(e))
    except OSError as e:  # --out checked above; a race, a full disk, a folder not writable
        common.fail(f"{os_error_line(e, out)} (--out {out}: the report could not be written; "
                    "none of its files was replaced)")
    with open(written["results.md"]) as f:
        print(f.read())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
