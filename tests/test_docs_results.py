"""Where measurements live in the documentation.

Guides and reference pages (``docs/*.md`` outside ``docs/results/``) say how things work: they
carry no date and no timing in prose; every measured number lives in a page under
``docs/results/``, and each such page states when (an ISO date), at which commit and on which
machine its runs were made. README.md keeps one headline table with its setup line, so at most
one date, and no timing. Text only: no jax, no package import.
"""

from __future__ import annotations

import os
import re

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = os.path.join(REPO, "docs")
RESULTS = os.path.join(DOCS, "results")

ISO_DATE = re.compile(r"(?<!\d)20\d\d-[01]\d-[0-3]\d(?!\d)")
# A number and a unit of time, throughput or memory, as measurements are written in prose.
# "10 seconds", "a few minutes", "9.3 min" (a configured timeout) are not flagged: qualitative
# statements and settings stay in the guides; the figures of a run go to a results page.
TIMINGS = {
    "minutes and seconds": re.compile(r"\d+ min \d+(?:\.\d+)? s\b"),
    "seconds": re.compile(r"(?<![\w.])\d[\d,]*(?:\.\d+)?\s?s\b"),
    "milliseconds": re.compile(r"(?<![\w.])\d[\d,]*(?:\.\d+)?\s?ms\b"),
    "throughput": re.compile(r"\d[\d,]*(?:\.\d+)?\s?(?:images|img)/s\b"),
    "memory": re.compile(r"\d[\d,]*(?:\.\d+)?\s?GiB\b"),
}
# A target is not a measurement: a bound written with a comparison sign right before the number
# ("a p50 ≤ 10 ms", ">= 2.0") states a goal the code is held to, so it may stay in a guide.
TARGET_BOUND = re.compile(r"(?:≤|≥|<=|>=|<|>)\s*$")
# The header of a measurement table: a column named by a unit of time, throughput or memory
# ("p50 ms", "seconds", "compile s", "peak GiB", "images/s", "wall").
TABLE_UNIT = re.compile(r"(?:^|\s)(?:ms|s|seconds|images/s|GiB)$|^wall$")
TABLE_SEPARATOR = re.compile(r"^\|?\s*:?-{3,}:?\s*(?:\|\s*:?-{3,}:?\s*)*\|?\s*$")
FENCE = re.compile(r"^\s*(```|~~~)")

COMMIT = re.compile(r"\b[0-9a-f]{7,40}\b")
MACHINE = re.compile(r"\b\d+-core CPU\b|\b\d+ CPU cores\b|\bNVIDIA [A-Z]\d+")


def prose_lines(text: str) -> list[tuple[int, str]]:
    """``(line number, line)`` outside fenced code blocks (commands and outputs are not prose)."""
    out, fenced = [], False
    for number, line in enumerate(text.splitlines(), 1):
        if FENCE.match(line):
            fenced = not fenced
            continue
        if not fenced:
            out.append((number, line))
    return out


def measurements(text: str) -> list[str]:
    """Every date and timing in the prose of a page, as ``"line N: kind 'match'"``."""
    found = []
    lines = prose_lines(text)
    for i, (number, line) in enumerate(lines):
        for match in ISO_DATE.finditer(line):
            found.append(f"line {number}: date {match.group()!r}")
        for kind, pattern in TIMINGS.items():
            for match in pattern.finditer(line):
                if not TARGET_BOUND.search(line[:match.start()]):
                    found.append(f"line {number}: {kind} {match.group()!r}")
        following = lines[i + 1][1] if i + 1 < len(lines) else ""
        if line.lstrip().startswith("|") and TABLE_SEPARATOR.match(following.strip()):
            for cell in line.strip().strip("|").split("|"):
                if TABLE_UNIT.search(cell.strip()):
                    found.append(f"line {number}: table column {cell.strip()!r}")
    return found


