"""The results report: table, aggregation over seeds, CSV, JSON, plots, atomic files."""

import csv
import importlib.util
import json
import math
import os

import numpy as np
import pytest
from matplotlib.container import BarContainer, ErrorbarContainer

from oneshui_jax import files, report
from oneshui_jax.cli import report as report_cli

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def make_record(method: str, seed: int = 0, *, retain: float = 65.1, forget: float = 68.2,
                test: float = 45.0, tow: float | None = 80.3, history: bool = True,
                mia: dict | None = None) -> dict:
    access = {"pretrain": "none", "retrain": "oracle"}.get(method, "stats")
    record = {"method": method, "access": access, "dataset": "synthfaces", "num_identities": 10,
              "seed": seed,
              "retain": {"metric": retain, "loss": 0.41}, "forget": {"metric": forget,
                                                                     "loss": 0.39},
              "test": {"metric": test, "loss": 0.61}, "val": {"metric": 44.8, "loss": 0.62},
              "tow": tow, "seconds": 101.2}
    if history:
        record["best_epoch"] = 1
        record["history"] = [{"epoch": e, "train_loss": 0.7 - 0.1 * e, "val_loss": 0.72 - 0.05 * e,
                              "val_metric": 40.0 + 2 * e, "lr": 1e-3} for e in range(3)]
    if mia is not None:
        record["mia"] = mia
    return record


@pytest.fixture
def records() -> list[dict]:
    return [make_record("pretrain", retain=65.1, forget=68.2, test=45.0, tow=80.3),
            make_record("retrain", retain=64.0, forget=50.5, test=44.5, tow=100.0)]


def table_rows(table: str) -> list[list[str]]:
    """The cells of a markdown table, header first, the separator line left out."""
    lines = [line for line in table.splitlines() if not line.startswith("|---")]
    return [[c.strip() for c in line.strip("|").split("|")] for line in lines]


def test_metric_name():
    assert [report.metric_name(d) for d in ("celeba", "celebahq", "synthfaces", "mufac")] == [
        "mAP", "mAP", "mAP", "acc"]
    with pytest.raises(ValueError, match="unknown dataset"):
        report.metric_name("imagenet")


def test_markdown_table_cells(records):
    records[1]["tow"] = None
    header, pretrain, retrain = table_rows(report.markdown_table(records, "mAP"))
    assert header == ["method", "access", "retain mAP", "forget mAP", "test mAP", "ToW",
                      "seconds"]
    assert pretrain == ["pretrain", "none", "65.10", "68.20", "45.00", "80.30", "101.20"]
    assert retrain[:2] == ["retrain", "oracle"] and retrain[5] == ""  # ToW blank when None
    del records[0]["access"]  # records written before the access column: a blank cell
    assert table_rows(report.markdown_table(records, "mAP"))[1][1] == ""


def test_markdown_table_attack_columns_only_when_present(records):
    assert "MIA" not in report.markdown_table(records, "mAP")
    records[0]["mia"] = {"auc": 55.0, "acc": 40.0}  # an older flat record: the loss attack's
    header, pretrain, retrain = table_rows(report.markdown_table(records, "acc"))
    assert header[2] == "retain acc" and header[6] == "loss-MIA AUC" and header[7] == "seconds"
    assert pretrain[6] == "55.00" and retrain[6] == ""
    records[0]["mia"] = {"loss_rf": {"auc": 56.0, "acc": 41.0},
                         "rmia": {"auc": 61.5, "tpr_at_1e-4": 2.5},
                         "rmia_fixed": {"auc": 58.25, "tpr_at_1pct": 3.0},
                         "per_person": {"mean": {"auc": 70.0}, "max": {"auc": 75.0}}}
    records[1]["mia"] = {"rmia": {"auc": 50.5, "tpr_at_1e-4": 0.0}}
    header, pretrain, retrain = table_rows(report.markdown_table(records, "mAP"))
    assert header[6:] == ["loss-MIA AUC", "RMIA AUC, ref. selection",
                          "RMIA TPR@0.01%FPR, ref. selection", "RMIA AUC, fixed point",
                          "RMIA TPR@1%FPR, fixed point", "person AUC", "seconds"]
    assert pretrain[6:12] == ["56.00", "61.50", "2.50", "58.25", "3.00", "70.00"]
    assert retrain[6:12] == ["", "50.50", "0.00", "", "", ""]
    assert report.record_stats(records[0])["loss_mia_acc"] == 41.0
    legend = report.legend("mAP", ["rmia_auc", "rmia_fixed_auc"])
    assert "RMIA AUC, ref. selection" in legend and "loss-MIA" not in legend
    assert "`config.mia.rmia_point`, fixed before the study" in legend


def test_summary_printed_when_a_study_ends():
    records = [make_record("pretrain"), make_record("retrain", forget=50.0)]
    lines = report.summary(records, "synthfaces", "CPU", "/work/run").split("\n")
    assert lines[:2] == ["", "synthfaces, N=10, seed 0 (CPU):"]
    assert "\n".join(lines[2:6]) == report.markdown_table(records, "mAP")
    assert lines[6:] == ["forget mAP: pretrain 68.20 vs retrain 50.00 (memorisation gap +18.20)",
                         "results: /work/run/results.md"]
    alone = report.summary(records[:1], "synthfaces", "CPU", "/w").split("\n")
    assert "forget" not in alone[-2] and alone[-1] == "results: /w/results.md"


