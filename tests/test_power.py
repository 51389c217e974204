"""Statistical power of the paired differences (``report/power.py``) against closed forms and a
simulation, and the power table under the paired table of results.md."""

import math

import numpy as np
import pytest
import scipy.stats
from test_report import make_record

from oneshui_jax import report
from oneshui_jax.report import power

Z = scipy.stats.norm.ppf


def test_with_many_seeds_the_detectable_difference_is_the_normal_closed_form():
    """δ = (z_{0.975} + z_{0.8}) σ / √n (2.80 σ / √n) in the limit of many seeds."""
    n, std = 20_000, 3.0
    expected = (Z(0.975) + Z(0.8)) * std / math.sqrt(n)
    assert power.detectable_difference(std, n) == pytest.approx(expected, rel=1e-3)
    # The needed seeds for a given difference invert it: n = ((z + z) σ / δ)^2 (+ a seed or so).
    closed = ((Z(0.975) + Z(0.8)) * 10.0 / 1.0) ** 2  # σ = 10 points, δ = 1 point: 785
    assert closed < power.seeds_needed(10.0) <= closed + 3


def test_with_few_seeds_the_power_is_the_t_tests_by_simulation():
    """Five seeds, σ = 1: the difference found has 80% power when the test is simulated."""
    n, std = 5, 1.0
    delta = power.detectable_difference(std, n)
    assert delta > (Z(0.975) + Z(0.8)) / math.sqrt(n)  # wider than the normal approximation
    rng = np.random.default_rng(0)
    samples = rng.normal(delta, std, size=(40_000, n))
    t = samples.mean(1) / (samples.std(1, ddof=1) / math.sqrt(n))
    rejected = np.mean(np.abs(t) > scipy.stats.t.ppf(0.975, n - 1))
    assert rejected == pytest.approx(0.8, abs=0.01)
    assert power.power(0.0, std, n) == pytest.approx(0.05)  # no difference: the test's level


def test_edge_cases():
    assert power.detectable_difference(None, 5) is None  # one seed: no std
    assert power.detectable_difference(2.0, 1) is None
    assert power.detectable_difference(0.0, 3) == 0.0 and power.seeds_needed(0.0) == 2
    assert power.seeds_needed(None) is None
    assert power.seeds_needed(1e6) is None  # beyond MAX_SEEDS
    # more seeds, smaller detectable differences
    sizes = [power.detectable_difference(1.0, n) for n in (2, 3, 5, 10, 30)]
    assert sizes == sorted(sizes, reverse=True)
    # Far tails where scipy's lower-tail series gives NaN (2 seeds, shift 8): still a power.
    assert 0.4 < power.power(8.0, math.sqrt(2), 2) < 0.55
    n = power.seeds_needed(2.0)
    assert power.power(1.0, 2.0, n) >= 0.8 > power.power(1.0, 2.0, n - 1)


def test_the_report_prints_the_power_table_under_the_paired_table():
    records = []
    for seed, gain in enumerate((1.0, 4.0, 2.5)):
        records += [make_record("pretrain", seed, tow=90.0, forget=70.0),
                    make_record("ssd", seed, tow=90.0 + gain, forget=70.0 - gain / 2)]
    text = report.markdown_report(records)
    paired_at, power_at = text.index("Paired with pretrain"), text.index("Power (80%")
    assert paired_at < power_at < text.index("Per run:")
    (row,) = report.paired(records)
    std = row["tow"]["std"]
    line = next(x for x in text.splitlines() if x.startswith("| ssd | 3 |"))
    cells = [c.strip() for c in line.strip("|").split("|")]
    assert cells[2] == f"{power.detectable_difference(std, 3):.2f}"
    assert cells[3] == f"{power.detectable_difference(row['forget_metric']['std'], 3):.2f}"
    assert cells[4] == str(power.seeds_needed(std))
    single = report.markdown_report([make_record("pretrain"), make_record("ssd")])
    assert "Power: one seed per method" in single and "Power (80%" not in single


def test_results_json_carries_the_power_rows(tmp_path):
    import json

    records = []
    for seed in range(3):
        records += [make_record("pretrain", seed, tow=90.0),
                    make_record("ssd", seed, tow=91.0 + seed)]
    report.write_report(str(tmp_path), records)
    with open(tmp_path / "results.json") as f:
        saved = json.load(f)
    (row,) = saved["power"]
    assert row["method"] == "ssd" and row["tow"]["n"] == 3
    assert row["tow"]["detectable"] == pytest.approx(power.detectable_difference(1.0, 3))
