"""The results report: the paper-style table and plots of a study.

Rows are methods (pretrain, retrain, unlearning methods); columns are the task metric on the
retain / forget / test identities, ToW against the retrained model and, when measured, the MIA
AUC, as in the tables of De Min et al. (TMLR 2025). Runs of several seeds are summarised as
``mean ± std`` per (method, N) and, because the spread between seeds (splits) hides differences
between methods, as differences paired with pretrain on the same split (``paired``): per seed,
their mean, sample std and 95% t-interval.

``write_report`` writes, atomically, into a study's workdir:

* ``results.json``: ``{"config": ..., "results": records, **extra}`` (plus ``paired`` when seeds
  are averaged), numpy values made plain;
* ``results.md``: a title line, the table (with, when seeds are averaged, the paired differences
  and the per-run table), a legend;
* ``results.csv``: one flat row per record (``CSV_COLUMNS``);
* ``training_curves.png``: losses and validation metric per epoch (only when a record has a
  ``history``);
* ``meta_diagnostics.png``: MetaUnlearn's learned step on held-out simulated requests per
  meta-training epoch (only when a record's ``prepare.meta_history`` has the diagnostics);
* ``methods.png``: retain / forget / test metric bars per method, ToW above each group;
* ``differences.png``: per method, the forget metric's gap to retrain and the ToW gain over
  pretrain, each paired on the same split, with 95% intervals over seeds (only when the records
  have a retrain or pretrain to pair with);
* ``roc.png``: the ROC curves of the membership attacks, one panel per attack, every method, FPR
  on a log scale (only when records carry ROC points under ``mia``).

Attack results live under ``record["mia"]`` (``ATTACK_STATS``, all in %): ``loss_rf`` (``auc``,
``acc``), ``rmia`` (``auc``, ``tpr_at_1e-4``, ``tpr_at_1pct``), ``per_person`` (``mean`` /
``max``: ``auc``), each optionally with ``roc = {"fpr": [...], "tpr": [...]}``.

Combining studies (``python -m oneshui_jax.report --out DIR results.json ...``, ``combine``)
averages the seeds of one study, per N: the studies' configs (each ``results.json`` keeps its
study's) may differ only in the settings of ``NOT_COMPARED`` (the seeds, output paths, logging
and other settings that change no result), in ``remat`` (as the study's reuse check) and in N;
studies of different N may also differ in the methods' blocks, which the reference tunes per N
(``config_differences``). Any other difference (``train.lr``, the SynthFaces variant
``data.synthfaces_config``, the dataset, ...) is refused with the differences listed, naming
both files: ``config differs between A and B: train.lr 0.001 vs 0.01``. With
``--group_by_config`` each distinct config is instead a group of rows of its own: every record
gets ``group``, a label of the settings that tell the configs apart (``train.lr=0.01``), shown
as the ``config`` column of the tables and in the plots' labels (``group`` in the CSV), and
seeds are averaged and paired within a group only. Of several files, one without a config (a
hand-made file, or a combined report, which names its studies under ``sources``) is refused,
as its settings cannot be checked; with ``--group_by_config`` it is a group of its own,
labelled by its path. Every number the report reads must be finite: a NaN or infinite metric
(a model that diverged) is refused naming the file, the record and the field.

Plots use matplotlib's object-oriented API on an Agg canvas (``Figure``, not ``pyplot``): they
work without a display, touch no global backend, and are freed with the ``Figure`` object. The
``*_figure`` functions return the figure, for inspection.
"""

from __future__ import annotations

import csv
import json
import math
import os
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import scipy.stats
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from oneshui_jax.data import catalog
from oneshui_jax.files import atomic_open, atomic_set, cannot_write_in, os_error_line, to_json
from oneshui_jax.metrics import EVAL_SPLITS, TABLE_SPLITS

# The privacy evaluation's numbers in a record (all in %): stat name -> (path under
# ``record["mia"]``, column header or None for CSV / JSON only). ``loss_rf``: the reference's
# random-forest loss attack (SPEC.md 5.4); ``rmia``: RMIA with one reference model (5.5), its
# selected (γ, a); ``per_person``: the attack on people (each person's mean score).
ATTACK_STATS: dict[str, tuple[tuple[str, ...], str | None]] = {
    "loss_mia_auc": (("loss_rf", "auc"), "loss-MIA AUC"),
    "loss_mia_acc": (("loss_rf", "acc"), None),
    "rmia_auc": (("rmia", "auc"), "RMIA AUC"),
    "rmia_tpr": (("rmia", "tpr_at_1e-4"), "RMIA TPR@0.01%FPR"),
    "rmia_tpr_1pct": (("rmia", "tpr_at_1pct"), "RMIA TPR@1%FPR"),
    "person_auc": (("per_person", "mean", "auc"), "person AUC"),
}
# Each attack's ROC curve, when recorded: ``record["mia"][attack]["roc"] = {"fpr": [...],
# "tpr": [...]}`` (per_person: under its "mean" aggregation).
ROC_PATHS = {"loss_rf": ("loss_rf",), "rmia": ("rmia",), "per_person": ("per_person", "mean")}
STATS = tuple(f"{s}_{k}" for s in EVAL_SPLITS for k in ("metric", "loss")) + (
    "tow", *ATTACK_STATS, "seconds")
CSV_COLUMNS = ("method", "access", "dataset", "num_identities", "seed") + STATS
SPLIT_COLORS = {"retain": "tab:blue", "forget": "tab:red", "test": "tab:green"}

Row = dict[str, Any]  # a record of the study, or a row of ``aggregate``


def metric_name(dataset: str) -> str:
    """The paper's metric for ``dataset``: "mAP" (multi-label attributes) or "acc" (MUFAC).

    ConfigError (a ValueError) for a dataset the catalog does not know.
    """
    return catalog.spec(dataset).metric


def _metric_name_of(records: Sequence[Row]) -> str:
    """The metric name shared by the records' datasets; ValueError when they differ."""
    names = {metric_name(r["dataset"]) for r in records}
    if len(names) != 1:
        raise ValueError(f"records mix metrics {sorted(names)}; report one task at a time")
    return names.pop()


# ---------------------------------------------------------------------------------------------
# Flat statistics and aggregation over seeds


def _number(value: Any) -> float | None:
    """``value`` as a float; None stays None."""
    return None if value is None else float(value)


def _nan_if_none(value: float | None) -> float:
    return math.nan if value is None else value


def _attacks(record: Row) -> dict[str, Any]:
    """``record["mia"]``; an older flat ``{"auc", "acc"}`` is read as the loss attack's."""
    mia = record.get("mia") or {}
    if isinstance(mia, dict) and "loss_rf" not in mia and ("auc" in mia or "acc" in mia):
        return {"loss_rf": mia}
    return mia if isinstance(mia, dict) else {}


def _at(tree: Any, path: Sequence[str]) -> Any:
    for key in path:
        if not isinstance(tree, dict):
            return None
        tree = tree.get(key)
    return tree


