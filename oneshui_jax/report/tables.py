"""The report's text: the paper-style results table, the paired differences, the legend, the
CSV, results.md (``markdown_report``) and what a study prints when it ends (``summary``).

Rows are methods (pretrain, retrain, unlearning methods); columns are the task metric on the
retain / forget / test identities, ToW against the retrained model and, when measured, the
attacks' numbers (``stats.ATTACK_STATS``), as in the tables of De Min et al. (TMLR 2025).
"""

from __future__ import annotations

import csv
import os
from collections.abc import Callable, Sequence
from typing import Any

from oneshui_jax.data import catalog
from oneshui_jax.files import atomic_open, to_json
from oneshui_jax.metrics import TABLE_SPLITS
from oneshui_jax.report import power
from oneshui_jax.report.stats import (
    ATTACK_STATS,
    SECOND_ORACLE,
    STATS,
    Row,
    _group_text,
    _varies,
    aggregate,
    has_repeated_seeds,
    oracle_floor,
    paired,
    record_stats,
    roc_curves,
)

CSV_COLUMNS = ("method", "access", "dataset", "num_identities", "seed") + STATS


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
# Paired differences


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


def _table(head: Sequence[str], left: int, rows: Sequence[Sequence[str]]) -> str:
    """A markdown table: ``head``, its first ``left`` columns left-aligned, the others right."""
    lines = ["| " + " | ".join(head) + " |",
             "|" + "|".join("---" if i < left else "---:" for i in range(len(head))) + "|"]
    return "\n".join(lines + ["| " + " | ".join(cells) + " |" for cells in rows])


def paired_table(rows: Sequence[Row], metric_name: str,
                 floor: dict[Any, Row] | None = None) -> str:
    """The paired differences as markdown: ToW per seed, then mean ± std [95% interval] of the
    differences of ToW and of the forget / retain / test metric; with ``floor``
    (``stats.oracle_floor``), the difference of ToW to the second oracle's and whether it
    reaches it."""
    several_n, grouped = _varies(rows, "num_identities"), _varies(rows, "group")
    head = ["method"] + (["config"] if grouped else []) + ["access"] + (
        ["N"] if several_n else []) + [
        "seeds", "ToW per seed", "ToW", f"forget {metric_name}", f"retain {metric_name}",
        f"test {metric_name}"] + (["ToW − retrain_2's", "within the oracles' spread"]
                                  if floor else [])
    body = []
    for row in rows:
        per_seed = ", ".join("" if v is None else _signed(v) for v in row["tow"]["values"])
        cells = [str(row["method"])] + ([_group_text(row)] if grouped else [])
        cells += [row.get("access") or ""]
        cells += [str(row["num_identities"])] if several_n else []
        cells += [", ".join(str(s) for s in row["seeds"]), per_seed, _paired_cell(row["tow"]),
                  _paired_cell(row["forget_metric"]), _paired_cell(row["retain_metric"]),
                  _paired_cell(row["test_metric"])]
        if floor:
            entry = floor.get((row.get("group"), row["method"], row.get("num_identities")))
            cells += ["", ""] if entry is None else [
                _paired_cell(entry), "yes" if entry["reaches"] else "no"]
        body.append(cells)
    return _table(head, 3 + several_n + grouped, body)


def _size(value: float | None) -> str:
    return "" if value is None else f"{value:.2f}"


def power_table(rows: Sequence[Row], metric_name: str) -> str:
    """``power.power_rows`` as markdown: per method, the smallest ToW and forget-metric
    difference against pretrain that the study's seeds detect (80% power, two-sided 5% paired
    t-test, the seeds' own spread) and the seeds a one-point ToW difference needs."""
    several_n, grouped = _varies(rows, "num_identities"), _varies(rows, "group")
    head = (["method"] + (["config"] if grouped else []) + (["N"] if several_n else [])
            + ["seeds", "smallest ToW difference", f"smallest forget {metric_name} difference",
               "seeds for 1 ToW point"])
    body = []
    for row in rows:
        cells = [str(row["method"])] + ([_group_text(row)] if grouped else [])
        cells += [str(row["num_identities"])] if several_n else []
        needed = row["tow"]["seeds_for_1pt"]
        cells += [str(row["tow"]["n"]), _size(row["tow"]["detectable"]),
                  _size(row["forget_metric"]["detectable"]),
                  "" if row["tow"]["std"] is None else (
                      f"> {power.MAX_SEEDS}" if needed is None else str(needed))]
        body.append(cells)
    return _table(head, 2 + several_n + grouped, body)


POWER_LINE = ("Power (80%, two-sided 5% paired t-test with the seeds' own spread; "
              "`oneshui_jax/report/power.py`): the smallest true difference from pretrain each "
              "comparison detects, and the seeds a one-point ToW difference needs:")
ONE_SEED_POWER_LINE = ("Power: one seed per method, so no spread between seeds to size a "
                       "difference by; two or more seeds (`--config.seed`, combined with "
                       "`python -m oneshui_jax.report`) give the smallest detectable difference.")


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
# CSV


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


