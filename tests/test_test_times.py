"""``tools/test_times.py``: the tables of where the suite's time goes, from a planted run."""

import importlib.util
import json
import os

import pytest

TOOL = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tools",
                    "test_times.py")


@pytest.fixture(scope="module")
def test_times():
    spec = importlib.util.spec_from_file_location("test_times_tool", TOOL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


JUNIT = """<?xml version="1.0" encoding="utf-8"?>
<testsuites><testsuite name="pytest" tests="4">
<testcase classname="tests.test_a" name="test_one" time="2.0" />
<testcase classname="tests.test_a" name="test_two[x]" time="3.0" />
<testcase classname="tests.test_b.TestGroup" name="test_three" time="10.0" />
<testcase classname="tests.test_b" name="test_four" time="1.0" />
</testsuite></testsuites>
"""

LOG = [
    {"test": "tests/test_a.py::test_one", "trace": 0.5, "compile": 1.0, "cache_load": 0.0,
     "worker": "gw0", "start": 100.0, "end": 102.0},
    {"test": "tests/test_a.py::test_two[x]", "trace": 0.0, "compile": 2.0, "cache_load": 0.1,
     "worker": "gw0", "start": 102.0, "end": 105.0},
    {"test": "tests/test_b.py::TestGroup::test_three", "trace": 1.0, "compile": 6.0,
     "cache_load": 0.0, "worker": "gw1", "start": 100.5, "end": 110.5},
    {"test": "tests/test_b.py::test_four", "trace": 0.0, "compile": 0.0, "cache_load": 0.0,
     "worker": "gw1", "start": 110.5, "end": 111.0},
]


def test_files_workers_and_slowest_tests_from_junit_and_the_compile_log(test_times, tmp_path,
                                                                       capsys):
    junit, log, out = tmp_path / "s.xml", tmp_path / "c.jsonl", tmp_path / "t.json"
    junit.write_text(JUNIT)
    log.write_text("".join(json.dumps(row) + "\n" for row in LOG))
    assert test_times.main([str(junit), "--compile-log", str(log), "--top", "2",
                            "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["total_seconds"] == pytest.approx(16.0)
    assert result["compile_seconds"] == pytest.approx(9.0)
    assert result["trace_seconds"] == pytest.approx(1.5)
    # files by total seconds, the biggest first, with their JAX seconds
    assert list(result["files"]) == ["tests/test_b.py", "tests/test_a.py"]
    assert result["files"]["tests/test_a.py"] == {"tests": 2, "seconds": 5.0, "compile": 3.0,
                                                  "trace": 0.5}
    # gw0 finished 6 s before gw1: the imbalance at the end
    gw0, gw1 = result["workers"]["gw0"], result["workers"]["gw1"]
    assert (gw0["tests"], gw0["busy"], gw0["finished"]) == (2, 5.0, 5.0)
    assert gw0["idle_at_end"] == pytest.approx(6.0) and gw1["idle_at_end"] == 0.0
    assert [r["test"] for r in result["slowest"]] == ["tests/test_b.py::TestGroup::test_three",
                                                      "tests/test_a.py::test_two[x]"]
    printed = capsys.readouterr().out
    assert "| tests/test_b.py | 2 | 11.0 | 6.0 | 1.0 |" in printed
    assert "| gw0 | 2 | 5.0 | 5.0 | 6.0 |" in printed


def test_a_log_without_timestamps_has_no_workers_table(test_times, tmp_path, capsys):
    junit, log = tmp_path / "s.xml", tmp_path / "c.jsonl"
    junit.write_text(JUNIT)
    log.write_text(json.dumps({"test": "tests/test_a.py::test_one", "trace": 0.0,
                               "compile": 1.0, "cache_load": 0.0}) + "\n")
    assert test_times.main([str(junit), "--compile-log", str(log)]) == 0
    assert "| worker |" not in capsys.readouterr().out


def test_unreadable_input_is_one_error_line(test_times, tmp_path, capsys):
    bad = tmp_path / "s.xml"
    bad.write_text("<not xml")
    assert test_times.main([str(bad)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {bad}: expected pytest's --junitxml") and err.count("\n") == 1
    log = tmp_path / "c.jsonl"
    log.write_text('{"trace": 1.0}\n')
    assert test_times.main([str(tmp_path / "missing.xml")]) == 2
    (tmp_path / "ok.xml").write_text(JUNIT)
    capsys.readouterr()
    assert test_times.main([str(tmp_path / "ok.xml"), "--compile-log", str(log)]) == 2
    assert capsys.readouterr().err.startswith(f"error: {log}: expected ONESHUI_TEST_COMPILE_LOG")


def test_schedule_table_is_the_seconds_per_file(test_times, tmp_path):
    junit, out = tmp_path / "s.xml", tmp_path / "schedule.json"
    junit.write_text(JUNIT)
    assert test_times.main([str(junit), "--schedule", str(out)]) == 0
    table = json.loads(out.read_text())
    assert table["seconds"] == {"tests/test_b.py": 11.0, "tests/test_a.py": 5.0}
    assert "CPU cores" in table["measured"]
    assert not os.path.exists(str(out) + ".tmp")


def test_files_go_longest_first_with_the_small_study_built_at_once():
    import schedule

    seconds = {"a.py": 10.0, "b.py": 50.0, "c.py": 40.0, "d.py": 30.0, "e.py": 45.0,
               "f.py": 5.0}
    uses_study = {"c.py", "d.py"}
    # no study: longest first; an unknown file counts as the median known (40 s)
    assert schedule.file_order(["a.py", "b.py", "e.py", "f.py"], set(), seconds) == [
        "b.py", "e.py", "a.py", "f.py"]
    assert schedule.file_order(["a.py", "new.py", "b.py"], set(), seconds) == [
        "b.py", "new.py", "a.py"]
    # the longest study file first; the next waits until 65 s of other work is handed out
    # (b 50 + e 45), then the longest first again
    assert schedule.file_order(list(seconds), uses_study, seconds) == [
        "c.py", "b.py", "e.py", "d.py", "a.py", "f.py"]
    # every file exactly once, whatever the table says
    order = schedule.file_order(list(seconds), uses_study, {})
    assert sorted(order) == sorted(seconds) and order[0] in uses_study
    assert schedule.seconds_by_file(os.devnull) == {}