def record_stats(record: Row) -> dict[str, float | None]:
    """The numbers of one record under the flat names of ``STATS``; None where missing."""
    out: dict[str, float | None] = {}
    for split in EVAL_SPLITS:
        entry = record.get(split) or {}
        out[f"{split}_metric"] = _number(entry.get("metric"))
        out[f"{split}_loss"] = _number(entry.get("loss"))
    out["tow"] = _number(record.get("tow"))
    attacks = _attacks(record)
    for name, (path, _) in ATTACK_STATS.items():
        out[name] = _number(_at(attacks, path))
    out["seconds"] = _number(record.get("seconds"))
    return out


def _mean_std(values: list[float | None]) -> tuple[float | None, float | None]:
    """Mean and sample standard deviation (ddof=1) of the present values.

    The mean is None when no value is present, the std when fewer than two are.
    """
    present = [v for v in values if v is not None]
    if not present:
        return None, None
    std = float(np.std(present, ddof=1)) if len(present) > 1 else None
    return float(np.mean(present)), std


def _row_key(record: Row) -> tuple[Any, str, Any]:
    """What one row of the table stands for: (config group, method, N); the group is None
    unless studies of several configs were combined with ``--group_by_config``."""
    return record.get("group"), record["method"], record.get("num_identities")


def aggregate(records: Sequence[Row]) -> list[Row]:
    """Mean and std over seeds per (group, method, num_identities), in order of first
    appearance (``_row_key``).

    Each row: ``method``, ``group`` (None unless grouped by config), ``dataset``,
    ``num_identities``, ``seeds`` (sorted), ``mean``, ``std`` and ``interval`` (dicts over
    ``STATS``). The std is the sample std (ddof=1) over the seeds
    that have the value, the interval the 95% t-interval of the mean; both None with one seed.
    Missing values (ToW without a retrained model, no MIA) are left out; a statistic missing
    everywhere is None.
    """
    groups: dict[tuple[Any, str, Any], list[Row]] = {}
    for r in records:
        groups.setdefault(_row_key(r), []).append(r)
    rows = []
    for (group, method, num_identities), members in groups.items():
        stats = [record_stats(r) for r in members]
        mean, std, interval = {}, {}, {}
        for name in STATS:
            values = [s[name] for s in stats]
            mean[name], std[name] = _mean_std(values)
            interval[name] = _interval([v for v in values if v is not None])
        rows.append({"method": method, "group": group, "dataset": members[0].get("dataset"),
                     "access": members[0].get("access"), "num_identities": num_identities,
                     "seeds": sorted(r.get("seed") for r in members),
                     "mean": mean, "std": std, "interval": interval})
    return rows


PAIRED_STATS = ("tow", "forget_metric", "retain_metric", "test_metric")


def _interval(values: Sequence[float], level: float = 0.95) -> tuple[float, float] | None:
    """The ``level`` t-interval of the mean of ``values`` (None with fewer than two)."""
    n = len(values)
    if n < 2:
        return None
    mean, sem = float(np.mean(values)), float(np.std(values, ddof=1)) / math.sqrt(n)
    half = float(scipy.stats.t.ppf(0.5 + level / 2, n - 1)) * sem
    return mean - half, mean + half


def _split_key(record: Row) -> tuple[Any, ...]:
    """What makes two records comparable seed by seed: the same config group, dataset, N, seed
    and split (``splits_hash``, written by studies; records without one pair on the seed
    alone)."""
    return (record.get("group"), record.get("dataset"), record.get("num_identities"),
            record.get("seed"), record.get("splits_hash"))


def paired(records: Sequence[Row], baseline: str = "pretrain",
           stats: Sequence[str] = PAIRED_STATS) -> list[Row]:
    """Differences ``method − baseline`` on the same split (config group, dataset, N, seed,
    splits hash).

    One row per (group, method, N) other than ``baseline``, in order of first appearance:
    ``method``, ``group``, ``access``, ``num_identities``, ``seeds`` (those with both records),
    and per statistic of ``stats`` ``values`` (one difference per seed), ``mean``, ``std``
    (sample, None with one seed) and ``interval`` (95% t-interval, None with one seed).
    Records without a baseline record of their split are left out; a method with none is left
    out. ValueError when one split has two records of a method (the same study combined twice,
    say).
    """
    seen: set[tuple[Any, ...]] = set()
    for r in records:
        key = (r["method"], *_split_key(r))
        if key in seen:
            raise ValueError(
                f"two {r['method']} records{_in_group(r)} for dataset {r.get('dataset')}, N = "
                f"{r.get('num_identities')}, seed {r.get('seed')} on the same split; combine "
                "each study once")
        seen.add(key)
    base = {_split_key(r): record_stats(r) for r in records if r["method"] == baseline}
    groups: dict[tuple[Any, str, Any], list[Row]] = {}
    for r in records:
        if r["method"] != baseline and _split_key(r) in base:
            groups.setdefault(_row_key(r), []).append(r)
    rows = []
    for (group, method, num_identities), members in groups.items():
        members = sorted(members, key=lambda r: (r.get("seed"), str(r.get("splits_hash"))))
        row: Row = {"method": method, "group": group, "access": members[0].get("access"),
                    "num_identities": num_identities, "baseline": baseline,
                    "seeds": [r.get("seed") for r in members]}
        for name in stats:
            diffs = []
            for r in members:
                mine, theirs = record_stats(r)[name], base[_split_key(r)][name]
                diffs.append(None if mine is None or theirs is None else mine - theirs)
            present = [d for d in diffs if d is not None]
            mean, std = _mean_std(present)
            row[name] = {"values": diffs, "mean": mean, "std": std,
                         "interval": _interval(present)}
        rows.append(row)
    return rows


def _in_group(record: Row) -> str:
    """`` (config <group>)`` for a record of a config group, else nothing."""
    return f" (config {record['group']})" if record.get("group") is not None else ""


def _signed(value: float) -> str:
    return f"{value:+.2f}"


def _paired_cell(entry: Row) -> str:
    """``+1.23 ± 0.45 [+0.10, +2.36]`` (mean ± std [95% interval]); blank when missing."""
    if entry["mean"] is None:
        return ""
    text = _signed(entry["mean"])
    if entry["std"] is not None:
        text += f" ± {entry['std']:.2f}"
    if entry["interval"] is not None:
        lo, hi = entry["interval"]
        text += f" [{_signed(lo)}, {_signed(hi)}]"
    return text