def missing_run_facts(text: str) -> list[str]:
    """What a results page lacks of: a date, a commit hash, a machine."""
    missing = []
    if not ISO_DATE.search(text):
        missing.append("date")
    # A hash has letters and digits both: "25700d8" is one, "1234567" and "defaced" are not.
    if not any(re.search(r"[a-f]", h) and re.search(r"\d", h) for h in COMMIT.findall(text)):
        missing.append("commit")
    if not MACHINE.search(text):
        missing.append("machine")
    return missing


def _pages(folder: str) -> list[str]:
    return sorted(os.path.relpath(os.path.join(root, name), REPO)
                  for root, _, names in os.walk(folder) for name in names if name.endswith(".md"))


def _read(path: str) -> str:
    with open(os.path.join(REPO, path), encoding="utf-8") as f:
        return f.read()


GUIDES = [p for p in _pages(DOCS) if not p.startswith(os.path.join("docs", "results") + os.sep)]
RESULT_PAGES = [p for p in _pages(RESULTS) if os.path.basename(p) != "index.md"]


@pytest.mark.parametrize("page", GUIDES)
def test_guides_carry_no_dates_or_timings(page):
    assert measurements(_read(page)) == [], (
        f"{page}: move the measurement to a page under docs/results/ (with its date, commit, "
        "machine and command) and link to it")


@pytest.mark.parametrize("page", RESULT_PAGES)
def test_results_pages_state_date_commit_and_machine(page):
    assert missing_run_facts(_read(page)) == []


def test_the_readme_keeps_one_dated_table_and_no_timings():
    found = measurements(_read("README.md"))
    dates = [f for f in found if ": date " in f]
    assert len(dates) <= 1, dates  # the headline table's setup line
    assert [f for f in found if ": date " not in f] == []


def test_the_pages_are_found():
    assert os.path.join("docs", "index.md") in GUIDES
    assert os.path.join("docs", "results", "gpu.md") in RESULT_PAGES


@pytest.mark.parametrize("text, flagged", [
    ("On one NVIDIA H200 (2026-12-04, commit 50a7d2b)", True),
    ("writes `bench/results/gpu_<date>.json`", False),
    ("the whole check (`bench/results/h200_2026-12-04/`)", True),
    ("2 min 48 s wall-clock for both studies", True),
    ("section timeouts sum to 9.3 min", False),
    ("Building `medium` took 14 s on 2 CPU cores", True),
    ("Building `medium` takes seconds on a 2-core CPU", False),
    ("a test that takes 10 seconds or more", False),
    ("N = 10, seeds 0-4", False),
    ("`--heartbeat_timeout_s` (default 10), `config.checkpoint_every_s` (60)", False),
    ("reading a decoded record takes 0.23 ms", True),
    ("a 20-portrait request at a p50 ≤ 10 ms", False),
    ("trains at about 1,800 images/s", True),
    ("images/s of the jit-compiled train step", False),
    ("peak 4.5 GiB; the saved C is 537 MB", True),
    ("a few GiB of memory; caps of 64 MiB", False),
    ("| part | p50 ms | p95 ms |\n|---|---:|---:|\n| step | 25.7 | 51.8 |", True),
    ("| option | what it does |\n|---|---|\n| `remat` | recomputes |", False),
    ("```\n$ time ./launch/study.sh  # 9 min 37 s, 2026-12-01\n```", False),
])
def test_the_detector(text, flagged):
    assert bool(measurements(text)) is flagged, measurements(text)


@pytest.mark.parametrize("text, missing", [
    ("One NVIDIA H200, 2026-12-04, commit 50a7d2b.", []),
    ("2-core CPU; documented in commit 0524da1 on 2026-12-01.", []),
    ("Measured on the CPU here, 1234567 images.", ["date", "commit", "machine"]),
    ("On 2 CPU cores, defaced at 2026-12-05.", ["commit"]),
])
def test_the_run_facts_check(text, missing):
    assert missing_run_facts(text) == missing
