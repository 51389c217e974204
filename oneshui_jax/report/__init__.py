"""The results report: the paper-style tables and plots of a study, and of several combined.

Rows are methods (pretrain, retrain, unlearning methods); columns are the task metric on the
retain / forget / test identities, ToW against the retrained model and, when measured, the
attacks' numbers: the reference's loss attack (SPEC.md 5.4), RMIA with one reference model
(5.5) and the attack on people, as in the tables of De Min et al. (TMLR 2025). Runs of several
seeds are summarised as ``mean ± std`` per (method, N) and, because the spread between seeds
(splits) hides differences between methods, as differences paired with pretrain on the same
split (``paired``): per seed, their mean, sample std and 95% t-interval.

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

Modules, each importing only those before it: ``stats`` (a record's numbers, the mean over
seeds, the paired differences, the ROC curves over seeds), ``tables`` (the markdown tables, the
legend, results.md, the CSV, the study's closing ``summary``), ``plots`` (every figure, on an
Agg canvas, no ``pyplot``), ``write`` (``write_report``: the set of files), ``records`` (a
record's checks, which studies may be combined, ``load_records`` and ``combine``). The command
line is ``oneshui_jax.cli.report``.
"""

from __future__ import annotations

from oneshui_jax.report.plots import (
    FIGURE_DPI,
    SPLIT_COLORS,
    SYMLOG_SPAN,
    differences_figure,
    meta_diagnostics_figure,
    method_bars_figure,
    plot_method_bars,
    plot_training_curves,
    roc_figure,
    save_figure,
    training_curves_figure,
)
from oneshui_jax.report.records import (
    HISTORY_FIELDS,
    MAX_LISTED,
    META_FIELDS,
    NOT_COMPARED,
    NOT_COMPARED_ANYWHERE,
    SHARED_BLOCKS,
    combine,
    config_differences,
    load_records,
    record_problem,
)
from oneshui_jax.report.stats import (
    ATTACK_STATS,
    PAIRED_STATS,
    ROC_PATHS,
    STATS,
    Row,
    aggregate,
    has_repeated_seeds,
    paired,
    record_stats,
    roc_curves,
)
from oneshui_jax.report.tables import (
    CSV_COLUMNS,
    csv_columns,
    csv_rows,
    legend,
    markdown_report,
    markdown_table,
    metric_name,
    paired_table,
    subject,
    summary,
    write_csv,
)
from oneshui_jax.report.write import write_report

__all__ = [
    "ATTACK_STATS", "CSV_COLUMNS", "FIGURE_DPI", "HISTORY_FIELDS", "MAX_LISTED", "META_FIELDS",
    "NOT_COMPARED", "NOT_COMPARED_ANYWHERE", "PAIRED_STATS", "ROC_PATHS", "SHARED_BLOCKS",
    "SPLIT_COLORS", "STATS", "SYMLOG_SPAN", "Row", "aggregate", "combine", "config_differences",
    "csv_columns", "csv_rows", "differences_figure", "has_repeated_seeds", "legend",
    "load_records", "markdown_report", "markdown_table", "meta_diagnostics_figure",
    "method_bars_figure", "metric_name", "paired", "paired_table", "plot_method_bars",
    "plot_training_curves", "record_problem", "record_stats", "roc_curves", "roc_figure",
    "save_figure", "subject", "summary", "training_curves_figure", "write_csv", "write_report",
]