def paired_table(rows: Sequence[Row], metric_name: str) -> str:
    """The paired differences as markdown: ToW per seed, then mean ± std [95% interval] of the
    differences of ToW and of the forget / retain / test metric."""
    several_n, grouped = _varies(rows, "num_identities"), _varies(rows, "group")
    head = ["method"] + (["config"] if grouped else []) + ["access"] + (
        ["N"] if several_n else []) + [
        "seeds", "ToW per seed", "ToW", f"forget {metric_name}", f"retain {metric_name}",
        f"test {metric_name}"]
    lines = ["| " + " | ".join(head) + " |",
             "|" + "|".join("---" if i < 3 + several_n + grouped else "---:"
                            for i in range(len(head))) + "|"]
    for row in rows:
        per_seed = ", ".join("" if v is None else _signed(v) for v in row["tow"]["values"])
        cells = [str(row["method"])] + ([_group_text(row)] if grouped else [])
        cells += [row.get("access") or ""]
        cells += [str(row["num_identities"])] if several_n else []
        cells += [", ".join(str(s) for s in row["seeds"]), per_seed, _paired_cell(row["tow"]),
                  _paired_cell(row["forget_metric"]), _paired_cell(row["retain_metric"]),
                  _paired_cell(row["test_metric"])]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def has_repeated_seeds(records: Sequence[Row]) -> bool:
    """True when some (group, method, num_identities) has more than one record (several
    seeds)."""
    keys = [_row_key(r) for r in records]
    return len(set(keys)) < len(keys)


# ---------------------------------------------------------------------------------------------
# Markdown table


def _is_aggregated(row: Row) -> bool:
    return "mean" in row


def _cell(row: Row, stat: str, interval: bool = False) -> str:
    """One number with 2 decimals; for an aggregated row ``mean ± std``, with ``interval`` also
    the 95% interval ``[lo, hi]``; blank when missing."""
    if _is_aggregated(row):
        mean, std = row["mean"][stat], row["std"][stat]
        bounds = row.get("interval", {}).get(stat) if interval else None
    else:
        mean, std, bounds = record_stats(row)[stat], None, None
    if mean is None:
        return ""
    text = f"{mean:.2f}" if std is None else f"{mean:.2f} ± {std:.2f}"
    if bounds is not None:
        text += f" [{bounds[0]:.2f}, {bounds[1]:.2f}]"
    return text


def _varies(rows: Sequence[Row], key: str) -> bool:
    return len({str(r.get(key)) for r in rows}) > 1


def _group_text(row: Row) -> str:
    """The row's config group label; blank for a row outside any group."""
    return "" if row.get("group") is None else str(row["group"])


def _attack_columns(rows: Sequence[Row]) -> list[str]:
    """The attack stats with a column that some row has a value for."""
    return [name for name, (_, header) in ATTACK_STATS.items()
            if header and any(_cell(r, name) for r in rows)]


