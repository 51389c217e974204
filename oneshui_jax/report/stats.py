"""The report's numbers: each record's statistics, their mean over seeds and the differences
paired on the same split.

A record is one method's row of a study (``study``): its task metric and loss per split, ToW and
the privacy attacks' numbers under ``mia``. ``record_stats`` flattens it under the names of
``STATS``; ``aggregate`` gives mean, sample std and 95% t-interval over seeds per (config group,
method, N); ``paired`` the differences ``method − pretrain`` (or ``− retrain``) seed by seed on
the same split, which the spread between splits does not hide; ``roc_curves`` the attacks' ROC
curves averaged over seeds. No text and no figure is made here (``tables``, ``plots``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import scipy.stats

from oneshui_jax.metrics import EVAL_SPLITS, SECOND_ORACLE

# The privacy evaluation's numbers in a record (all in %): stat name -> (path under
# ``record["mia"]``, column header or None for CSV / JSON only). ``loss_rf``: the reference's
# random-forest loss attack (SPEC.md 5.4); ``rmia``: RMIA with one reference model (5.5), at the
# (γ, a) the reference selects on the forget images themselves (Q5); ``rmia_fixed``: the same
# attack at ``config.mia.rmia_point``, fixed before the study; ``rmia_held_out``: at the point
# selected on a held-out simulated request of training identities; ``per_person``: the attack
# on people (each person's mean score).
ATTACK_STATS: dict[str, tuple[tuple[str, ...], str | None]] = {
    "loss_mia_auc": (("loss_rf", "auc"), "loss-MIA AUC"),
    "loss_mia_acc": (("loss_rf", "acc"), None),
    "rmia_auc": (("rmia", "auc"), "RMIA AUC, ref. selection"),
    "rmia_tpr": (("rmia", "tpr_at_1e-4"), "RMIA TPR@0.01%FPR, ref. selection"),
    "rmia_tpr_1pct": (("rmia", "tpr_at_1pct"), "RMIA TPR@1%FPR, ref. selection"),
    "rmia_fixed_auc": (("rmia_fixed", "auc"), "RMIA AUC, fixed point"),
    "rmia_fixed_tpr_1pct": (("rmia_fixed", "tpr_at_1pct"), "RMIA TPR@1%FPR, fixed point"),
    "rmia_held_out_auc": (("rmia_held_out", "auc"), "RMIA AUC, held-out selection"),
    "rmia_held_out_tpr_1pct": (("rmia_held_out", "tpr_at_1pct"),
                               "RMIA TPR@1%FPR, held-out selection"),
    "person_auc": (("per_person", "mean", "auc"), "person AUC"),
    "ulira_auc": (("ulira", "auc"), "per-person LRT AUC"),
    "ulira_told_apart": (("ulira", "told_apart"), "people told apart (%)"),
}
# Each attack's ROC curve, when recorded: ``record["mia"][attack]["roc"] = {"fpr": [...],
# "tpr": [...]}`` (per_person: under its "mean" aggregation).
ROC_PATHS = {"loss_rf": ("loss_rf",), "rmia": ("rmia",), "rmia_fixed": ("rmia_fixed",),
             "rmia_held_out": ("rmia_held_out",), "per_person": ("per_person", "mean")}
STATS = tuple(f"{s}_{k}" for s in EVAL_SPLITS for k in ("metric", "loss")) + (
    "tow", *ATTACK_STATS, "seconds")

Row = dict[str, Any]  # a record of the study, or a row of ``aggregate``


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


def has_repeated_seeds(records: Sequence[Row]) -> bool:
    """True when some (group, method, num_identities) has more than one record (several
    seeds)."""
    keys = [_row_key(r) for r in records]
    return len(set(keys)) < len(keys)


# ---------------------------------------------------------------------------------------------
# Rows that vary, and their labels


def _varies(rows: Sequence[Row], key: str) -> bool:
    return len({str(r.get(key)) for r in rows}) > 1


def _group_text(row: Row) -> str:
    """The row's config group label; blank for a row outside any group."""
    return "" if row.get("group") is None else str(row["group"])


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


# ---------------------------------------------------------------------------------------------
# The attacks' ROC curves over seeds


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





def oracle_floor(records: Sequence[Row]) -> dict[tuple[Any, str, Any], Row]:
    """Each method's ToW against the noise floor of ToW, by row key (config group, method, N):
    ``paired(records, baseline="retrain_2", stats=("tow",))``'s entry (``values``, ``mean``,
    ``std``, ``interval`` of ``ToW(method) − ToW(retrain_2)`` seed by seed on the same split)
    plus ``floor`` (retrain_2's mean ToW against retrain) and ``reaches``: whether the method is
    as close to the oracle as another oracle is, i.e. the difference's 95% interval reaches 0
    (with one seed: the difference itself is ≥ 0). Empty without a retrain_2 record."""
    floors: dict[tuple[Any, Any], list[float]] = {}
    for r in records:
        if r["method"] == SECOND_ORACLE and r.get("tow") is not None:
            floors.setdefault((r.get("group"), r.get("num_identities")), []).append(
                float(r["tow"]))
    out = {}
    for row in paired(records, baseline=SECOND_ORACLE, stats=("tow",)):
        entry = dict(row["tow"])
        if entry["mean"] is None:
            continue
        top = entry["interval"][1] if entry["interval"] is not None else entry["mean"]
        tows = floors.get((row.get("group"), row.get("num_identities")))
        entry["floor"] = float(np.mean(tows)) if tows else None
        entry["reaches"] = bool(top >= 0.0)
        out[(row.get("group"), row["method"], row.get("num_identities"))] = entry
    return out
