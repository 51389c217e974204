"""The resumable training state of a run (``train_state/``): what a killed training resumes from.

:class:`TrainCheckpointer` keeps the newest step (arrays: params, optax state, ...; a JSON state:
epoch, history, data-iterator state, seeds) with orbax's ``CheckpointManager``; every save is
committed atomically, so a process killed mid-save leaves the previous step restorable, and a
resumed run equals an uninterrupted one.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping
from typing import Any

import numpy as np
import orbax.checkpoint as ocp

from oneshui_jax.checkpoints.layout import TRAIN_STATE_DIR, LeafInfo, named_leaves
from oneshui_jax.checkpoints.metadata import _as_json
from oneshui_jax.checkpoints.orbax_io import (
    _abstract,
    _check_template,
    _orbax,
    remove_uncommitted,
)
from oneshui_jax.errors import CheckpointError


class TrainCheckpointer:
    """The latest resumable training state of a run, in ``run_dir/train_state/<step>/``.

    Each step holds ``arrays`` (any pytree of arrays: params, optax state, best params, ...) and
    ``state`` (a JSON-able dict: epoch, history, data-iterator state, seeds, ...). Saves are
    synchronous and atomic (orbax writes a temporary folder and renames it when complete), so a
    process killed mid-save leaves the previous step restorable; unfinished temporary folders
    are ignored and cleaned up. Only the newest ``max_to_keep`` steps are kept.

    ``every_s`` > 0 spaces the saves: a ``save`` within ``every_s`` seconds of the previous one
    (or of opening) is skipped, so a killed run loses at most that much work while short epochs
    do not each pay for a save (0.5 s for a small model on CPU). ``force=True`` always saves.
    Which steps are saved never changes results: a resumed run equals an uninterrupted one.
    """

    def __init__(self, run_dir: str, max_to_keep: int = 1, every_s: float = 0.0) -> None:
        self.directory = os.path.join(os.path.abspath(run_dir), TRAIN_STATE_DIR)
        self.every_s = float(every_s)
        self._last_save = time.monotonic()
        options = ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep, enable_async_checkpointing=False,
            cleanup_tmp_directories=True, create=True)
        handlers = {"arrays": ocp.StandardCheckpointHandler(),
                    "state": ocp.JsonCheckpointHandler()}
        self._manager = _orbax(
            lambda: ocp.CheckpointManager(self.directory, options=options,
                                          item_handlers=handlers),
            self.directory, "open training state in", reading=False)

    def save(self, step: int, arrays: Any, state: Mapping[str, Any], force: bool = False) -> bool:
        """Saves step ``step`` and returns True once it is committed to disk; returns False
        (nothing written) when ``every_s`` has not passed since the last save, unless
        ``force``."""
        if not force and time.monotonic() - self._last_save < self.every_s:
            return False
        record = _as_json(dict(state), "the training state")
        args = ocp.args.Composite(arrays=ocp.args.StandardSave(arrays),
                                  state=ocp.args.JsonSave(record))

        def save() -> None:
            self._manager.save(step, args=args, force=True)
            self._manager.wait_until_finished()

        try:
            _orbax(save, self.directory, f"save step {step} to", reading=False)
        except BaseException:  # an interrupt or a full disk: the earlier steps stay usable
            remove_uncommitted(os.path.join(self.directory, str(step)))
            raise
        self._last_save = time.monotonic()
        return True

    def latest_step(self) -> int | None:
        """The newest committed step on disk (re-read, so saves by other processes count)."""
        _orbax(self._manager.reload, self.directory, "list the steps of")
        return self._manager.latest_step()

    def restore(self, template_arrays: Any) -> tuple[Any, dict] | None:
        """``(arrays, state)`` of the latest step, arrays shaped like ``template_arrays``.

        ``template_arrays`` has the saved tree's structure (arrays or ``jax.ShapeDtypeStruct``;
        optax namedtuples included). None if nothing was saved yet.
        """
        step = self.latest_step()
        if step is None:
            return None
        where = os.path.join(self.directory, str(step))
        _check_template(where, {leaf.name: leaf.shape for leaf in self._leaves(step)},
                        template_arrays)
        args = ocp.args.Composite(arrays=ocp.args.StandardRestore(_abstract(template_arrays)),
                                  state=ocp.args.JsonRestore())
        restored = _orbax(lambda: self._manager.restore(step, args=args), where,
                          "restore training state from")
        return restored["arrays"], restored["state"]

    def _leaves(self, step: int) -> list[LeafInfo]:
        """The arrays of ``step`` from orbax metadata, in natural name order (nothing loaded)."""
        where = os.path.join(self.directory, str(step))
        metadata = _orbax(lambda: self._manager.item_metadata(step), where, "read the metadata of")
        tree = getattr(metadata.get("arrays"), "tree", None)
        if tree is None:
            raise CheckpointError(f"{where} has no array metadata; expected a step written by "
                                  "TrainCheckpointer.save")
        leaves = [LeafInfo(name, tuple(meta.shape), np.dtype(meta.dtype))
                  for name, meta in named_leaves(tree)]
        return sorted(leaves, key=lambda leaf: _natural(leaf.name))

    def info(self) -> tuple[int, list[LeafInfo], dict] | None:
        """``(step, arrays' leaves, JSON state)`` of the latest step without loading arrays."""
        step = self.latest_step()
        if step is None:
            return None
        args = ocp.args.Composite(state=ocp.args.JsonRestore())
        restored = _orbax(lambda: self._manager.restore(step, args=args),
                          os.path.join(self.directory, str(step)), "read the training state of")
        return step, self._leaves(step), restored["state"]

    def close(self) -> None:
        """Waits for pending work and releases orbax's threads."""
        self._manager.close()

    def __enter__(self) -> TrainCheckpointer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _natural(name: str) -> list[tuple[int, int | str]]:
    """Sort key ordering ``blocks.2`` before ``blocks.10`` (orbax metadata keys are strings)."""
    return [(0, int(part)) if part.isdigit() else (1, part) for part in name.split(".")]
