"""The records a report reads: their checks, and several studies combined into one report.

``record_problem`` says what makes a record of a results.json unusable (a field and what was
expected: every number finite). ``config_differences`` and ``load_records`` decide which studies
may be averaged together: the seeds of one study (and its N), whose configs differ only in the
settings of ``NOT_COMPARED``; ``combine`` reads their results.json files and writes one report
(``python -m oneshui_jax.report``, ``oneshui_jax.cli.report``).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from typing import Any

from oneshui_jax.files import cannot_write_in
from oneshui_jax.metrics import EVAL_SPLITS
from oneshui_jax.report.stats import ATTACK_STATS, ROC_PATHS, Row, _at, _attacks
from oneshui_jax.report.tables import _metric_name_of, metric_name
from oneshui_jax.report.write import write_report

# ---------------------------------------------------------------------------------------------
# What makes a record usable


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


# ---------------------------------------------------------------------------------------------
# Combining studies: python -m oneshui_jax.report --out DIR RESULTS.json ...


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