def test_aggregate_mean_and_std_over_three_seeds():
    forget = [60.0, 62.0, 67.0]
    records = [make_record("pretrain", seed, forget=f) for seed, f in enumerate(forget)]
    records += [make_record("retrain", seed, tow=None if seed else 100.0) for seed in range(3)]
    assert report.has_repeated_seeds(records)
    pretrain, retrain = report.aggregate(records)
    assert pretrain["method"] == "pretrain" and pretrain["seeds"] == [0, 1, 2]
    assert pretrain["mean"]["forget_metric"] == pytest.approx(np.mean(forget))
    assert pretrain["std"]["forget_metric"] == pytest.approx(np.std(forget, ddof=1))
    assert pretrain["std"]["retain_metric"] == pytest.approx(0.0)
    assert pretrain["mean"]["loss_mia_auc"] is None
    assert retrain["mean"]["tow"] == 100.0 and retrain["std"]["tow"] is None  # one seed has it

    # The 95% t-interval of the mean, by hand (retain is constant: a zero-width interval).
    mean, std = np.mean(forget), np.std(forget, ddof=1)
    half = T_975[2] * std / 3 ** 0.5
    assert pretrain["interval"]["forget_metric"] == pytest.approx((mean - half, mean + half))
    assert pretrain["interval"]["retain_metric"] == pytest.approx((65.1, 65.1))
    assert retrain["interval"]["tow"] is None and pretrain["interval"]["rmia_auc"] is None

    _, row, rrow = table_rows(report.markdown_table([pretrain, retrain], "mAP"))
    assert row[1] == "none"
    assert row[3] == f"{mean:.2f} ± {std:.2f} [{mean - half:.2f}, {mean + half:.2f}]"
    assert row[6] == "101.20 ± 0.00"  # seconds: no interval
    assert rrow[5] == "100.00"  # ToW of one seed: no std, no interval


T_975 = {2: 4.302652729911275, 3: 3.182446305284263}  # Student's t quantiles, df 2 and 3


def test_pairing_follows_the_split_not_the_order_of_studies():
    """Studies combined in any order: each method pairs with the pretrain of its own split
    (splits_hash), also when two studies share a seed but not the split; a split combined twice
    is refused."""
    def rec(method, seed, split, tow):
        r = make_record(method, seed, tow=tow)
        r["splits_hash"] = split
        return r

    records = [rec("ssd", 0, "a", 91.0), rec("pretrain", 1, "b", 70.0), rec("ssd", 1, "b", 75.0),
               rec("pretrain", 0, "a", 90.0),
               # seed 0 again, another split (e.g. other synthfaces size): its own pretrain
               rec("pretrain", 0, "c", 50.0), rec("ssd", 0, "c", 58.0),
               rec("ssd", 2, "d", 99.0)]  # no pretrain for split d: left out
    (row,) = report.paired(records)
    assert row["seeds"] == [0, 0, 1]
    assert sorted(row["tow"]["values"]) == pytest.approx([1.0, 5.0, 8.0])
    with pytest.raises(ValueError, match="two ssd records .* seed 1 on the same split"):
        report.paired(records + [rec("ssd", 1, "b", 80.0)])


def test_paired_differences_are_taken_seed_by_seed():
    """Differences against pretrain of the same seed (records in scrambled order), their sample
    std and 95% t-interval, by hand; a seed without pretrain and N without one are left out."""
    pre_tow, pre_forget = {0: 90.0, 1: 80.0, 2: 95.0}, {0: 70.0, 1: 75.0, 2: 60.0}
    gain, forget_drop = {0: 1.0, 1: 4.0, 2: 2.5}, {0: -3.0, 1: -1.0, 2: -2.0}
    records = [make_record("ssd", s, tow=pre_tow[s] + gain[s], forget=pre_forget[s] +
                           forget_drop[s]) for s in (2, 0, 1)]
    records += [make_record("pretrain", s, tow=pre_tow[s], forget=pre_forget[s])
                for s in (1, 2, 0)]
    records.append(make_record("ssd", 3, tow=10.0))  # no pretrain for seed 3
    other_n = make_record("lipschitz", 0)
    other_n["num_identities"] = 50  # no pretrain for N = 50
    (row,) = report.paired(records + [other_n])
    assert (row["method"], row["seeds"], row["baseline"]) == ("ssd", [0, 1, 2], "pretrain")
    diffs = [gain[s] for s in (0, 1, 2)]
    assert row["tow"]["values"] == pytest.approx(diffs)
    mean, std = sum(diffs) / 3, (sum((d - 2.5) ** 2 for d in diffs) / 2) ** 0.5
    assert (row["tow"]["mean"], row["tow"]["std"]) == (pytest.approx(mean), pytest.approx(std))
    half = T_975[2] * std / 3 ** 0.5
    assert row["tow"]["interval"] == pytest.approx((mean - half, mean + half))
    assert row["forget_metric"]["values"] == pytest.approx([-3.0, -1.0, -2.0])
    assert row["retain_metric"]["values"] == pytest.approx([0.0, 0.0, 0.0])
    with_four = report.paired([*records, make_record("pretrain", 3, tow=4.0)])[0]
    d4 = [*diffs, 6.0]
    m4, s4 = sum(d4) / 4, float(np.std(d4, ddof=1))
    assert with_four["tow"]["interval"] == pytest.approx((m4 - T_975[3] * s4 / 2,
                                                          m4 + T_975[3] * s4 / 2))
    _, cells = table_rows(report.paired_table([row], "mAP"))
    assert cells[:4] == ["ssd", "stats", "0, 1, 2", "+1.00, +4.00, +2.50"]
    assert cells[4] == f"+2.50 ± {std:.2f} [{mean - half:+.2f}, {mean + half:+.2f}]"
    single = report.paired([make_record("pretrain"), make_record("ssd", tow=81.0)])[0]
    assert single["tow"]["std"] is None and single["tow"]["interval"] is None
    assert report.paired_table([single], "mAP").splitlines()[-1].split("|")[5].strip() == "+0.70"


