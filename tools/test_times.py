"""Where the test suite's time goes: per-file and per-test tables from a pytest run.

    ONESHUI_TEST_COMPILE_LOG=/tmp/compile.jsonl ./launch/test.sh --junitxml=/tmp/suite.xml
    python tools/test_times.py /tmp/suite.xml --compile-log /tmp/compile.jsonl

The junit file gives each test's seconds (setup, call and teardown: a session fixture's build is
charged to the first test that asks for it); the optional compile log (written by
``tests/conftest.py`` when ``ONESHUI_TEST_COMPILE_LOG`` is set) adds the seconds JAX spent
tracing and compiling in the test's own process, and loading from the persistent compilation
cache, and which pytest-xdist worker ran the test when: the workers table shows how busy each
worker was and how long it idled at the end while the other still ran (the balance). Subprocesses
a test starts are counted in its seconds but not in its compile columns. Prints Markdown tables
(files by total, the workers, then the slowest tests) and, with ``--json``, writes them;
``--schedule tests/schedule.json`` writes the seconds per file that ``tests/schedule.py`` orders
the files by (refresh it from a whole-suite run when files have grown or shrunk a lot).
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import platform
import subprocess
import sys
import time
import xml.etree.ElementTree as ET


def read_junit(path: str) -> dict[str, float]:
    """Seconds per test node id (``tests/test_x.py::test_y[param]``)."""
    times = {}
    for case in ET.parse(path).iter("testcase"):
        module = case.get("classname", "")
        parts = module.split(".")
        # classname is "tests.test_x" or "tests.test_x.TestClass"
        file_parts = [p for p in parts if p]
        node_file = "/".join(file_parts[:2]) + ".py"
        rest = file_parts[2:]
        node = "::".join([node_file, *rest, case.get("name", "")])
        times[node] = times.get(node, 0.0) + float(case.get("time", 0.0))
    return times


def read_compile_log(path: str) -> dict[str, dict]:
    """Per test node id: JAX seconds ``{"trace", "compile", "cache_load"}`` and, from logs that
    have them, ``worker``, ``start`` and ``end`` (Unix seconds)."""
    seconds: dict[str, dict[str, float]] = {}
    with open(path) as f:
        for line in f:
            if line.strip():
                row = json.loads(line)
                seconds[row.pop("test")] = row
    return seconds


def workers(jax_seconds: dict[str, dict]) -> dict[str, dict[str, float]]:
    """Per worker: tests run, seconds busy in them, and when it finished and how long it then
    idled, both relative to the first test's start (``{}`` for logs without timestamps)."""
    rows = [r for r in jax_seconds.values() if "start" in r and "end" in r]
    if not rows:
        return {}
    first = min(r["start"] for r in rows)
    last = max(r["end"] for r in rows)
    out: dict[str, dict[str, float]] = {}
    for r in rows:
        row = out.setdefault(r.get("worker", "main"), {"tests": 0, "busy": 0.0, "finished": 0.0})
        row["tests"] += 1
        row["busy"] += r["end"] - r["start"]
        row["finished"] = max(row["finished"], r["end"] - first)
    for row in out.values():
        row["idle_at_end"] = (last - first) - row["finished"]
    return dict(sorted(out.items()))


def tables(times: dict[str, float], jax_seconds: dict[str, dict],
           top: int = 25) -> dict:
    files: dict[str, dict[str, float]] = collections.defaultdict(
        lambda: {"tests": 0, "seconds": 0.0, "compile": 0.0, "trace": 0.0})
    for node, seconds in times.items():
        row = files[node.split("::")[0]]
        row["tests"] += 1
        row["seconds"] += seconds
        extra = jax_seconds.get(node, {})
        row["compile"] += extra.get("compile", 0.0)
        row["trace"] += extra.get("trace", 0.0)
    slowest = sorted(times.items(), key=lambda kv: -kv[1])[:top]
    return {
        "total_seconds": sum(times.values()),
        "compile_seconds": sum(r.get("compile", 0.0) for r in jax_seconds.values()),
        "trace_seconds": sum(r.get("trace", 0.0) for r in jax_seconds.values()),
        "files": dict(sorted(files.items(), key=lambda kv: -kv[1]["seconds"])),
        "workers": workers(jax_seconds),
        "slowest": [{"test": node, "seconds": s,
                     "compile": jax_seconds.get(node, {}).get("compile", 0.0)}
                    for node, s in slowest],
    }


def markdown(result: dict) -> str:
    lines = [f"Sum of test seconds: {result['total_seconds']:.0f} (in-process JAX: compile "
             f"{result['compile_seconds']:.0f}, trace {result['trace_seconds']:.0f})", "",
             "| file | tests | seconds | compile | trace |", "|---|---:|---:|---:|---:|"]
    for name, row in result["files"].items():
        lines.append(f"| {name} | {row['tests']} | {row['seconds']:.1f} | {row['compile']:.1f} "
                     f"| {row['trace']:.1f} |")
    if result["workers"]:
        lines += ["", "| worker | tests | busy s | finished at s | idle at the end s |",
                  "|---|---:|---:|---:|---:|"]
        for name, row in result["workers"].items():
            lines.append(f"| {name} | {row['tests']} | {row['busy']:.1f} | "
                         f"{row['finished']:.1f} | {row['idle_at_end']:.1f} |")
    lines += ["", "| slowest tests | seconds | compile |", "|---|---:|---:|"]
    for row in result["slowest"]:
        lines.append(f"| {row['test']} | {row['seconds']:.1f} | {row['compile']:.1f} |")
    return "\n".join(lines)


def schedule_table(result: dict, junit: str) -> dict:
    """The seconds per file, rounded, and where they were measured."""
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True, cwd=os.path.dirname(os.path.abspath(__file__)),
                                timeout=30).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = ""
    measured = (f"{time.strftime('%Y-%m-%d', time.gmtime(os.path.getmtime(junit)))}, "
                f"commit {commit or 'unknown'}, {platform.machine()} with "
                f"{os.cpu_count()} CPU cores")
    return {"measured": measured,
            "seconds": {name: round(row["seconds"], 1) for name, row in result["files"].items()}}


def write_json(path: str, value: dict) -> None:
    """Writes ``value`` to ``path`` through a temporary name (never half a file)."""
    with open(path + ".tmp", "w") as f:
        json.dump(value, f, indent=1)
        f.write("\n")
    os.replace(path + ".tmp", path)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("junit", help="pytest --junitxml output")
    parser.add_argument("--compile-log", help="ONESHUI_TEST_COMPILE_LOG output")
    parser.add_argument("--top", type=int, default=25, help="slowest tests to list")
    parser.add_argument("--json", help="also write the tables as JSON here")
    parser.add_argument("--schedule", help="write the seconds per file here, the table "
                        "tests/schedule.py orders the files by (tests/schedule.json)")
    args = parser.parse_args(argv)
    try:
        times = read_junit(args.junit)
    except (OSError, ET.ParseError) as e:
        print(f"error: {args.junit}: expected pytest's --junitxml output ({e})", file=sys.stderr)
        return 2
    try:
        jax_seconds = read_compile_log(args.compile_log) if args.compile_log else {}
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as e:
        print(f"error: {args.compile_log}: expected ONESHUI_TEST_COMPILE_LOG's JSON lines ({e!r})",
              file=sys.stderr)
        return 2
    result = tables(times, jax_seconds, args.top)
    print(markdown(result))
    if args.json:
        write_json(args.json, result)
    if args.schedule:
        write_json(args.schedule, schedule_table(result, args.junit))
    return 0


if __name__ == "__main__":
    sys.exit(main())