# ---------------------------------------------------------------------------------------------
# results.md: title, tables, legend


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
        "rmia_auc": "- **RMIA AUC, ref. selection** (%): RMIA with one reference model (the "
                    "method applied to the retrained model), forget vs val images, at the (γ, a) "
                    "the reference selects by the TPR on these very images (parity: it compares "
                    "selections as much as models).",
        "rmia_tpr": "- **RMIA TPR@0.01%FPR, ref. selection** (%): its true-positive rate at "
                    "0.01% false positives, the paper's number; with fewer than 10,000 val "
                    "images it is read off the ROC's first segment by linear interpolation "
                    "(`np.interp`), below what the data can resolve.",
        "rmia_tpr_1pct": "- **RMIA TPR@1%FPR, ref. selection** (%): the same curve at 1% false "
                         "positives.",
        "rmia_fixed_auc": "- **RMIA AUC / TPR@1%FPR, fixed point** (%): the same attack at the "
                          "(γ, a) of `config.mia.rmia_point`, fixed before the study, so no "
                          "label chose it and every model is scored at the same point.",
        "rmia_held_out_auc": "- **RMIA AUC / TPR@1%FPR, held-out selection** (%): the same "
                             "attack at the (γ, a) that separates best (by AUC) the images of "
                             "a held-out simulated request of training identities from val "
                             "images, with the retrained model as target and a model trained "
                             "without those people as reference: chosen without the forget or "
                             "test labels.",
        "person_auc": "- **person AUC** (%): the attack on people (each person's mean score): "
                      "forget identities vs unseen validation identities.",
        "ulira_auc": "- **per-person LRT AUC** (%) and **people told apart** (%): the per-person "
                     "likelihood-ratio test against ensembles (`config.ensemble.size` members "
                     "of pretrain and of retrain): for each forget person, whether models that "
                     "trained on them can be told from models that did not, by the confidence "
                     "of the true labels on their images (pretrain's row: the test's strength); "
                     "the share of people told apart at 5% FPR.",
    }
    lines += [explained[a] for a in attacks if a in explained]
    lines.append("- **seconds**: wall-clock time of the stage.")
    return "\n".join(lines)


def markdown_report(records: Sequence[Row]) -> str:
    """The content of results.md: title, table(s), legend."""
    metric = _metric_name_of(records)
    parts = [f"# Results: {subject(records)}", ""]
    floor = oracle_floor(records)
    if has_repeated_seeds(records):
        rows = aggregate(records)
        parts += ["Mean ± sample std [95% t-interval of the mean] over seeds:", "",
                  markdown_table(rows, metric), ""]
        differences = paired(records)
        if differences:
            parts += ["Paired with pretrain on the same split (method − pretrain per seed; "
                      "mean ± sample std [95% t-interval] over seeds):", "",
                      paired_table(differences, metric, floor), "",
                      *_pretrain_floor(floor),
                      POWER_LINE, "", power_table(power.power_rows(differences), metric), ""]
        parts += ["Per run:", "", markdown_table(records, metric), ""]
    else:
        parts += [markdown_table(records, metric), ""]
        line = floor_line(records, floor)
        parts += [line, ""] if line else []
        parts += [ONE_SEED_POWER_LINE, ""] if paired(records) else []
    parts += [legend(metric, _attack_columns(records)), ""]
    if roc_curves(records):
        parts += ["ROC curves of the attacks: [roc.png](roc.png)", ""]
    return "\n".join(parts)


def _pretrain_floor(floor: dict[Any, Row]) -> list[str]:
    """Under the paired table: pretrain's ToW against the second oracle's (``floor``:
    ``stats.oracle_floor``; is the study able to tell an untouched model from an oracle?)."""
    lines = []
    for (group, method, n), entry in floor.items():
        if method == "pretrain":
            where = "within" if entry["reaches"] else "outside"
            lines += [f"pretrain{f' ({group})' if group else ''}, N={n}: ToW − {SECOND_ORACLE}'s "
                      f"{_paired_cell(entry)}, {where} the oracles' spread.", ""]
    return lines


def floor_line(records: Sequence[Row], floor: dict[Any, Row] | None = None) -> str | None:
    """One study's noise floor of ToW in words: retrain_2's ToW against retrain, and which
    methods reach it (``floor``: ``stats.oracle_floor(records)``, computed when not given; one
    seed); None without retrain_2 or with several seeds (the paired table says it then)."""
    floor = oracle_floor(records) if floor is None else floor
    if not floor or has_repeated_seeds(records):
        return None
    value = next(iter(floor.values()))["floor"]
    methods = {key: e for key, e in floor.items() if key[1] not in ("pretrain", "retrain")}
    reach = [key[1] for key, e in methods.items() if e["reaches"]]
    below = [key[1] for key, e in methods.items() if not e["reaches"]]
    pretrain = floor.get(next((k for k in floor if k[1] == "pretrain"), None))
    text = (f"ToW noise floor: a second retrained model ({SECOND_ORACLE}: the same data, "
            f"training seed + 1) scores ToW {value:.2f} against retrain; a method at or above "
            "it is as close to the oracle as another oracle is.")
    if pretrain is not None:
        text += f" pretrain: {'at or above' if pretrain['reaches'] else 'below'} it."
    text += f" At or above: {', '.join(reach) or 'none'}; below: {', '.join(below) or 'none'}."
    return text


def summary(records: Sequence[Row], dataset: str, platform: str, workdir: str) -> str:
    """What the study prints when it ends: the subject and ``platform``, the results table, the
    forget metric of pretrain vs retrain (the memorisation gap) when both ran, and where
    results.md is."""
    metric = metric_name(dataset)
    lines = [f"\n{subject(records)} ({platform}):", markdown_table(records, metric)]
    forget = {r["method"]: r["forget"]["metric"] for r in records}
    if {"pretrain", "retrain"} <= set(forget):
        lines.append(f"forget {metric}: pretrain {forget['pretrain']:.2f} "
                     f"vs retrain {forget['retrain']:.2f} "
                     f"(memorisation gap {forget['pretrain'] - forget['retrain']:+.2f})")
    floor = floor_line(records)
    if floor:
        lines.append(floor)
    lines.append(f"results: {os.path.join(workdir, 'results.md')}")
    return "\n".join(lines)
