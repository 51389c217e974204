r"""Command line of the study: ``python -m oneshui_jax.main --config=configs/<dataset>.py[:arg]``.

    python -m oneshui_jax.main --config=configs/synthfaces.py
    python -m oneshui_jax.main --config=configs/synthfaces.py:N=50 --config.seed=1 \
        --config.train.epochs=5 --config.stages='("pretrain",)'

``--config.x=y`` overrides any config field (tuples, not lists, for sequences). The stages in
``config.stages`` run in order (see ``oneshui_jax.study``); the results table is printed and
written with plots to ``config.workdir``.
"""

from __future__ import annotations

import logging as std_logging
import os

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from oneshui_jax import report, study
from oneshui_jax.errors import CheckpointError, ConfigError, DataError

_CONFIG = config_flags.DEFINE_config_file(
    "config", "configs/synthfaces.py", "Study configuration (ml_collections file).",
    lock_config=True)


def parse_flags(argv: list[str]) -> list[str]:
    """absl flag parsing; an unknown config field is one clear line, not a traceback."""
    try:
        return flags.FLAGS(argv)
    except (AttributeError, KeyError) as e:
        words = str(e).replace("\\n", " ").replace("\\", "").replace("'", "").split()
        field, hint = (words[0], " ".join(words[1:])) if words else ("?", "")
        raise SystemExit(f"error: unknown config field {field!r}. {hint}".rstrip()) from None


class _OwnInfoOnly(std_logging.Filter):
    """Keeps this package's INFO lines and every library's warnings, minus known noise."""

    NOISE = ("OpenCV is not installed", "Using custom data configuration")

    def filter(self, record: std_logging.LogRecord) -> bool:
        if f"{os.sep}oneshui_jax{os.sep}" in record.pathname:
            return True
        return record.levelno >= std_logging.WARNING and not any(
            n in record.getMessage() for n in self.NOISE)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    logging.get_absl_handler().addFilter(_OwnInfoOnly())
    config = _CONFIG.value
    try:
        records = study.run(config)
    except (ConfigError, DataError, CheckpointError) as e:
        raise SystemExit(f"error: {e}") from None
    print(f"\n{report.subject(records)} ({jax.devices()[0].platform.upper()}):")
    print(report.markdown_table(records, report.metric_name(config.dataset)))
    forget = {r["method"]: r["forget"]["metric"] for r in records}
    if {"pretrain", "retrain"} <= set(forget):
        print(f"forget {report.metric_name(config.dataset)}: pretrain {forget['pretrain']:.2f} "
              f"vs retrain {forget['retrain']:.2f} "
              f"(memorisation gap {forget['pretrain'] - forget['retrain']:+.2f})")
    print(f"results: {os.path.join(config.workdir, 'results.md')}")


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
