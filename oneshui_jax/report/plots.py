"""The report's figures: training curves, MetaUnlearn's held-out diagnostics, the paired
differences, the attacks' ROC curves and the per-method bars.

Plots use matplotlib's object-oriented API on an Agg canvas (``Figure``, not ``pyplot``): they
work without a display, touch no global backend, and are freed with the ``Figure`` object. The
``*_figure`` functions return the figure, for inspection; ``save_figure`` writes one as PNG,
atomically.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from oneshui_jax.files import atomic_open
from oneshui_jax.metrics import TABLE_SPLITS
from oneshui_jax.report.stats import (
    Row,
    _at,
    _group_text,
    _key_labels,
    _nan_if_none,
    _row_key,
    _varies,
    aggregate,
    has_repeated_seeds,
    paired,
    roc_curves,
)
from oneshui_jax.report.tables import _cell, _metric_name_of, subject

SPLIT_COLORS = {"retain": "tab:blue", "forget": "tab:red", "test": "tab:green"}
PAPER_ROWS = ("pretrain", "retrain", "meta_unlearn", "support_ascent", "ssd", "lipschitz", "pgu",
              "scrub", "bad_teacher", "retrain_2")
"""The rows of the paper's table and the second oracle, each with a fixed colour in every plot
(``method_colors``)."""
_MORE_COLORS = ("tab:cyan", "#393b79", "#637939", "#8c6d31", "#843c39", "#7b4173", "#3182bd",
                "#e6550d", "#31a354", "#756bb1")
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


def method_colors(methods: Sequence[str]) -> dict[str, str]:
    """One colour per method, the same in every plot and panel of every study: the paper's rows
    (``PAPER_ROWS``) keep matplotlib's first nine ``tab10`` colours in that order; any other
    method (a variant, a new method) takes the next free colour in the order ``methods`` first
    name it (cycling after ten more)."""
    colors = {m: f"C{i}" for i, m in enumerate(PAPER_ROWS)}
    others = [m for m in dict.fromkeys(methods) if m not in colors]
    colors.update({m: _MORE_COLORS[i % len(_MORE_COLORS)] for i, m in enumerate(others)})
    return {m: colors[m] for m in dict.fromkeys(methods)}


# ---------------------------------------------------------------------------------------------
# The figures


def _run_label(record: Row, runs: Sequence[Row]) -> str:
    """The method, with its config group, N and seed where these vary among ``runs``."""
    details = [_group_text(record)] if _varies(runs, "group") else []
    if _varies(runs, "num_identities"):
        details.append(f"N={record.get('num_identities')}")
    if _varies(runs, "seed"):
        details.append(f"seed {record.get('seed')}")
    return f"{record['method']} ({', '.join(details)})" if details else str(record["method"])


def training_curves_figure(records: Sequence[Row]) -> Figure | None:
    """Train (solid) / val (dashed) loss (left) and val metric (right) vs epoch of every record
    with a ``history``, in its method's colour (``method_colors``), the best epoch starred; None
    when no record has a history."""
    runs = [r for r in records if r.get("history")]
    if not runs:
        return None
    fig = _new_figure(11, 4.2)
    ax_loss, ax_metric = fig.subplots(1, 2)
    colors = method_colors([r["method"] for r in runs])
    for r in runs:
        color, epochs = colors[r["method"]], [h["epoch"] for h in r["history"]]
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
    -1: before meta-training), in each run's method colour: the share of the outer objective it
    removes (solid) next to a gradient-ascent step of the same length (dashed), the step's length
    relative to the model's, and the share of portraits that give no step (solid) with the
    largest portrait's share of the step (dotted). None when no record has diagnostics."""
    runs = _meta_runs(records)
    if not runs:
        return None
    fig = _new_figure(14, 4.4)
    ax_red, ax_step, ax_port = fig.subplots(1, 3)
    colors = method_colors([r["method"] for r in runs])
    for r in runs:
        prepared = r["prepare"]
        history = [h for h in prepared["meta_history"] if "reduction_learned" in h]
        initial = _at(prepared, ("validation", "initial"))
        points = ([{"epoch": -1, **initial}] if initial else []) + history
        epochs = [p["epoch"] for p in points]
        color = colors[r["method"]]
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
    ToW minus pretrain's on the same split (> 0: better than doing nothing). With several seeds,
    dots are means over seeds, bars 95% t-intervals and grey crosses the single seeds; with one
    seed, a dot is that seed's difference and the title says there is no interval. Each dot is
    labelled with its value (signed, in points), so the figure reads without the table. A panel
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
    colors = method_colors([method for _, method, _ in keys])
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
            if len(values) > 1:  # with one seed the cross would hide under its dot
                ax.plot(values, [y] * len(values), "x", color="gray", markersize=5)
            ax.annotate(f"{entry['mean']:+.2f}", (entry["mean"], y), xytext=(0, 7),
                        textcoords="offset points", ha="center", fontsize=7,
                        color=colors[key[1]])
            if entry["interval"] is not None:
                lo, hi = entry["interval"]
                ax.errorbar(entry["mean"], y, xerr=[[entry["mean"] - lo], [hi - entry["mean"]]],
                            fmt="o", color=colors[key[1]], capsize=4)
            else:
                ax.plot(entry["mean"], y, "o", color=colors[key[1]])
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
    axes[0].set_ylim(len(keys) - 0.5, -0.75)  # first row on top, room for its value label
    fig.suptitle(f"{subject(records)}: {_spread_text(gap + gain)}", fontsize=10)
    return fig


def _spread_text(rows: Sequence[Row]) -> str:
    """What a dot and a bar of ``differences_figure`` are, for the seeds its rows pair."""
    counts = sorted({len(r["seeds"]) for r in rows})
    if counts == [1]:
        return "one seed: each dot is that seed's difference (no interval; run more seeds)"
    seeds = f"{counts[0]}" if len(counts) == 1 else f"{counts[0]}-{counts[-1]}"
    return f"mean and 95% t-interval over {seeds} seeds, single seeds (x)"


def roc_figure(records: Sequence[Row]) -> Figure | None:
    """``oneshui_jax.mia.roc.roc_figure`` of ``roc_curves(records)``: one panel per attack, every
    method in its colour (``method_colors``) in every panel, AUCs in % as in the tables,
    log-scale FPR; None when no record carries ROC points."""
    curves = roc_curves(records)
    if not curves:
        return None
    from oneshui_jax.mia import roc

    keys = list(dict.fromkeys(_row_key(r) for r in records))
    method_of = dict(zip(_key_labels(keys), (method for _, method, _ in keys), strict=True))
    colors = method_colors([method_of[label] for label in curves])
    fig = roc.roc_figure(curves, colors={label: colors[method_of[label]] for label in curves},
                         percent=True)
    fig.suptitle(f"{subject(records)}: membership attacks", fontsize=10)
    return fig


def plot_training_curves(records: Sequence[Row], path: str) -> str | None:
    """Writes ``training_curves_figure(records)`` to ``path``; None (nothing written) when no
    record has a history."""
    fig = training_curves_figure(records)
    return None if fig is None else save_figure(fig, path)


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
