"""Where a run lives and what its parts are called (SPEC.md 4.4: one directory per run).

The run directory's path (:func:`run_dir`) and the names of its folders and files, the dotted
names of a parameter tree's leaves and its content hash (:func:`params_hash`, sha256, recorded
in ``metadata.json``), and the check that an output folder stays apart from the runs a command
reads (:func:`check_apart`). Nothing here reads or writes a checkpoint.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import numpy as np

from oneshui_jax import sharding
from oneshui_jax.errors import ConfigError

PARAMS_DIR = "params"
TRAIN_STATE_DIR = "train_state"
ARTIFACTS_DIR = "artifacts"  # a method's prepared artifacts (save_tree / load_tree)
METADATA_FILE = "metadata.json"
_LISTED = 8  # how many names an error message lists before "..."

Params = Any

class LeafInfo(NamedTuple):
    """One array of a checkpoint, read from orbax metadata (no array is loaded)."""

    name: str  # dotted key path, e.g. "blocks.0.attn.qkv.kernel"
    shape: tuple[int, ...]
    dtype: np.dtype

    @property
    def count(self) -> int:
        """Number of scalars."""
        return int(np.prod(self.shape, dtype=np.int64))

    @property
    def nbytes(self) -> int:
        """Size of the array in memory."""
        return self.count * self.dtype.itemsize


def run_dir(root: str, dataset: str, model: str, stage: str, num_identities: int,
            seed: int, split_seed: int | None = None) -> str:
    """``<root>/<dataset>/<model>/<stage>_<N>_<seed>``: the folder of one run;
    ``..._<seed>_split<split_seed>`` when the split comes from another seed than the rest of
    the run's randomness (e.g. RMIA's reference models)."""
    name = f"{stage}_{num_identities}_{seed}"
    if split_seed is not None and split_seed != seed:
        name += f"_split{split_seed}"
    return os.path.join(root, dataset, model, name)


def _key_value(key: Any) -> str | int:
    """The plain key of one ``jax.tree_util`` path entry (dict key, index or attribute)."""
    for attr in ("key", "idx", "name"):
        if hasattr(key, attr):
            return getattr(key, attr)
    raise TypeError(f"unsupported pytree key {key!r}")


def leaf_name(path: tuple[Any, ...]) -> str:
    """Dotted name of a key path (``jax.tree_util`` or plain keys): ``blocks.0.mlp.fc1.bias``."""
    return ".".join(str(k if isinstance(k, str | int) else _key_value(k)) for k in path)


def named_leaves(tree: Any) -> list[tuple[str, Any]]:
    """``(dotted name, leaf)`` for every leaf, in ``jax.tree`` order."""
    flat, _ = jax.tree_util.tree_flatten_with_path(tree)
    return [(leaf_name(path), leaf) for path, leaf in flat]


def params_hash(params: Params) -> str:
    """sha256 over every leaf (name, dtype, shape, bytes) in name order; numpy or jax arrays."""
    digest = hashlib.sha256()
    for name, leaf in sorted(named_leaves(params), key=lambda item: item[0]):
        array = np.ascontiguousarray(sharding.local_value(leaf))  # one replica, no gather
        digest.update(f"{name}|{array.dtype.name}|{array.shape}\n".encode())
        digest.update(array.tobytes())
    return digest.hexdigest()


def short_list(items: list[Any]) -> str:
    """At most ``_LISTED`` items, then how many more."""
    shown = ", ".join(map(str, items[:_LISTED]))
    return shown + (f", ... ({len(items) - _LISTED} more)" if len(items) > _LISTED else "")


def overlap(out: str, source: str) -> str | None:
    """How an output path and an input folder overlap, symbolic links resolved: ``"is"`` (the
    same folder), ``"is inside"`` (``out`` within ``source``), ``"contains"`` (``source``
    within ``out``), or None (apart)."""
    a, b = os.path.realpath(out), os.path.realpath(source)
    if a == b:
        return "is"
    if a.startswith(b.rstrip(os.sep) + os.sep):
        return "is inside"
    if b.startswith(a.rstrip(os.sep) + os.sep):
        return "contains"
    return None


def check_apart(out: str, inputs: Sequence[tuple[str, str | None]], *, flag: str = "--out",
                strict: bool = False) -> None:
    """ConfigError naming both paths when the output ``out`` (given as ``flag``) is, lies inside
    or contains one of ``inputs`` (``(what it is, path)``; None paths are skipped): writing
    inside an input run changes what was read, and replacing a folder that holds it destroys
    it. ``strict``: only inside / contains (equality is the caller's own check)."""
    for what, source in inputs:
        if not source:
            continue
        how = overlap(out, source)
        if how is None or (strict and how == "is"):
            continue
        if how == "contains":
            raise ConfigError(f"{flag} {out} contains {what} {source}: writing or replacing it "
                              "could destroy the input; choose a folder that does not hold it")
        where = "is" if how == "is" else "is inside"
        raise ConfigError(f"{flag} {out} {where} {what} {source}: writing there would change "
                          "the run being read; choose a folder outside it")