def test_differences_figure_plots_the_paired_means_and_intervals():
    """Left: forget metric − retrain's; right: ToW − pretrain's; per method, seed by seed."""
    records = []
    for seed in range(3):
        records += [make_record("pretrain", seed, forget=70.0 + seed, tow=90.0 + seed),
                    make_record("retrain", seed, forget=60.0, tow=100.0),
                    make_record("ssd", seed, forget=65.0 + 2 * seed, tow=91.0 + 3 * seed)]
    fig = report.differences_figure(records, "mAP")
    gap_ax, tow_ax = fig.axes
    labels = [t.get_text() for t in gap_ax.get_yticklabels()]
    assert labels == ["pretrain", "retrain", "ssd"]  # the records' order
    # Left panel, ssd (row 2): gaps 5, 7, 9 -> mean 7; pretrain (row 0): 10, 11, 12.
    means = {int(round(line.get_ydata()[0])): line.get_xdata()[0] for line in gap_ax.lines
             if line.get_marker() == "o"}
    assert means == {0: pytest.approx(11.0), 2: pytest.approx(7.0)}
    ticks = sorted(x for line in gap_ax.lines if line.get_marker() == "x"
                   for x, y in zip(line.get_xdata(), line.get_ydata(), strict=True) if y == 2)
    assert ticks == pytest.approx([5.0, 7.0, 9.0])
    # Right panel: ssd 1, 3, 5 -> mean 3 with the t-interval; retrain 10, 9, 8 -> 9.
    means = {int(round(line.get_ydata()[0])): line.get_xdata()[0] for line in tow_ax.lines
             if line.get_marker() == "o"}
    assert means == {2: pytest.approx(3.0), 1: pytest.approx(9.0)}
    (ssd_row,) = [r for r in report.paired(records) if r["method"] == "ssd"]
    lo, hi = ssd_row["tow"]["interval"]
    bars = [c for c in tow_ax.containers if isinstance(c, ErrorbarContainer)]
    segments = [seg for c in bars for seg in c.lines[2][0].get_segments()]
    assert any(np.allclose(seg[:, 0], [lo, hi]) and np.allclose(seg[:, 1], 2) for seg in segments)
    assert report.differences_figure([make_record("ssd")], "mAP") is None  # nothing to pair
    assert gap_ax.get_xscale() == tow_ax.get_xscale() == "linear"  # a span of a few points
    assert fig._suptitle.get_text() == ("synthfaces, N=10, seeds 0, 1, 2: mean and 95% "
                                        "t-interval over 3 seeds, single seeds (x)")
    assert {t.get_text() for t in gap_ax.texts} == {"+11.00", "+7.00"}  # each mean, signed
    # A method that destroys the model (ToW -60) next to ones that move it by tenths: the ToW
    # panel turns to a symmetric log scale, the forget panel (a span of a few points) does not.
    records += [make_record("lipschitz", seed, forget=65.0, tow=30.0 + seed) for seed in range(3)]
    gap_ax, tow_ax = report.differences_figure(records, "mAP").axes
    assert tow_ax.get_xscale() == "symlog" and gap_ax.get_xscale() == "linear"


def test_differences_figure_with_one_seed_says_so_and_labels_each_difference():
    """One seed: a dot per method at its difference, labelled with the value, no interval bar
    and no cross hidden under the dot; the title says that there is no interval."""
    records = [make_record("pretrain", forget=70.0, tow=90.0),
               make_record("retrain", forget=60.0, tow=100.0),
               make_record("ssd", forget=64.5, tow=92.25)]
    fig = report.differences_figure(records, "mAP")
    gap_ax, tow_ax = fig.axes
    assert "seed 0: one seed: each dot is that seed's difference (no interval" in (
        fig._suptitle.get_text())
    assert not [c for ax in fig.axes for c in ax.containers if isinstance(c, ErrorbarContainer)]
    assert not [line for ax in fig.axes for line in ax.lines if line.get_marker() == "x"]
    assert [t.get_text() for t in gap_ax.texts] == ["+10.00", "+4.50"]  # pretrain, ssd
    assert [t.get_text() for t in tow_ax.texts] == ["+10.00", "+2.25"]  # retrain, ssd


@pytest.mark.parametrize("seeds,expected", [((0,), "synthfaces, N=10, seed 0"),
                                            ((0, 1, 2), "synthfaces, N=10, seeds 0, 1, 2")])
def test_every_figure_is_titled_with_dataset_n_and_seeds(seeds, expected):
    records = []
    for seed in seeds:
        records += [_with_roc(make_record("pretrain", seed), "loss_rf", 55.0, [0.0, 1.0],
                              [0.0, 1.0]),
                    make_record("retrain", seed, forget=50.0, tow=100.0),
                    make_record("ssd", seed, forget=60.0, tow=90.0)]
    figures = {"methods": report.method_bars_figure(records, "mAP"),
               "training curves": report.training_curves_figure(records),
               "differences": report.differences_figure(records, "mAP"),
               "roc": report.roc_figure(records)}
    for name, fig in figures.items():
        titles = [fig._suptitle.get_text() if fig._suptitle else ""]
        titles += [ax.get_title() for ax in fig.axes]
        assert any(t.startswith(expected) for t in titles), (name, titles)


def test_table_shows_seed_and_n_columns_when_they_vary():
    records = [make_record("pretrain", 0), make_record("pretrain", 1)]
    records[1]["num_identities"] = 50
    header = table_rows(report.markdown_table(records, "mAP"))[0]
    assert header[:4] == ["method", "access", "N", "seed"]


def test_csv_round_trip(tmp_path, records):
    records[1]["tow"] = None
    records[0]["mia"] = {"loss_rf": {"auc": np.float32(55.5), "acc": 40.0},
                         "rmia": {"auc": 60.0, "tpr_at_1e-4": 1.5}}
    path = report.write_csv(str(tmp_path / "results.csv"), records)
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        rows = list(reader)
    assert tuple(reader.fieldnames) == report.CSV_COLUMNS
    assert rows[0]["method"] == "pretrain" and int(rows[0]["num_identities"]) == 10
    assert rows[0]["access"] == "none" and rows[1]["access"] == "oracle"
    assert float(rows[0]["forget_metric"]) == pytest.approx(68.2)
    assert float(rows[0]["val_loss"]) == pytest.approx(0.62)
    assert float(rows[0]["loss_mia_auc"]) == pytest.approx(55.5)
    assert float(rows[0]["rmia_tpr"]) == pytest.approx(1.5) and rows[0]["person_auc"] == ""
    assert rows[1]["tow"] == "" and rows[1]["loss_mia_auc"] == "" and rows[1]["rmia_auc"] == ""
    assert float(rows[1]["seconds"]) == pytest.approx(101.2)


