"""Writing a study's report: results.{json,md,csv} and the plots, as one set of files.

``write_report`` makes every file's content (``tables``) and figure (``plots``) first, then
writes them all or, on an error or a full disk, none (``files.atomic_set``).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence

from oneshui_jax.files import atomic_set, to_json
from oneshui_jax.report import power
from oneshui_jax.report.plots import (
    FIGURE_DPI,
    differences_figure,
    meta_diagnostics_figure,
    method_bars_figure,
    roc_figure,
    training_curves_figure,
)
from oneshui_jax.report.stats import Row, has_repeated_seeds, paired
from oneshui_jax.report.tables import _csv_to, _metric_name_of, markdown_report


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
    clash = {"config", "results", "paired", "power"} & set(extra)
    if clash:
        raise ValueError(f"extra must not contain {sorted(clash)}")
    metric = _metric_name_of(records)
    payload = {"config": config, "results": list(records), **extra}
    if has_repeated_seeds(records):
        payload["paired"] = paired(records)
        payload["power"] = power.power_rows(payload["paired"])
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