def markdown_table(rows: Sequence[Row], metric_name: str) -> str:
    """The results table: one row per record, or per ``aggregate`` row (``mean ± std``, and the
    95% interval ``[lo, hi]`` for the metrics and ToW).

    Columns: method, [config, the group's label, when rows span several config groups], access
    (what the method may read, ``unlearn/api.py``; blank for records that predate it), [N when
    rows span several N], [seed when records span several seeds],
    retain / forget / test metric, ToW (blank without a retrained model), [each attack column of
    ``ATTACK_STATS`` that some row has], seconds.
    """
    columns: list[tuple[str, Callable[[Row], str]]] = [("method", lambda r: str(r["method"]))]
    if _varies(rows, "group"):
        columns.append(("config", _group_text))
    columns.append(("access", lambda r: r.get("access") or ""))
    if _varies(rows, "num_identities"):
        columns.append(("N", lambda r: str(r.get("num_identities"))))
    if not any(_is_aggregated(r) for r in rows) and _varies(rows, "seed"):
        columns.append(("seed", lambda r: str(r.get("seed"))))
    for split in TABLE_SPLITS:
        columns.append((f"{split} {metric_name}",
                        lambda r, s=split: _cell(r, f"{s}_metric", interval=True)))
    columns.append(("ToW", lambda r: _cell(r, "tow", interval=True)))
    for name in _attack_columns(rows):
        columns.append((ATTACK_STATS[name][1], lambda r, n=name: _cell(r, n)))
    columns.append(("seconds", lambda r: _cell(r, "seconds")))
    lines = ["| " + " | ".join(name for name, _ in columns) + " |",
             "|" + "|".join("---" if name in ("method", "config", "access", "N", "seed")
                            else "---:" for name, _ in columns) + "|"]
    for row in rows:
        lines.append("| " + " | ".join(fmt(row) for _, fmt in columns) + " |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# CSV and JSON


def csv_columns(records: Sequence[Row]) -> tuple[str, ...]:
    """``CSV_COLUMNS``, with ``group`` after ``method`` when some record has a config group."""
    if all(r.get("group") is None for r in records):
        return CSV_COLUMNS
    return ("method", "group", *CSV_COLUMNS[1:])


def csv_rows(records: Sequence[Row]) -> list[dict[str, Any]]:
    """One flat dict per record over ``csv_columns(records)``; None where a value is
    missing."""
    rows = []
    for r in records:
        row = {key: to_json(r.get(key)) for key in csv_columns(records)
               if key not in STATS}
        row.update(record_stats(r))
        rows.append(row)
    return rows


def write_csv(path: str, records: Sequence[Row]) -> str:
    """Writes ``csv_rows(records)`` to ``path`` atomically (None as an empty cell); returns
    ``path``."""
    with atomic_open(path, newline="") as f:
        _csv_to(f, records)
    return path


def _csv_to(f, records: Sequence[Row]) -> None:
    writer = csv.DictWriter(f, fieldnames=csv_columns(records))
    writer.writeheader()
    writer.writerows(csv_rows(records))


FIGURE_DPI = 120


def save_figure(fig: Figure, path: str, dpi: int = FIGURE_DPI) -> str:
    """Saves ``fig`` as PNG to ``path`` atomically; returns ``path``."""
    with atomic_open(path, "wb") as f:
        fig.savefig(f, format="png", dpi=dpi)
    return path


def _new_figure(width: float, height: float) -> Figure:
    """A figure on an Agg canvas (no pyplot, no display, nothing global to close)."""
    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


# ---------------------------------------------------------------------------------------------
# Plots


def _run_label(record: Row, runs: Sequence[Row]) -> str:
    """The method, with its config group, N and seed where these vary among ``runs``."""
    details = [_group_text(record)] if _varies(runs, "group") else []
    if _varies(runs, "num_identities"):
        details.append(f"N={record.get('num_identities')}")
    if _varies(runs, "seed"):
        details.append(f"seed {record.get('seed')}")
    return f"{record['method']} ({', '.join(details)})" if details else str(record["method"])


def training_curves_figure(records: Sequence[Row]) -> Figure | None:
    """Train (solid) / val (dashed) loss (left) and val metric (right) vs epoch, one colour per
    record with a ``history``, the best epoch starred; None when no record has a history."""
    runs = [r for r in records if r.get("history")]
    if not runs:
        return None
    fig = _new_figure(11, 4.2)
    ax_loss, ax_metric = fig.subplots(1, 2)
    for i, r in enumerate(runs):
        color, epochs = f"C{i % 10}", [h["epoch"] for h in r["history"]]
        ax_loss.plot(epochs, [h["train_loss"] for h in r["history"]], "-", color=color)
        ax_loss.plot(epochs, [h["val_loss"] for h in r["history"]], "--", color=color)
        ax_metric.plot(epochs, [h["val_metric"] for h in r["history"]], "-o", markersize=3,
                       color=color, label=_run_label(r, runs))
        best = r.get("best_epoch")
        if best is not None and best in epochs:
            ax_metric.plot(best, r["history"][epochs.index(best)]["val_metric"], "*",
                           markersize=12, color=color, markeredgecolor="black")
    name = _metric_name_of(runs)
    ax_loss.set(xlabel="epoch", ylabel="loss", title="loss (solid: train, dashed: val)")
    ax_metric.set(xlabel="epoch", ylabel=f"val {name}",
                  title=f"validation {name} (star: best epoch)")
    for ax in (ax_loss, ax_metric):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    fig.legend(loc="outside right upper", fontsize=8)
    fig.suptitle(subject(runs), fontsize=10)
    return fig


def _meta_runs(records: Sequence[Row]) -> list[Row]:
    """Records whose MetaUnlearn meta-training logged held-out diagnostics."""
    return [r for r in records
            if any("reduction_learned" in h for h in (r.get("prepare") or {}).get(
                "meta_history") or [])]


def meta_diagnostics_figure(records: Sequence[Row]) -> Figure | None:
    """MetaUnlearn's learned step on held-out simulated requests per meta-training epoch (epoch
    -1: before meta-training), one colour per run: the share of the outer objective it removes
    (solid) next to a gradient-ascent step of the same length (dashed), the step's length
    relative to the model's, and the share of portraits that give no step (solid) with the
    largest portrait's share of the step (dotted). None when no record has diagnostics."""
    runs = _meta_runs(records)
    if not runs:
        return None
    fig = _new_figure(14, 4.4)
    ax_red, ax_step, ax_port = fig.subplots(1, 3)
    for i, r in enumerate(runs):
        prepared = r["prepare"]
        history = [h for h in prepared["meta_history"] if "reduction_learned" in h]
        initial = _at(prepared, ("validation", "initial"))
        points = ([{"epoch": -1, **initial}] if initial else []) + history
        epochs = [p["epoch"] for p in points]
        color = f"C{i % 10}"
        get = lambda key, points=points: [p[key] for p in points]  # noqa: E731
        ax_red.plot(epochs, 100 * np.asarray(get("reduction_learned")), "-o", markersize=3,
                    color=color, label=_run_label(r, runs))
        ax_red.plot(epochs, 100 * np.asarray(get("reduction_ascent")), "--", color=color)
        ax_step.plot(epochs, get("relative_step"), "-o", markersize=3, color=color)
        ax_port.plot(epochs, 100 * np.asarray(get("dead_share")), "-o", markersize=3,
                     color=color)
        ax_port.plot(epochs, 100 * np.asarray(get("top_share")), ":", color=color)
    ax_red.axhline(0, color="grey", linewidth=1)
    ax_red.set(xlabel="meta-training epoch", ylabel="% of the outer objective removed",
               title="objective removed\n(solid: learned, dashed: ascent)")
    ax_step.set(xlabel="meta-training epoch", ylabel="||Δθ|| / ||θ||", yscale="log",
                title="relative step size")
    ax_port.set(xlabel="meta-training epoch", ylabel="% of the portraits / of the step",
                title="portraits giving no step (solid),\nlargest portrait's share (dotted)")
    for ax in (ax_red, ax_step, ax_port):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    fig.legend(loc="outside right upper", fontsize=8)
    fig.suptitle(f"{subject(runs)}: MetaUnlearn on held-out simulated requests (epoch -1: "
                 "before meta-training)", fontsize=10)
    return fig


SYMLOG_SPAN = 20.0  # points: a wider panel of differences_figure gets a symmetric log scale


def differences_figure(records: Sequence[Row], metric_name: str) -> Figure | None:
    """Where the differences between methods are visible: per method (and N), left the forget
    metric minus the retrained model's on the same split (0: forgotten as the oracle), right the
    ToW minus pretrain's on the same split (> 0: better than doing nothing); dots are means over
    seeds, bars 95% t-intervals (none with one seed), grey crosses the single seeds. A panel
    whose values span more than ``SYMLOG_SPAN`` points (one method destroys the model, another
    moves it by half a point) is drawn on a symmetric log scale, linear within ±1 point, so both
    stay visible. None when the records have neither a retrain nor a pretrain to pair with."""
    gap = paired(records, baseline="retrain", stats=("forget_metric",))
    gain = paired(records, baseline="pretrain", stats=("tow",))
    if not gap and not gain:
        return None
    have = {_row_key(r) for r in [*gap, *gain]}
    keys = [k for k in dict.fromkeys(_row_key(r) for r in records)
            if k in have]  # in the records' order
    labels = _key_labels(keys)
    fig = _new_figure(11, max(2.5, 0.45 * len(keys) + 1.5))
    axes = fig.subplots(1, 2, sharey=True)
    panels = ((axes[0], gap, "forget_metric",
               f"forget {metric_name} − retrain's (same split)"),
              (axes[1], gain, "tow", "ToW − pretrain's (same split)"))
    for ax, rows, stat, title in panels:
        by_key = {_row_key(r): r[stat] for r in rows}
        for y, key in enumerate(keys):
            entry = by_key.get(key)
            if entry is None or entry["mean"] is None:
                continue
            values = [v for v in entry["values"] if v is not None]
            ax.plot(values, [y] * len(values), "x", color="gray", markersize=5)
            if entry["interval"] is not None:
                lo, hi = entry["interval"]
                ax.errorbar(entry["mean"], y, xerr=[[entry["mean"] - lo], [hi - entry["mean"]]],
                            fmt="o", color=f"C{y % 10}", capsize=4)
            else:
                ax.plot(entry["mean"], y, "o", color=f"C{y % 10}")
        ax.axvline(0.0, color="black", linewidth=0.8)
        ax.set(title=title, xlabel="points")
        ax.grid(alpha=0.3, axis="x")
        shown = [v for r in rows for v in (*r[stat]["values"], *(r[stat]["interval"] or ()))
                 if v is not None]
        if shown and max(shown) - min(shown) > SYMLOG_SPAN:
            ax.set_xscale("symlog", linthresh=1.0)
            ax.set_xlabel("points (symmetric log scale, linear within ±1)")
        ax.margins(x=0.06)
    axes[0].set_yticks(range(len(keys)), labels)
    axes[0].invert_yaxis()
    fig.suptitle(f"{subject(records)}: mean, 95% interval over seeds, single seeds (x)",
                 fontsize=10)
    return fig


def roc_curves(records: Sequence[Row]) -> dict[str, dict[str, tuple[Any, Any, float]]]:
    """``{method label: {attack: (fpr, tpr, auc as a fraction)}}`` of the records that carry ROC
    points (``ROC_PATHS``). Several seeds of a (method, N) are averaged vertically: the mean TPR
    at each FPR of ``oneshui_jax.mia.roc.GRID``, and the mean AUC."""
    from oneshui_jax.mia import roc as roc_lib

    groups: dict[tuple[Any, str, Any], list[Row]] = {}
    for r in records:
        groups.setdefault(_row_key(r), []).append(r)
    aucs = {attack: name for attack, path in ROC_PATHS.items()
            for name, (stat_path, _) in ATTACK_STATS.items() if stat_path == (*path, "auc")}
    curves: dict[str, dict[str, tuple[Any, Any, float]]] = {}
    for key, label in zip(groups, _key_labels(list(groups)), strict=True):
        members = groups[key]
        for attack, path in ROC_PATHS.items():
            rocs = [(_at(_attacks(r), (*path, "roc")), record_stats(r)[aucs[attack]])
                    for r in members]
            rocs = [(roc, auc) for roc, auc in rocs if roc is not None and auc is not None]
            if not rocs:
                continue
            if len(rocs) == 1:
                fpr, tpr = rocs[0][0]["fpr"], rocs[0][0]["tpr"]
            else:
                fpr = roc_lib.GRID
                tpr = np.mean([np.interp(fpr, roc["fpr"], roc["tpr"]) for roc, _ in rocs],
                              axis=0)
            auc = float(np.mean([auc for _, auc in rocs])) / 100.0
            curves.setdefault(label, {})[attack] = (fpr, tpr, auc)
    return curves


def roc_figure(records: Sequence[Row]) -> Figure | None:
    """``oneshui_jax.mia.roc.roc_figure`` of ``roc_curves(records)``: one panel per attack, every
    method, log-scale FPR; None when no record carries ROC points."""
    curves = roc_curves(records)
    if not curves:
        return None
    from oneshui_jax.mia import roc

    fig = roc.roc_figure(curves)
    fig.suptitle(f"{subject(records)}: membership attacks", fontsize=10)
    return fig


def plot_training_curves(records: Sequence[Row], path: str) -> str | None:
    """Writes ``training_curves_figure(records)`` to ``path``; None (nothing written) when no
    record has a history."""
    fig = training_curves_figure(records)
    return None if fig is None else save_figure(fig, path)


def _key_labels(keys: Sequence[tuple[Any, str, Any]]) -> list[str]:
    """Labels of (group, method, N) keys (``_row_key``): the method, with the config group and
    N where these vary among ``keys``."""
    several_groups = len({str(g) for g, _, _ in keys}) > 1
    several_n = len({str(n) for _, _, n in keys}) > 1
    labels = []
    for group, method, n in keys:
        details = ([_group_text({"group": group})] if several_groups else []) + (
            [f"N={n}"] if several_n else [])
        labels.append(f"{method} ({', '.join(details)})" if details else str(method))
    return labels


def _group_label(row: Row, rows: Sequence[Row]) -> str:
    label = str(row["method"])
    if _varies(rows, "group"):
        label += f"\n{_group_text(row)}"
    if _varies(rows, "num_identities"):
        label += f"\nN={row.get('num_identities')}"
    return label


def _retrain_forget(rows: Sequence[Row]) -> dict[Any, float]:
    """The retrained model's mean forget metric per (config group, num_identities)."""
    return {(r.get("group"), r["num_identities"]): r["mean"]["forget_metric"] for r in rows
            if r["method"] == "retrain" and r["mean"]["forget_metric"] is not None}


def method_bars_figure(records: Sequence[Row], metric_name: str) -> Figure:
    """Grouped bars per method (per (method, N) over several N): retain / forget / test metric,
    mean over seeds with std error bars; ToW above each group; a dashed segment over each group at
    the retrained model's forget metric (same N) when a "retrain" record exists."""
    rows = aggregate(records)
    n = len(rows)
    fig = _new_figure(max(6.0, 1.6 * n + 2.5), 4.5)
    ax = fig.subplots()
    x = np.arange(n)
    width = 0.8 / len(TABLE_SPLITS)
    top = 0.0
    for j, split in enumerate(TABLE_SPLITS):
        means = [_nan_if_none(r["mean"][f"{split}_metric"]) for r in rows]
        stds = [_nan_if_none(r["std"][f"{split}_metric"]) for r in rows]
        yerr = stds if np.isfinite(stds).any() else None  # error bars only over seeds
        bars = ax.bar(x + (j - 1) * width, means, width, yerr=yerr, capsize=3,
                      color=SPLIT_COLORS[split], label=f"{split} {metric_name}")
        ax.bar_label(bars, fmt="%.1f", fontsize=7, padding=2)
        top = max(top, np.nanmax(np.add(means, np.nan_to_num(stds)), initial=0.0))
    reference = _retrain_forget(rows)
    segments = [(i, reference[(r.get("group"), r["num_identities"])])
                for i, r in enumerate(rows)
                if (r.get("group"), r["num_identities"]) in reference]
    for k, (i, y) in enumerate(segments):
        ax.hlines(y, i - 0.5, i + 0.5, colors="black", linestyles="dashed", linewidth=1,
                  label=f"retrain forget {metric_name}" if k == 0 else None)
    for i, r in enumerate(rows):
        if r["mean"]["tow"] is not None:
            ax.annotate(f"ToW {_cell(r, 'tow')}", (i, top), xytext=(0, 14),
                        textcoords="offset points", ha="center", fontsize=8)
    ax.set_xticks(x, [_group_label(r, rows) for r in rows])
    ax.set_xlim(-0.6, n - 0.4)
    ax.set_ylim(0, top * 1.2 if top > 0 else 1.0)
    ax.set_ylabel(f"{metric_name} (%)")
    averaged = " (mean ± std over seeds)" if has_repeated_seeds(records) else ""
    ax.set_title(subject(records) + averaged, fontsize=10)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    return fig


def plot_method_bars(records: Sequence[Row], path: str, metric_name: str) -> str:
    """Writes ``method_bars_figure(records, metric_name)`` to ``path``; returns ``path``."""
    return save_figure(method_bars_figure(records, metric_name), path)


# ---------------------------------------------------------------------------------------------
# The report


def _joined(values: Sequence[Any]) -> str:
    return ", ".join(str(v) for v in sorted(set(values)))


def subject(records: Sequence[Row]) -> str:
    """``<dataset>, N=<n>, seed <s>`` (or ``seeds <s1>, <s2>, ...``) of the records."""
    seeds = [r.get("seed") for r in records]
    seed_text = f"seed {seeds[0]}" if len(set(seeds)) == 1 else f"seeds {_joined(seeds)}"
    return (f"{_joined([r.get('dataset') for r in records])}, "
            f"N={_joined([r.get('num_identities') for r in records])}, {seed_text}")


def legend(metric: str, attacks: Sequence[str] = ()) -> str:
    """What the columns mean."""
    lines = [
        f"- **retain / forget / test {metric}** (%): the task metric on images of the retain "
        "identities (training identities that stay), the forget identities (the people who ask "
        "to be forgotten) and the test identities (never trained on).",
        "- **ToW** (Tug-of-War, %): 100 × Π over retain, forget and test of (1 − |metric − "
        "metric of the retrained model| / 100). It compares each model with the model retrained "
        "without the forget identities (the oracle, ToW 100); higher is better. Blank when there "
        "is no retrained model.",
    ]
    lines.append("- **access**: what a method reads (`oneshui_jax/unlearn/api.py`): `support`, "
                 "the portraits alone; `stats`, the portraits plus what it computed from training "
                 "data before the request; `full`, the forget and retain sets (a full-data "
                 "reference, not a 1-SHUI method). `none` is the pretrained model, `oracle` the "
                 "model retrained without the forget identities.")
    explained = {
        "loss_mia_auc": "- **loss-MIA AUC** (%): the reference's loss attack (a random forest on "
                        "per-sample losses, trained on retain vs val, tested on forget vs test "
                        "images); 50 means it cannot tell the forget images from unseen ones.",
        "rmia_auc": "- **RMIA AUC** (%): RMIA with one reference model (the method applied to "
                    "the retrained model), forget vs val images, at the (γ, a) the reference "
                    "selects.",
        "rmia_tpr": "- **RMIA TPR@0.01%FPR** (%): its true-positive rate at 0.01% false "
                    "positives, the paper's number; with fewer than 10,000 val images it is read "
                    "off the ROC's first segment by linear interpolation (`np.interp`), below "
                    "what the data can resolve.",
        "rmia_tpr_1pct": "- **RMIA TPR@1%FPR** (%): the same curve at 1% false positives.",
        "person_auc": "- **person AUC** (%): the attack on people (each person's mean score): "
                      "forget identities vs unseen validation identities.",
    }
    lines += [explained[a] for a in attacks if a in explained]
    lines.append("- **seconds**: wall-clock time of the stage.")
    return "\n".join(lines)


def markdown_report(records: Sequence[Row]) -> str:
    """The content of results.md: title, table(s), legend."""
    metric = _metric_name_of(records)
    parts = [f"# Results: {subject(records)}", ""]
    if has_repeated_seeds(records):
        rows = aggregate(records)
        parts += ["Mean ± sample std [95% t-interval of the mean] over seeds:", "",
                  markdown_table(rows, metric), ""]
        differences = paired(records)
        if differences:
            parts += ["Paired with pretrain on the same split (method − pretrain per seed; "
                      "mean ± sample std [95% t-interval] over seeds):", "",
                      paired_table(differences, metric), ""]
        parts += ["Per run:", ""]
    parts += [markdown_table(records, metric), "", legend(metric, _attack_columns(records)), ""]
    if roc_curves(records):
        parts += ["ROC curves of the attacks: [roc.png](roc.png)", ""]
    return "\n".join(parts)


def write_report(workdir: str, records: Sequence[Row], *, config: dict | None = None,
                 extra: dict | None = None) -> dict[str, str]:
    """Writes results.json, results.md, results.csv, methods.png, (when some record has a
    history) training_curves.png, (with MetaUnlearn diagnostics) meta_diagnostics.png, (when
    there is a pretrain or retrain to pair with) differences.png and (when some record has attack
    ROC points) roc.png into ``workdir``, as one set (``files.atomic_set``: all of them or,
    on an error or a full disk, none); returns {file name: path}.

    Every file's content (and figure) is made before the first one is written, so records the
    report cannot use leave ``workdir`` as it was.
    """
    if not records:
        raise ValueError("write_report needs at least one record")
    extra = extra or {}
    clash = {"config", "results", "paired"} & set(extra)
    if clash:
        raise ValueError(f"extra must not contain {sorted(clash)}")
    metric = _metric_name_of(records)
    payload = {"config": config, "results": list(records), **extra}
    if has_repeated_seeds(records):
        payload["paired"] = paired(records)
    results_json = json.dumps(to_json(payload), indent=1)
    results_md = markdown_report(records)
    methods = method_bars_figure(records, metric)
    curves = training_curves_figure(records)
    diagnostics = meta_diagnostics_figure(records)
    differences = differences_figure(records, metric)
    rocs = roc_figure(records)
    texts = {"results.json": results_json, "results.md": results_md}
    figures = {"methods.png": methods, "training_curves.png": curves,
               "meta_diagnostics.png": diagnostics, "differences.png": differences,
               "roc.png": rocs}
    with atomic_set(workdir) as fileset:  # all of them or none: never half a set
        for name, text in texts.items():
            with fileset.open(name) as f:
                f.write(text)
        with fileset.open("results.csv", newline="") as f:
            _csv_to(f, records)
        for name, fig in figures.items():
            if fig is not None:
                with fileset.open(name, "wb") as f:
                    fig.savefig(f, format="png", dpi=FIGURE_DPI)
    return {os.path.basename(path): path for _, path in fileset.pending}


# ---------------------------------------------------------------------------------------------
# Combining studies: python -m oneshui_jax.report --out DIR RESULTS.json ...


HISTORY_FIELDS = ("epoch", "train_loss", "val_loss", "val_metric")
# MetaUnlearn's held-out diagnostics that meta_diagnostics_figure plots, per entry of
# ``prepare.meta_history`` that has them and in ``prepare.validation.initial``.
META_FIELDS = ("reduction_learned", "reduction_ascent", "relative_step", "dead_share",
               "top_share")


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _number_problem(name: str, value: Any) -> str | None:
    """Why ``value`` (field ``name``) is not a finite number, or None; None is allowed (a
    missing value: ToW without a retrained model, no attack)."""
    if value is None:
        return None
    if not _is_number(value):
        return f"has {name} {value!r}; expected a number"
    if not math.isfinite(value):
        return (f"has {name} {value!r}; expected a finite number (a model that diverged is not "
                "averaged into a report)")
    return None


def _meta_numbers(record: Row) -> tuple[list[tuple[str, Any]], str | None]:
    """The MetaUnlearn diagnostics of ``record`` as (field, value) pairs, or a problem with
    their shape."""
    prepared = record.get("prepare")
    if prepared is None:
        return [], None
    if not isinstance(prepared, dict):
        return [], f"has prepare {str(prepared)[:80]}; expected an object"
    history = prepared.get("meta_history")
    if history is not None and not isinstance(history, list):
        return [], f"has prepare.meta_history {str(history)[:80]}; expected a list of epochs"
    numbers: list[tuple[str, Any]] = []
    for i, entry in enumerate(history or []):
        if not isinstance(entry, dict):
            return [], f"has prepare.meta_history[{i}] {str(entry)[:80]}; expected an object"
        if "reduction_learned" in entry:
            numbers += [(f"prepare.meta_history[{i}].{key}", entry.get(key, "missing"))
                        for key in ("epoch", *META_FIELDS)]
    validation = prepared.get("validation")
    initial = validation.get("initial") if isinstance(validation, dict) else None
    if initial is not None and not isinstance(initial, dict):
        return [], (f"has prepare.validation.initial {str(initial)[:80]}; expected an object "
                    f"with {META_FIELDS}")
    numbers += [(f"prepare.validation.initial.{key}", initial.get(key, "missing"))
                for key in META_FIELDS if initial]
    return numbers, None


def record_problem(record: Any) -> str | None:
    """What makes ``record`` unusable for the report (a field and what was expected), or None.

    A record is a JSON object with ``method`` and ``dataset`` (strings, a dataset the catalog
    knows), ``num_identities`` and ``seed`` (ints), where present ``group`` (a string, the label
    of its config group) and, where present, finite numbers (no NaN, no infinity) for the
    metrics and losses of each split, ``tow``, ``seconds``, ``best_epoch``, the attack numbers
    of ``ATTACK_STATS`` under ``mia`` (and their ``roc`` lists), the fields of each ``history``
    entry and MetaUnlearn's plotted diagnostics (``META_FIELDS``). None stands for a missing
    number (ToW without a retrained model, an attack that did not run).
    """
    if not isinstance(record, dict):
        return f"is a JSON {type(record).__name__}; expected an object (a record of a study)"
    for key, kind in (("method", str), ("dataset", str), ("num_identities", int), ("seed", int)):
        value = record.get(key)
        if not isinstance(value, kind) or isinstance(value, bool):
            got = "missing" if key not in record else f"{value!r}"
            return f"has {key} {got}; expected {'a string' if kind is str else 'an int'}"
    if record.get("group") is not None and not isinstance(record["group"], str):
        return f"has group {record['group']!r}; expected a string (a config group's label)"
    try:
        metric_name(record["dataset"])
    except ValueError as e:  # the catalog's ConfigError: "unknown dataset ...; expected ..."
        return f"has an {e}"
    numbers = [(key, record.get(key)) for key in ("tow", "seconds", "best_epoch")]
    for group in (*EVAL_SPLITS, "mia"):
        entry = record.get(group)
        if entry is not None and not isinstance(entry, dict):
            return f"has {group} {entry!r}; expected an object of numbers"
        if group != "mia":
            numbers += [(f"{group}.{key}", (entry or {}).get(key)) for key in ("metric", "loss")]
    attacks = _attacks(record)
    for path, _ in ATTACK_STATS.values():
        numbers.append(("mia." + ".".join(path), _at(attacks, path)))
    for path in ROC_PATHS.values():
        roc = _at(attacks, (*path, "roc"))
        if roc is None:
            continue
        name = f"mia.{'.'.join(path)}.roc"
        fpr, tpr = (roc.get("fpr"), roc.get("tpr")) if isinstance(roc, dict) else (None, None)
        if not (isinstance(fpr, list) and isinstance(tpr, list) and len(fpr) == len(tpr) > 0
                and all(_is_number(v) for v in (*fpr, *tpr))):
            return (f"has {name} {str(roc)[:80]}; expected {{\"fpr\": [...], \"tpr\": [...]}} "
                    "of equal, non-zero length")
        numbers += [(f"{name}.{axis}[{i}]", v) for axis, values in (("fpr", fpr), ("tpr", tpr))
                    for i, v in enumerate(values)]
    history = record.get("history")
    if history is not None and not isinstance(history, list):
        return f"has history {history!r}; expected a list of epochs"
    for i, epoch in enumerate(history or []):
        if not isinstance(epoch, dict):
            return f"has history[{i}] {epoch!r}; expected an object with {HISTORY_FIELDS}"
        numbers += [(f"history[{i}].{key}", epoch.get(key, "missing")) for key in HISTORY_FIELDS]
    meta, problem = _meta_numbers(record)
    if problem:
        return problem
    for name, value in numbers + meta:
        problem = _number_problem(name, value)
        if problem:
            return problem
    return None


# ---------------------------------------------------------------------------------------------
# Which studies may be combined: their configs


# Settings of a study's config that may differ between the seeds of one study: the seeds, where
# outputs go, logging and progress, and what changes how a study computes but not what
# (``data.in_memory``: bit-identical images; ``data.num_threads``: the same order;
# ``mia.cache_mb``; ``mesh``: the devices, the global batch stays; ``checkpoint_every_s``),
# which stages run (each record is its own row), the hyper-parameter notes and the selection's
# candidates (read by ``python -m oneshui_jax.select`` only). ``data.data_dir`` and
# ``data.tfds_dir`` say where the data is read, not which: the data is named by ``dataset``,
# ``data.synthfaces_config`` and ``data.dedup``, compared, and by ``data_fingerprint`` where
# both files record one. A dotted name also covers the settings below it.
NOT_COMPARED = ("seed", "split_seed", "workdir", "checkpoint_dir", "checkpoint_every_s",
                "wait_for_lock", "progress", "tensorboard", "stages", "hparams_note",
                "selection", "mesh", "data.data_dir", "data.tfds_dir", "data.num_threads",
                "data.in_memory", "mia.cache_mb")
# Settings of any block left out, as the study's reuse check leaves them out of a stage's
# fingerprint (``study.reuse.NOT_FINGERPRINTED``): memory and speed, never results.
NOT_COMPARED_ANYWHERE = ("remat",)
# The blocks every stage reads; the other blocks are the methods' (and their variants'), which
# the reference tunes per N (``hparams``), so studies of different N may differ in those.
SHARED_BLOCKS = ("data", "model", "train", "mia")
MAX_LISTED = 8  # differences listed in one error line


def _settings(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """The settings of ``config`` that must agree between seeds of one study, flat
    (``{"train.lr": 0.001}``): all but ``NOT_COMPARED``, ``NOT_COMPARED_ANYWHERE``, N
    (``num_identities``) and, where a block computes in float32, its ``ap_scores`` (both
    choices score alike there, as in ``study.reuse``)."""
    out: dict[str, Any] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if (name in NOT_COMPARED or key in NOT_COMPARED_ANYWHERE or name == "num_identities"
                or (key == "ap_scores" and config.get("compute_dtype") == "float32")):
            continue
        if isinstance(value, dict):
            out.update(_settings(value, name + "."))
        else:
            out[name] = value
    return out


def _shared(name: str) -> bool:
    """Whether setting ``name`` must agree between studies of different N too."""
    return "." not in name or name.split(".", 1)[0] in SHARED_BLOCKS


def config_differences(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    """``"train.lr 0.001 vs 0.01"`` (``a``'s value first, ``(absent)`` for a setting one config
    lacks) for every compared setting (``_settings``) that differs, sorted by name; studies of
    different N (``num_identities``) are compared on the settings outside the methods' blocks
    only (``SHARED_BLOCKS`` and the top-level settings)."""
    sa, sb = _settings(a), _settings(b)
    same_n = a.get("num_identities") == b.get("num_identities")
    absent = "(absent)"
    return [f"{name} {_shown(sa.get(name, absent))} vs {_shown(sb.get(name, absent))}"
            for name in sorted(set(sa) | set(sb))
            if (same_n or _shared(name)) and sa.get(name, absent) != sb.get(name, absent)]


def _shown(value: Any) -> str:
    return value if value == "(absent)" else repr(value)


class _Study:
    """One results.json: its path, config (None when it has none), data fingerprint (None when
    it records none) and records."""

    def __init__(self, path: str, payload: dict[str, Any]):
        self.path, self.records = path, payload["results"]
        self.config = payload.get("config")
        self.data_fingerprint = payload.get("data_fingerprint")

    def differences(self, other: _Study) -> list[str]:
        """``config_differences`` of the two configs, and the data fingerprints where both
        have one."""
        found = config_differences(self.config, other.config)
        if None not in (self.data_fingerprint, other.data_fingerprint) and (
                self.data_fingerprint != other.data_fingerprint):
            found.append(f"data_fingerprint {self.data_fingerprint!r} vs "
                         f"{other.data_fingerprint!r}")
        return sorted(found)


def _listed(differences: Sequence[str]) -> str:
    shown = "; ".join(differences[:MAX_LISTED])
    more = len(differences) - MAX_LISTED
    return shown + (f"; and {more} more" if more > 0 else "")


def _group_labels(studies: Sequence[_Study], group_by_config: bool) -> list[str | None]:
    """The config group of each study: None for all when their configs agree (or there is
    one study). Otherwise, with ``group_by_config``, a label of the settings that tell the
    configs apart (``"train.lr=0.01"``; a study without a config: its path); without it,
    ValueError listing the differences of the first two studies that differ."""
    if len(studies) < 2:
        return [None] * len(studies)
    unchecked = next((s for s in studies if s.config is None), None)
    if unchecked is not None and not group_by_config:
        other = next(s for s in studies if s is not unchecked)
        raise ValueError(
            f"{unchecked.path} has no config (a hand-made file, or a combined report: it names "
            f"its studies under 'sources'), so its settings cannot be checked against those of "
            f"{other.path}; combine the studies' own results.json, or pass --group_by_config to "
            "report its records as a group of their own")
    checked = [s for s in studies if s.config is not None]
    names: set[str] = set()
    for i, a in enumerate(checked):
        for b in checked[i + 1:]:
            found = a.differences(b)
            if found and not group_by_config:
                raise ValueError(
                    f"config differs between {a.path} and {b.path}: {_listed(found)}; a report "
                    "averages the seeds of one study, whose configs may differ only in the "
                    "seeds, N, output paths and logging; pass --group_by_config to report each "
                    "config as its own group of rows")
            names.update(line.split(" ", 1)[0] for line in found)
    if not names and unchecked is None:
        return [None] * len(studies)
    labels: list[str | None] = []
    for study in studies:
        if study.config is None:
            labels.append(study.path)
            continue
        settings = {**_settings(study.config), "data_fingerprint": study.data_fingerprint}
        labels.append(", ".join(f"{name}={_plain(settings.get(name, '(absent)'))}"
                                for name in sorted(names)) or "(studies with a config)")
    return labels


def _plain(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value)


def _read_study(path: str) -> _Study:
    """The results.json at ``path`` with checked records; ValueError naming the file (and the
    record and field, see ``record_problem``)."""
    try:
        with open(path, encoding="utf-8-sig") as f:
            payload = json.load(f)
        results = payload["results"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{path}: not a results.json written by a study ({e})") from None
    if not isinstance(results, list):
        raise ValueError(f"{path}: not a results.json written by a study ('results' is a "
                         f"JSON {type(results).__name__}; expected a list of records)")
    config = payload.get("config")
    if config is not None and not isinstance(config, dict):
        raise ValueError(f"{path}: not a results.json written by a study ('config' is a JSON "
                         f"{type(config).__name__}; expected an object, the study's config)")
    for i, record in enumerate(results):
        problem = record_problem(record)
        if problem:
            raise ValueError(f"{path}: record {i} {problem}")
    return _Study(path, payload)


def load_records(paths: Sequence[str], *, group_by_config: bool = False) -> list[Row]:
    """The records of several ``results.json`` files, in order; ValueError naming a bad file
    (and the record and field, see ``record_problem``), records that mix metrics, or files
    whose configs differ beyond the seeds of one study (``config_differences``; a file without
    a config among several). With ``group_by_config``, files of other configs are kept apart
    instead: each record gets ``group``, its config's label (``_group_labels``), before any
    ``group`` it had (a combined report's)."""
    studies = [_read_study(path) for path in paths]
    records = [r for s in studies for r in s.records]
    if records:
        _metric_name_of(records)  # one task per report, whatever the configs
    for study, label in zip(studies, _group_labels(studies, group_by_config), strict=True):
        if label is None:
            continue
        for record in study.records:
            own = record.get("group")
            record["group"] = label if own is None else f"{label} | {own}"
    return records


def combine(paths: Sequence[str], out: str, *, group_by_config: bool = False) -> dict[str, str]:
    """One report (mean ± std over seeds, per N) from the ``results.json`` of several studies;
    with ``group_by_config``, per config group too (``load_records``).

    Nothing is written unless every file holds usable records, their configs may be combined
    and ``out`` is a folder (new or existing) that does not hold one of the inputs as its
    ``results.json``.
    """
    records = load_records(paths, group_by_config=group_by_config)
    if not records:
        raise ValueError("no records in " + ", ".join(paths))
    if os.path.exists(out) and not os.path.isdir(out):
        raise ValueError(f"--out {out} is a file; expected a folder for results.{{json,md,csv}} "
                         "and the plots")
    replaced = [p for p in paths
                if os.path.realpath(p) == os.path.realpath(os.path.join(out, "results.json"))]
    if replaced:
        raise ValueError(f"--out {out} would replace the input {replaced[0]}; choose another "
                         "folder")
    problem = cannot_write_in(out)
    if problem:
        raise ValueError(f"--out {out} cannot be written: {problem}; expected a writable folder "
                         "for results.{json,md,csv} and the plots")
    return write_report(out, records, extra={"sources": [os.path.abspath(p) for p in paths]})


def main(argv: Sequence[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(
        prog="python -m oneshui_jax.report",
        description="Combine the results.json of several studies (seeds, N) into one report. "
                    "Their configs may differ only in the seeds, output paths, logging and N "
                    "(and, between N, the methods' settings); any other difference is refused, "
                    "listed.")
    parser.add_argument("results", nargs="+", help="results.json files of finished studies")
    parser.add_argument("--out", required=True, help="folder for results.{json,md,csv} + plots")
    parser.add_argument("--group_by_config", action="store_true",
                        help="report studies of different configs (e.g. train.lr) as separate "
                             "groups of rows, labelled by the settings that differ (the "
                             "'config' column), instead of refusing them; seeds are averaged "
                             "within a group only")
    args = parser.parse_args(argv)
    try:
        written = combine(args.results, args.out, group_by_config=args.group_by_config)
    except ValueError as e:
        parser.exit(2, f"error: {e}\n")
    except OSError as e:  # --out checked above; a race, a full disk, a folder not writable
        parser.exit(2, f"error: {os_error_line(e, args.out)} (--out {args.out}: the report "
                       "could not be written; none of its files was replaced)\n")
    with open(written["results.md"]) as f:
        print(f.read())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