def test_write_report_files_and_json_round_trip(tmp_path, records):
    records[0]["forget"]["metric"] = np.float64(68.25)
    records[0]["tow"] = np.float32(80.5)
    records[0]["history"][0]["lr"] = np.float32(1e-3)
    extra = {"splits": {"forget": np.int64(10)}, "seconds": np.float64(3.5)}
    written = report.write_report(str(tmp_path), records, config={"seed": 0, "crop": (0.35, 1)},
                                  extra=extra)
    expected = {"results.json", "results.md", "results.csv", "training_curves.png",
                "methods.png", "differences.png"}  # retrain's forget gap to itself is 0
    assert set(written) == expected
    assert sorted(os.listdir(tmp_path)) == sorted(expected)  # no temporary files left

    with open(written["results.json"]) as f:
        data = json.load(f)
    assert data["config"] == {"seed": 0, "crop": [0.35, 1]}
    assert data["splits"] == {"forget": 10} and data["seconds"] == 3.5
    assert data["results"][0]["forget"]["metric"] == 68.25
    assert data["results"][0]["tow"] == pytest.approx(80.5)
    assert data["results"][1]["history"] == records[1]["history"]

    with open(written["results.md"], encoding="utf-8") as f:
        md = f.read()
    assert md.startswith("# Results: synthfaces, N=10, seed 0\n")
    assert "| pretrain | none | 65.10 | 68.25 | 45.00 | 80.50 | 101.20 |" in md
    assert "ToW" in md and "higher is better" in md and "MIA" not in md

    for name in ("training_curves.png", "methods.png"):
        with open(written[name], "rb") as f:
            png = f.read()
        assert png.startswith(PNG_SIGNATURE) and len(png) > 10_000


def test_write_report_without_history_tow_or_mia(tmp_path):
    records = [make_record("pretrain", history=False, tow=None)]
    written = report.write_report(str(tmp_path), records)
    assert "training_curves.png" not in written
    assert sorted(os.listdir(tmp_path)) == ["methods.png", "results.csv", "results.json",
                                            "results.md"]
    with open(written["results.json"]) as f:
        assert json.load(f) == {"config": None, "results": records}


def test_write_report_averages_seeds_in_markdown(tmp_path):
    records = [make_record(m, seed, tow=100.0 if m == "retrain" else 80.3)
               for m in ("pretrain", "retrain") for seed in range(3)]
    written = report.write_report(str(tmp_path), records)
    with open(written["results.md"], encoding="utf-8") as f:
        md = f.read()
    assert md.startswith("# Results: synthfaces, N=10, seeds 0, 1, 2\n")
    assert "| pretrain | none | 65.10 ± 0.00 [65.10, 65.10] |" in md and "Per run:" in md
    assert "Paired with pretrain" in md and "| retrain | oracle | 0, 1, 2 |" in md
    with open(written["results.json"], encoding="utf-8") as f:
        (row,) = json.load(f)["paired"]
    assert row["method"] == "retrain" and row["tow"]["values"] == pytest.approx([19.7] * 3)


def test_write_report_rejects_clashing_extra(tmp_path, records):
    with pytest.raises(ValueError, match="extra"):
        report.write_report(str(tmp_path), records, extra={"results": []})
    assert os.listdir(tmp_path) == []


def test_method_bars_groups_and_retrain_reference(records):
    records.append(make_record("metaunlearn", forget=55.0, tow=None))
    fig = report.method_bars_figure(records, "mAP")
    ax = fig.axes[0]
    bars = [c for c in ax.containers if isinstance(c, BarContainer)]
    assert len(bars) == 3  # retain / forget / test
    assert all(len(c.patches) == 3 for c in bars)  # one bar per method in each
    assert [t.get_text() for t in ax.get_xticklabels()] == ["pretrain", "retrain", "metaunlearn"]
    assert bars[1].patches[0].get_height() == pytest.approx(68.2)
    reference = [c for c in ax.collections if c.get_label() == "retrain forget mAP"]
    assert len(reference) == 1 and reference[0].get_segments()[0][0][1] == pytest.approx(50.5)
    tows = [t.get_text() for t in ax.texts if t.get_text().startswith("ToW")]
    assert tows == ["ToW 80.30", "ToW 100.00"]  # metaunlearn has none


def test_method_bars_without_retrain_have_no_reference():
    fig = report.method_bars_figure([make_record("pretrain", tow=None)], "mAP")
    ax = fig.axes[0]
    assert not ax.collections or all(c.get_label() != "retrain forget mAP"
                                     for c in ax.collections)
    assert not [t for t in ax.texts if t.get_text().startswith("ToW")]


def test_training_curves_one_line_per_method(records):
    records.append(make_record("metaunlearn", history=False))
    fig = report.training_curves_figure(records)
    ax_loss, ax_metric = fig.axes
    assert len(ax_loss.get_lines()) == 4  # train and val loss of the two records with history
    labels = [line.get_label() for line in ax_metric.get_lines()]
    assert labels[::2] == ["pretrain", "retrain"]  # each followed by its best-epoch star
    assert [t.get_text() for t in fig.legends[0].get_texts()] == ["pretrain", "retrain"]
    assert report.training_curves_figure([make_record("x", history=False)]) is None


def test_method_bars_average_seeds_with_error_bars():
    records = [make_record(m, seed, forget=60.0 + seed) for m in ("pretrain", "retrain")
               for seed in range(3)]
    ax = report.method_bars_figure(records, "mAP").axes[0]
    bars = [c for c in ax.containers if isinstance(c, BarContainer)]
    assert [len(c.patches) for c in bars] == [2, 2, 2]  # two groups: pretrain, retrain
    assert bars[1].patches[0].get_height() == pytest.approx(61.0)
    assert sum(isinstance(c, ErrorbarContainer) for c in ax.containers) == 3


def test_atomic_open_keeps_old_file_on_error(tmp_path):
    path = tmp_path / "results.md"
    path.write_text("old")
    with pytest.raises(RuntimeError), files.atomic_open(str(path)) as f:
        f.write("new")
        raise RuntimeError("interrupted")
    assert path.read_text() == "old" and os.listdir(tmp_path) == ["results.md"]


