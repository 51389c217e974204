"""The order in which the two pytest-xdist workers take the test files (``--dist loadfile``).

pytest-xdist hands out whole files in collection order (``launch/test.sh`` passes
``--no-loadscope-reorder``, which keeps the order set here) and gives a worker its next file
when its current one is nearly done. Two rules keep both workers busy to the end:

- Longest first: files by their seconds in the last measured run (``tests/schedule.json``,
  written by ``python tools/test_times.py SUITE.xml --schedule tests/schedule.json``), so the
  short files fill the end. A file the table does not know yet counts as the median file.
- The shared small study (``conftest.small_study``) is built by the first worker that asks for
  it while the other waits on its lock. The longest file that uses it goes first, so the build
  starts at once, and the other files that use it are held back until the other worker has about
  ``SMALL_STUDY_SECONDS`` of other work.

The order changes only how long the suite takes: every test runs, in every order. A stale table
costs balance, never correctness.
"""

from __future__ import annotations

import json
import os

TABLE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "schedule.json")
SMALL_STUDY_SECONDS = 65.0
"""Building the small study on the 2-core CPU with the suite's settings (63.5 s, 2026-12-05)."""


def seconds_by_file(path: str = TABLE) -> dict[str, float]:
    """The table's seconds per test file (``{}`` when it is missing or unreadable)."""
    try:
        with open(path) as f:
            return {str(k): float(v) for k, v in json.load(f)["seconds"].items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return {}


def file_order(files: list[str], uses_study: set[str],
               seconds: dict[str, float]) -> list[str]:
    """``files`` (each once) in the order the workers should take them: see the module."""
    known = sorted(seconds.values())
    unknown = known[len(known) // 2] if known else 0.0
    cost = {f: seconds.get(f, unknown) for f in files}
    longest = sorted(files, key=lambda f: (-cost[f], f))
    studies = [f for f in longest if f in uses_study]
    order = studies[:1]
    held: list[str] = []
    other_work = 0.0
    for f in longest:
        if f in order:
            continue
        if f in uses_study and other_work < SMALL_STUDY_SECONDS:
            held.append(f)
            continue
        order.append(f)
        if f not in uses_study:
            other_work += cost[f]
        while held and other_work >= SMALL_STUDY_SECONDS:
            order.append(held.pop(0))
    return order + held


def order_items(items: list) -> list:
    """pytest's collected ``items`` reordered file by file (tests keep their order within a
    file)."""
    by_file: dict[str, list] = {}
    for item in items:
        by_file.setdefault(item.nodeid.split("::")[0], []).append(item)
    uses_study = {f for f, group in by_file.items()
                  if any("small_study" in getattr(i, "fixturenames", ()) for i in group)}
    order = file_order(list(by_file), uses_study, seconds_by_file())
    return [item for f in order for item in by_file[f]]
