"""Training curves as TensorBoard event files, to follow a study (or a sweep of them) live.

``metrics.jsonl`` in a stage's run directory stays the source of truth; this is a view of the
same numbers while they are being made. Each stage run that trains (pretrain, retrain,
MetaUnlearn's meta-training) writes one TensorBoard run::

    <config.workdir>/tensorboard/<dataset>/<model>/<stage>_<N>_<seed>[_split<s>]/
        events.out.tfevents.<time>.<host>...     one file per process that wrote to it

the run name being the last three parts of the stage's run directory (``checkpoints.run_dir``),
so ``tensorboard --logdir <workdir>/tensorboard`` shows every stage of every study of a sweep
as its own run. Tags: ``train/loss`` and ``train/lr`` (every 10 steps, where the progress bar
already fetches the loss), ``epoch/<key>`` for every number of an epoch's record (``train_loss``,
``val_loss``, ``val_metric``, ``lr``, ``images_per_s``), all at the global step; MetaUnlearn's
``meta_train/outer_loss`` and ``meta_train/meta_loss`` per request and ``meta_epoch/<key>`` per
epoch, at the number of requests done.

A resumed stage writes the epochs that run again a second time, into a new event file of the
same run; TensorBoard then has two points at those steps and shows the later one (the values of
an uninterrupted run, as the resume is exact).

The writer is ``tensorboardX.SummaryWriter`` (the optional extra: ``pip install -e
.[tensorboard]``), imported and opened at the first value written, so a stage that writes
nothing leaves no folder. :func:`open_writer` returns a :class:`NoOpWriter` when writing is
disabled (``config.tensorboard = False``), tensorboardX is not installed (one info line says how
to install it) or this is not the primary process (``jax.process_index() != 0``). Values that
are not finite numbers (None, strings, booleans, NaN, inf) are skipped. Writing never stops a
run: a writer that cannot create its folder logs one warning and writes nothing more.
"""

from __future__ import annotations

import math
import numbers
import os
from collections.abc import Iterable, Mapping
from typing import Any

import jax
import numpy as np
from absl import logging

from oneshui_jax import files

TENSORBOARD_DIR = "tensorboard"  # under config.workdir
INSTALL_HINT = "pip install -e .[tensorboard]"
FLUSH_SECS = 10  # the longest a written value waits before it is on disk

_hint_logged = False


def scalar_value(value: Any) -> float | None:
    """``value`` as a float if it is a finite real number (a Python or NumPy number, or a 0-d
    array of ints or floats; booleans excluded), else None."""
    if isinstance(value, bool | np.bool_):
        return None
    if not isinstance(value, numbers.Real):
        dtype = getattr(value, "dtype", None)
        if getattr(value, "shape", None) != () or dtype is None \
                or np.dtype(dtype).kind not in "iuf":
            return None
    result = float(value)
    return result if math.isfinite(result) else None


def prefixed(prefix: str, record: Mapping[str, Any],
             exclude: Iterable[str] = ()) -> dict[str, Any]:
    """``{"<prefix>/<key>": value}`` for every key of ``record`` outside ``exclude``."""
    skip = set(exclude)
    return {f"{prefix}/{key}": value for key, value in record.items() if key not in skip}


class NoOpWriter:
    """A writer that writes nothing: the writer's interface, for when TensorBoard is off."""

    enabled = False
    logdir: str | None = None

    def scalars(self, step: int, values: Mapping[str, Any]) -> None:
        """Writes nothing."""

    def flush(self) -> None:
        """Nothing to flush."""

    def close(self) -> None:
        """Nothing to close."""

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class MetricWriter(NoOpWriter):
    """Scalars of one run into ``logdir`` through ``tensorboardX.SummaryWriter``.

    The SummaryWriter (and the folder) is made at the first value written. ``scalars(step,
    {tag: value})`` writes every finite number of ``values`` at ``step`` and skips the rest;
    ``flush`` puts what was written on disk (otherwise it gets there within ``flush_secs``);
    ``close`` flushes and closes, after which nothing more is written. Use it as a context manager.
    """

    enabled = True

    def __init__(self, logdir: str, *, flush_secs: int = FLUSH_SECS):
        self.logdir = logdir
        self._flush_secs = flush_secs
        self._writer = None
        self._closed = False

    def _open(self):
        if self._writer is None and not self._closed:
            from tensorboardX import SummaryWriter

            try:
                self._writer = SummaryWriter(self.logdir, flush_secs=self._flush_secs)
            except OSError as e:
                logging.warning("tensorboard: cannot write to %s (%s); no TensorBoard curves "
                                "for this run (metrics.jsonl has them)", self.logdir, e)
                self._closed = True
        return self._writer

    def scalars(self, step: int, values: Mapping[str, Any]) -> None:
        """Writes each finite number of ``values`` (tag -> value) at ``step``."""
        numbers_only = {tag: v for tag, v in ((t, scalar_value(x)) for t, x in values.items())
                        if v is not None}
        if not numbers_only or self._open() is None:
            return
        with files.naming(self.logdir):
            for tag, value in numbers_only.items():
                self._writer.add_scalar(tag, value, global_step=int(step))

    def flush(self) -> None:
        if self._writer is not None:
            with files.naming(self.logdir):
                self._writer.flush()

    def close(self) -> None:
        if self._writer is not None:
            writer, self._writer = self._writer, None
            with files.naming(self.logdir):
                writer.close()
        self._closed = True


def tensorboardx_available() -> bool:
    try:
        import tensorboardX  # noqa: F401
    except ImportError:
        return False
    return True


def open_writer(logdir: str, *, enabled: bool = True) -> NoOpWriter:
    """A :class:`MetricWriter` into ``logdir``, or a :class:`NoOpWriter` when ``enabled`` is
    False, this is not the primary process, or tensorboardX is not installed (one info line per
    process says how to install it)."""
    global _hint_logged
    if not enabled or jax.process_index() != 0:
        return NoOpWriter()
    if not tensorboardx_available():
        if not _hint_logged:
            logging.info("tensorboard: tensorboardX is not installed, so no TensorBoard curves "
                         "(metrics.jsonl has them); to follow runs live: %s", INSTALL_HINT)
            _hint_logged = True
        return NoOpWriter()
    return MetricWriter(logdir)


def run_name(run_dir: str) -> str:
    """``<dataset>/<model>/<stage>_<N>_<seed>``: the last three parts of a stage's run
    directory (``checkpoints.run_dir``), which name the stage run."""
    parts = os.path.normpath(os.path.abspath(run_dir)).split(os.sep)
    return "/".join(parts[-3:])


def stage_logdir(config, run_dir: str) -> str:
    """``<config.workdir>/tensorboard/<run_name(run_dir)>``."""
    return os.path.join(os.path.expanduser(config.workdir), TENSORBOARD_DIR,
                        *run_name(run_dir).split("/"))


def for_stage(config, run_dir: str) -> NoOpWriter:
    """The writer of the stage run in ``run_dir``; a no-op one unless ``config.tensorboard``
    (a config without the flag or without a ``workdir`` writes nothing)."""
    if not config.get("tensorboard", False) or not config.get("workdir"):
        return NoOpWriter()
    return open_writer(stage_logdir(config, run_dir))