def test_combine_averages_studies_over_seeds(tmp_path, capsys):
    paths = []
    for seed, forget in ((0, 60.0), (1, 64.0)):
        recs = [{"method": "pretrain", "dataset": "mufac", "num_identities": 5, "seed": seed,
                 "retain": {"metric": 50.0, "loss": 1.0}, "forget": {"metric": forget, "loss": 1.0},
                 "test": {"metric": 40.0, "loss": 1.0}, "val": {"metric": 40.0, "loss": 1.0},
                 "tow": 90.0 + seed, "seconds": 1.0}]
        config = {"dataset": "mufac", "num_identities": 5, "seed": seed,
                  "workdir": str(tmp_path / f"s{seed}"), "train": {"lr": 0.1}}
        report.write_report(str(tmp_path / f"s{seed}"), recs, config=config)
        paths.append(str(tmp_path / f"s{seed}" / "results.json"))
    with open(paths[1], "rb") as f:  # saved again by an editor that writes a byte-order mark
        text = f.read()
    with open(paths[1], "wb") as f:
        f.write(b"\xef\xbb\xbf" + text)
    assert report_cli.main(paths + ["--out", str(tmp_path / "all")]) == 0
    md = (tmp_path / "all" / "results.md").read_text()
    assert "62.00 ± 2.83" in md and "90.50 ± 0.71" in md
    saved = json.load(open(tmp_path / "all" / "results.json"))
    assert len(saved["results"]) == 2 and saved["sources"] == paths
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(SystemExit) as exit_:
        report_cli.main([str(tmp_path / "bad.json"), "--out", str(tmp_path / "x")])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err == (f"error: {tmp_path / 'bad.json'}: not a results.json written by a study "
                   "('results')\n"), err
    assert not (tmp_path / "x").exists()


def test_atomic_files_get_the_usual_permissions(tmp_path):
    files.save_json({"a": 1}, str(tmp_path / "x.json"))
    assert os.stat(tmp_path / "x.json").st_mode & 0o777 == 0o666 & ~files._UMASK


def _with_roc(record, attack, auc, fpr, tpr):
    entry = {"auc": auc, "roc": {"fpr": fpr, "tpr": tpr}}
    if attack == "per_person":
        record.setdefault("mia", {})[attack] = {"mean": entry}
    else:
        record.setdefault("mia", {})[attack] = entry
    return record


def test_roc_curves_average_seeds_and_write_roc_png(tmp_path):
    """One curve per (method, attack); several seeds: the mean TPR on a common FPR grid and the
    mean AUC (as a fraction); roc.png written and linked only when some record has ROC points."""
    records = [_with_roc(make_record("ssd", s), "rmia", 60.0 + 2 * s, [0.0, 0.5, 1.0],
                         [0.0, 0.4 + 0.2 * s, 1.0]) for s in range(2)]
    pretrain = _with_roc(make_record("pretrain"), "loss_rf", 55.0, [0.0, 1.0], [0.0, 1.0])
    records.append(_with_roc(pretrain, "per_person", 80.0, [0.0, 0.25, 1.0], [0.0, 0.9, 1.0]))
    curves = report.roc_curves(records)
    assert set(curves) == {"ssd", "pretrain"} and set(curves["pretrain"]) == {"loss_rf",
                                                                              "per_person"}
    fpr, tpr, auc = curves["ssd"]["rmia"]
    assert auc == pytest.approx(0.61)
    expected = np.mean([np.interp(fpr, [0.0, 0.5, 1.0], [0.0, 0.4 + 0.2 * s, 1.0])
                        for s in range(2)], axis=0)
    np.testing.assert_allclose(tpr, expected)
    assert np.interp(0.5, fpr, tpr) == pytest.approx(0.5)
    assert curves["pretrain"]["per_person"] == ([0.0, 0.25, 1.0], [0.0, 0.9, 1.0], 0.8)
    written = report.write_report(str(tmp_path), records)
    assert "roc.png" in written
    with open(written["roc.png"], "rb") as f:
        assert f.read(8) == PNG_SIGNATURE
    with open(written["results.md"], encoding="utf-8") as f:
        assert "[roc.png](roc.png)" in f.read()
    fig = report.roc_figure(records)
    assert [ax.get_title() for ax in fig.axes] == ["rmia", "loss_rf", "per_person"]
    assert report.roc_figure([make_record("ssd")]) is None


@pytest.mark.parametrize("mia,field", [
    ({"loss_rf": {"auc": "high"}}, "mia.loss_rf.auc"),
    ({"rmia": {"auc": 50.0, "tpr_at_1e-4": None, "roc": {"fpr": [0.0], "tpr": []}}},
     "mia.rmia.roc"),
    ({"per_person": {"mean": {"auc": 50.0, "roc": {"fpr": ["a"], "tpr": [1.0]}}}},
     "mia.per_person.mean.roc"),
])
def test_attack_fields_are_checked(mia, field):
    record = make_record("ssd", mia=mia)
    assert field in report.record_problem(record)


# ---------------------------------------------------------------------------------------------
# Combining studies: only the seeds (and N) of one study, unless grouped by config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_CONFIG_MODULES: dict = {}


def study_config(name: str = "synthfaces", arg: str | None = None, **changes) -> dict:
    """``configs/<name>.py``'s ``get_config(arg)`` as its study writes it into results.json,
    with ``changes`` (``train__lr=0.01`` sets ``train.lr``)."""
    if name not in _CONFIG_MODULES:
        spec = importlib.util.spec_from_file_location(
            f"report_test_{name}", os.path.join(REPO, "configs", f"{name}.py"))
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        _CONFIG_MODULES[name] = module
    config = files.to_json(_CONFIG_MODULES[name].get_config(arg).to_dict())
    for dotted, value in changes.items():
        *blocks, key = dotted.split("__")
        node = config
        for block in blocks:
            node = node[block]
        node[key] = value
    return config


def plant_study(folder, config: dict | None, seed: int = 0, *, forget: float = 68.2,
                dataset: str = "synthfaces", **extra) -> str:
    """A study's results.json (pretrain, retrain, ssd records of ``config``'s N) in ``folder``,
    written as a study writes it (NaN and infinities as JSON's NaN / Infinity literals)."""
    n = (config or {}).get("num_identities", 10)
    records = [make_record(m, seed, forget=forget + (i == 2), tow=100.0 if m == "retrain" else
                           80.0 + seed) for i, m in enumerate(("pretrain", "retrain", "ssd"))]
    for r in records:
        r.update(dataset=dataset, num_identities=n, splits_hash=f"split{seed}")
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(str(folder), "results.json")
    with open(path, "w") as f:
        json.dump({"config": config, "results": records, **extra}, f)
    return path


def run_report(capsys, argv: list[str]) -> tuple[int, str]:
    """``report_cli.main(argv)`` in-process: (exit status, stderr)."""
    try:
        status = report_cli.main(argv)
    except SystemExit as e:
        status = e.code
    return status, capsys.readouterr().err


def assert_refused(capsys, argv: list[str], out, *words: str) -> str:
    """``argv`` exits 2 with one ``error:`` line naming ``words``; ``out`` is not created."""
    status, err = run_report(capsys, [*argv, "--out", str(out)])
    assert status == 2, err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    for word in words:
        assert word in err, (word, err)
    assert not os.path.exists(out)
    return err


@pytest.mark.parametrize("setting, value", [
    ("train.lr", 0.01), ("data.synthfaces_config", "small"), ("ssd.dampening_constant", 0.5),
    ("data.eval_batch_size", 32), ("model.init_scheme", "timm"), ("mia.batch_size", 32),
    ("data.crop_scale", [0.08, 1.0]),
], ids=["train_lr", "synthfaces_variant", "method_setting", "eval_batch", "init_scheme",
        "mia_batch", "crop"])
def test_report_refuses_studies_of_other_settings(capsys, tmp_path, setting, value):
    """Two seeds whose configs differ in a setting that changes results: one error line naming
    both files and the difference, exit status 2, nothing written."""
    base = study_config(seed=0)
    block, key = setting.split(".")
    listed = f"{setting} {base[block][key]!r} vs {value!r}"
    first = plant_study(tmp_path / "s0", base)
    second = plant_study(tmp_path / "s1", study_config(
        seed=1, workdir="w1", **{setting.replace(".", "__"): value}), seed=1)
    err = assert_refused(capsys, [first, second], tmp_path / "out",
                         f"error: config differs between {first} and {second}: {listed}",
                         "pass --group_by_config")
    assert "seed" not in err.split(": ", 2)[2].split(";")[0]  # seed, workdir: not listed


def test_report_lists_every_difference_and_compares_every_pair(capsys, tmp_path):
    """The listing names every differing setting (sorted, as the reuse check lists them); a
    third study is checked against each of the others, not only the first."""
    a = plant_study(tmp_path / "a", study_config(seed=0))
    b = plant_study(tmp_path / "b", study_config(seed=1), seed=1)
    c = plant_study(tmp_path / "c", study_config(seed=2, train__lr=0.01, train__epochs=3,
                                                 dataset="celeba"), seed=2)
    assert_refused(capsys, [a, b, c], tmp_path / "out",
                   f"between {a} and {c}: dataset 'synthfaces' vs 'celeba'; train.epochs 20 vs "
                   "3; train.lr 0.001 vs 0.01;")
    synth_n5 = plant_study(tmp_path / "n5", study_config(arg="N=5", seed=1, train__lr=0.01),
                           seed=1)
    assert_refused(capsys, [a, synth_n5], tmp_path / "out", "train.lr 0.001 vs 0.01")


def test_report_combines_seeds_that_differ_only_in_seeds_paths_and_logging(capsys, tmp_path):
    """Seeds of one study: seed, split_seed, workdir, checkpoint_dir, data paths, logging,
    remat and the devices may differ; the records are averaged as today, with no groups."""
    first = plant_study(tmp_path / "s0", study_config(seed=0), forget=60.0)
    second = plant_study(tmp_path / "s1", study_config(
        seed=1, split_seed=0, workdir="elsewhere", checkpoint_dir="/scratch/ckpt",
        checkpoint_every_s=0.0, wait_for_lock=False, progress=False, tensorboard=False,
        stages=["pretrain", "retrain"], data__data_dir="/data", data__tfds_dir="/tfds",
        data__num_threads=8, data__in_memory=False, mia__cache_mb=0, mesh__data=1,
        train__remat=True, meta_unlearn__remat=True, train__ap_scores="float32"),
        seed=1, forget=64.0)
    status, err = run_report(capsys, [first, second, "--out", str(tmp_path / "out")])
    assert status == 0, err
    md = (tmp_path / "out" / "results.md").read_text()
    assert "| pretrain | none | 65.10 ± 0.00" in md and "62.00 ± 2.83" in md
    assert "config" not in md.split("Per run:")[0]  # no config column
    saved = json.load(open(tmp_path / "out" / "results.json"))
    assert all("group" not in r for r in saved["results"])


def test_report_combines_the_papers_n_grid(capsys, tmp_path):
    """Studies of different N may differ in the methods' blocks (the reference tunes them per
    N: MUFAC's MetaUnlearn lr, PGU, SCRUB, SSD), not in the blocks every stage reads."""
    n5 = plant_study(tmp_path / "n5", study_config("mufac", "method=all,N=5"), dataset="mufac")
    n10 = plant_study(tmp_path / "n10", study_config("mufac", "method=all,N=10", seed=1),
                      seed=1, dataset="mufac")
    assert report.load_records([n5, n10])  # the real configs differ per N: combined
    status, err = run_report(capsys, [n5, n10, "--out", str(tmp_path / "out")])
    assert status == 0, err
    header = table_rows((tmp_path / "out" / "results.md").read_text().split("\n\n")[1])[0]
    assert header[:3] == ["method", "access", "N"]
    lr = plant_study(tmp_path / "lr", study_config("mufac", "method=all,N=10", seed=1,
                                                   train__lr=0.5), seed=1, dataset="mufac")
    assert_refused(capsys, [n5, lr], tmp_path / "refused", "train.lr 0.001 vs 0.5")


def test_group_by_config_reports_each_config_as_its_own_rows(capsys, tmp_path):
    """--group_by_config: two lr, two seeds each: four studies, two groups of rows labelled by
    the setting that differs (results.md, csv, json, plots); seeds averaged within a group."""
    paths = [plant_study(tmp_path / f"lr{lr}_s{seed}", study_config(seed=seed, train__lr=lr),
                         seed, forget=forget)
             for lr, forget in ((0.001, 60.0), (0.01, 70.0)) for seed in (0, 1)]
    out = tmp_path / "out"
    status, err = run_report(capsys, [*paths, "--group_by_config", "--out", str(out)])
    assert status == 0, err
    md = (out / "results.md").read_text()
    rows = table_rows(md.split("\n\n")[2])
    assert rows[0][:3] == ["method", "config", "access"]
    assert [r[:2] for r in rows[1:]] == [[m, f"train.lr={lr}"] for lr in (0.001, 0.01)
                                         for m in ("pretrain", "retrain", "ssd")]
    assert rows[1][4] == "60.00 ± 0.00 [60.00, 60.00]"  # forget: within the group only
    assert rows[4][4] == "70.00 ± 0.00 [70.00, 70.00]"
    paired_rows = table_rows(md.split("\n\n")[4])
    assert [r[:2] for r in paired_rows[1:]] == [["retrain", "train.lr=0.001"],
                                                ["ssd", "train.lr=0.001"],
                                                ["retrain", "train.lr=0.01"],
                                                ["ssd", "train.lr=0.01"]]
    saved = json.load(open(out / "results.json"))
    assert [r["group"] for r in saved["results"]] == ["train.lr=0.001"] * 6 + [
        "train.lr=0.01"] * 6
    with open(out / "results.csv", newline="") as f:
        csv_rows = list(csv.DictReader(f))
    assert {r["group"] for r in csv_rows} == {"train.lr=0.001", "train.lr=0.01"}
    ax = report.method_bars_figure(saved["results"], "mAP").axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()][:2] == ["pretrain\ntrain.lr=0.001",
                                                                "retrain\ntrain.lr=0.001"]
    labels = [t.get_text() for t in
              report.differences_figure(saved["results"], "mAP").axes[0].get_yticklabels()]
    assert "ssd (train.lr=0.01)" in labels
    # The combined report alone (it has no config) keeps its groups; grouped with another
    # study, its groups stay apart under its path.
    again = tmp_path / "again"
    assert run_report(capsys, [str(out / "results.json"), "--out", str(again)])[0] == 0
    assert table_rows((again / "results.md").read_text().split("\n\n")[2])[0][1] == "config"
    combined = str(out / "results.json")
    status, err = run_report(capsys, [combined, paths[0], "--group_by_config", "--out",
                                      str(tmp_path / "more")])
    assert status == 0, err
    saved = json.load(open(tmp_path / "more" / "results.json"))
    assert [r["group"] for r in saved["results"]][::3] == [
        f"{combined} | train.lr=0.001", f"{combined} | train.lr=0.001",
        f"{combined} | train.lr=0.01", f"{combined} | train.lr=0.01",
        "(studies with a config)"]
    saved["results"][0]["group"] = 1  # a group label that is not one: refused
    bad = plant_study(tmp_path / "bad", None)
    with open(bad, "w") as f:
        json.dump(saved, f)
    with pytest.raises(ValueError, match="record 0 has group 1; expected a string"):
        report.load_records([bad])


def test_a_file_without_config_is_refused_among_several(capsys, tmp_path):
    """Its settings cannot be checked: refused naming it; with --group_by_config it is a group
    of its own, labelled by its path; alone it is reported as before."""
    study = plant_study(tmp_path / "s0", study_config(seed=0))
    bare = plant_study(tmp_path / "bare", None, seed=1)
    assert_refused(capsys, [study, bare], tmp_path / "out", f"error: {bare} has no config",
                   f"checked against those of {study}", "--group_by_config")
    status, err = run_report(capsys, [study, bare, "--group_by_config", "--out",
                                      str(tmp_path / "grouped")])
    assert status == 0, err
    saved = json.load(open(tmp_path / "grouped" / "results.json"))
    assert {r["group"] for r in saved["results"]} == {"(studies with a config)", bare}
    assert run_report(capsys, [bare, "--out", str(tmp_path / "alone")])[0] == 0
    mufac = plant_study(tmp_path / "mufac", None, seed=1, dataset="mufac")
    assert_refused(capsys, [bare, mufac], tmp_path / "out",  # the task first, then the config
                   "error: records mix metrics ['acc', 'mAP']; report one task at a time")


def test_report_compares_data_fingerprints_where_both_have_one(capsys, tmp_path):
    """Data paths may differ, the data may not: a results.json that records the data's
    fingerprint is refused next to one with another; without one on either side, accepted."""
    a = plant_study(tmp_path / "a", study_config(seed=0), data_fingerprint="abc")
    b = plant_study(tmp_path / "b", study_config(seed=1, data__data_dir="/other"), seed=1,
                    data_fingerprint="def")
    old = plant_study(tmp_path / "old", study_config(seed=2), seed=2)
    assert_refused(capsys, [a, b], tmp_path / "out", "data_fingerprint 'abc' vs 'def'")
    assert len(report.load_records([a, old])) == 6


@pytest.mark.parametrize("field, value", [
    ("forget.metric", math.nan), ("tow", math.inf), ("mia.rmia.auc", -math.inf),
    ("history[1].val_loss", math.nan), ("mia.loss_rf.roc.tpr[1]", math.nan),
    ("seconds", math.inf), ("prepare.meta_history[0].relative_step", math.nan),
])
def test_report_refuses_nan_and_infinite_numbers(capsys, tmp_path, field, value):
    """A NaN or infinite number (json.load reads NaN / Infinity literals, as a study whose model
    diverged writes them) is refused naming the file, the record and the field."""
    path = plant_study(tmp_path / "s0", study_config(seed=0))
    data = json.load(open(path))
    record = data["results"][1]
    record.setdefault("mia", {})["rmia"] = {"auc": 55.0}
    record["mia"]["loss_rf"] = {"auc": 50.0, "roc": {"fpr": [0.0, 0.5, 1.0],
                                                     "tpr": [0.0, 0.5, 1.0]}}
    record["prepare"] = {"meta_history": [dict(zip(("epoch", *report.META_FIELDS),
                                                    (0, 0.1, 0.1, 1e-3, 0.0, 0.2),
                                                    strict=True))]}
    assert report.record_problem(record) is None
    node, keys = record, field.replace("[", ".").replace("]", "").split(".")
    for key in keys[:-1]:
        node = node[int(key)] if key.isdigit() else node[key]
    node[int(keys[-1]) if keys[-1].isdigit() else keys[-1]] = value
    with open(path, "w") as f:
        json.dump(data, f)  # NaN, Infinity, -Infinity literals
    other = plant_study(tmp_path / "s1", study_config(seed=1), seed=1)
    assert_refused(capsys, [other, path], tmp_path / "out",
                   f"error: {path}: record 1 has {field} {value!r}; expected a finite number")


def test_null_numbers_stay_allowed(tmp_path):
    """None is a missing number (ToW without a retrained model, an attack that did not run),
    not a bad one."""
    record = make_record("ssd", tow=None, mia={"rmia": {"auc": None, "tpr_at_1e-4": None}})
    record["history"][0]["val_metric"] = None
    assert report.record_problem(record) is None


def test_a_method_has_one_colour_in_every_plot_and_panel():
    """The paper's rows keep fixed colours whatever the study holds; a method missing from the
    first panel of roc.png (so matplotlib's cycle would shift) keeps its colour in the others;
    training curves, differences and ROC agree; AUCs are shown in %."""
    from matplotlib.colors import to_hex

    from oneshui_jax.report import plots

    assert plots.method_colors(["scrub", "mine", "pretrain"]) == {
        "scrub": "C7", "mine": plots._MORE_COLORS[0], "pretrain": "C0"}
    records = [_with_roc(make_record("ssd"), "rmia", 60.0, [0.0, 0.5, 1.0], [0.0, 0.4, 1.0]),
               make_record("retrain", forget=50.0, tow=100.0),
               make_record("mine", forget=60.0, tow=90.0)]
    records[0]["mia"]["loss_rf"] = {"auc": 52.0, "roc": {"fpr": [0.0, 1.0], "tpr": [0.0, 1.0]}}
    records[2] = _with_roc(records[2], "loss_rf", 58.0, [0.0, 1.0], [0.0, 1.0])
    records.insert(0, _with_roc(make_record("pretrain"), "loss_rf", 55.0, [0.0, 1.0],
                                [0.0, 1.0]))
    expected = {m: to_hex(c) for m, c in plots.method_colors(
        [r["method"] for r in records]).items()}
    seen: dict[str, set[str]] = {}

    def lines_of(fig):
        for ax in fig.axes:
            for line in ax.get_lines():
                name = line.get_label().split(" (")[0]
                if name in expected:
                    seen.setdefault(name, set()).add(to_hex(line.get_color()))

    roc = report.roc_figure(records)
    assert [ax.get_title() for ax in roc.axes] == ["loss_rf", "rmia"]
    lines_of(roc)
    legend = [t.get_text() for t in roc.axes[1].get_legend().get_texts()]
    assert "ssd (AUC 60.0%)" in legend
    lines_of(report.training_curves_figure(records))
    differences = report.differences_figure(records, "mAP")
    labels = [t.get_text() for t in differences.axes[0].get_yticklabels()]
    for ax in differences.axes:
        for line in ax.get_lines():
            y = line.get_ydata()
            if line.get_marker() == "o" and len(y) == 1:
                seen.setdefault(labels[int(y[0])], set()).add(to_hex(line.get_color()))
    assert set(seen) >= {"pretrain", "ssd", "mine"}
    assert {m: colours for m, colours in seen.items()} == {m: {expected[m]} for m in seen}


def test_the_noise_floor_of_tow_is_the_second_oracles():
    """One seed: a line names retrain_2's ToW and the methods at or above it. Several seeds: the
    paired table gains ToW − retrain_2's per method and whether its interval reaches 0, and a
    line says where pretrain stands."""
    from oneshui_jax.report import tables

    one = [make_record("pretrain", tow=90.0), make_record("retrain", tow=100.0),
           make_record("retrain_2", tow=96.0), make_record("ssd", tow=96.0),
           make_record("meta_unlearn", tow=95.9)]
    line = tables.floor_line(one)
    assert line.startswith("ToW noise floor: a second retrained model (retrain_2")
    assert "scores ToW 96.00 against retrain" in line and "pretrain: below it." in line
    assert line.endswith("At or above: ssd; below: meta_unlearn.")
    assert line in report.markdown_report(one)
    assert tables.floor_line(one[:2] + one[3:]) is None  # no retrain_2
    records = []
    for seed in range(3):
        records += [make_record("pretrain", seed, tow=90.0),
                    make_record("retrain", seed, tow=100.0),
                    make_record("retrain_2", seed, tow=96.0 + seed),
                    make_record("ssd", seed, tow=97.0 - 2 * seed),
                    make_record("meta_unlearn", seed, tow=91.0 + seed * 0.1)]
    floor = report.stats.oracle_floor(records)
    ssd = floor[(None, "ssd", 10)]
    assert ssd["values"] == pytest.approx([1.0, -2.0, -5.0])
    assert ssd["floor"] == pytest.approx(97.0)
    assert ssd["reaches"] and ssd["interval"][1] > 0 > ssd["mean"]
    assert not floor[(None, "meta_unlearn", 10)]["reaches"]
    text = report.markdown_report(records)
    header, *rows = table_rows(text[text.index("| method | access | seeds"):].split("\n\n")[0])
    assert header[-2:] == ["ToW − retrain_2's", "within the oracles' spread"]
    verdict = {r[0]: r[-1] for r in rows}
    assert verdict == {"retrain": "yes", "retrain_2": "", "ssd": "yes", "meta_unlearn": "no"}
    assert "pretrain, N=10: ToW − retrain_2's -7.00 ± 1.00" in text
    assert "outside the oracles' spread" in text
