"""Everything that talks to orbax: a run's finished parameters and other array trees
(SPEC.md 4.4, the reference's ``state_dict``, with orbax instead of pickles).

``save_params`` / ``load_params`` (``params/``, committed atomically, the run marked done
afterwards), ``save_tree`` / ``load_tree`` (e.g. a method's artifacts), ``params_info`` (leaf
names, shapes and dtypes from orbax metadata, nothing loaded) and ``remove_uncommitted``.
Orbax stores every key as a string, so the leaf key paths are recorded with their types in the
checkpoint's custom metadata (``KEY_PATHS``) and a tree restored without a template gets its
int keys back. Every orbax failure becomes one ``CheckpointError`` naming the path, and the
stragglers a failed orbax read leaves behind are kept off stderr.
"""

from __future__ import annotations

import glob
import os
import shutil
import sys
from collections.abc import Callable, Iterator, Mapping
from typing import Any, TypeVar

import jax
import numpy as np
import orbax.checkpoint as ocp

from oneshui_jax import sharding
from oneshui_jax.checkpoints.compat import structure_differences
from oneshui_jax.checkpoints.layout import (
    METADATA_FILE,
    PARAMS_DIR,
    LeafInfo,
    Params,
    leaf_name,
    named_leaves,
    params_hash,
    short_list,
)
from oneshui_jax.checkpoints.metadata import (
    _check_data_files,
    is_finished,
    read_metadata,
    write_metadata,
)
from oneshui_jax.errors import CheckpointError
from oneshui_jax.files import os_reason

KEY_PATHS = "oneshui_jax/key_paths"
"""Custom-metadata entry of ``params/``: every leaf's key path, ints kept as ints."""

T = TypeVar("T")


def _is_orbax_straggler(report: Any) -> bool:
    """An unraisable report left behind by a failed orbax read (see ``_drop_orbax_stragglers``)."""
    if isinstance(report.exc_value, RuntimeError) and str(report.exc_value) == \
            "Event loop is closed":
        return True
    code = getattr(report.object, "cr_code", None)  # an abandoned coroutine of orbax's
    return code is not None and f"{os.sep}orbax{os.sep}" in code.co_filename


def _drop_orbax_stragglers() -> None:
    """Silences the stragglers of failed orbax reads (a ``sys.unraisablehook``, installed once).

    When one read of a corrupt checkpoint fails, orbax closes its event loop while its other
    reads are still pending (it may even catch the failure itself and log a warning): tensorstore
    later reports ``RuntimeError('Event loop is closed')`` and the abandoned orbax coroutines
    report their errors when collected, as bare tracebacks on stderr long after the
    CheckpointError was raised. Exactly those are dropped; every other report goes to the
    previous hook.
    """
    previous = sys.unraisablehook
    if getattr(previous, "drops_orbax_stragglers", False):
        return

    def hook(report: Any) -> None:
        if not _is_orbax_straggler(report):
            previous(report)

    hook.drops_orbax_stragglers = True
    sys.unraisablehook = hook


def _orbax(fn: Callable[[], T], path: str, action: str, *, reading: bool = True) -> T:
    """Runs an orbax call; any failure becomes one CheckpointError naming ``path``."""
    _drop_orbax_stragglers()
    try:
        return fn()
    except CheckpointError:
        raise
    except Exception as e:  # orbax / tensorstore raise many types; the message is what matters
        detail = (str(e).strip().splitlines() or [""])[0][:300]
        reason = os_reason(e)
        if reason and not reading:  # a full disk, a read-only folder: the OS's reason first
            raise CheckpointError(f"{reason}: {path} (could not {action} it; nothing of this "
                                  f"save was kept)") from e
        why = ": it is corrupt or not an orbax checkpoint" if reading else ""
        raise CheckpointError(
            f"could not {action} {path}{why} ({type(e).__name__}: {detail})") from e


def _default_sharding() -> jax.sharding.Sharding:
    """Arrays restore replicated over the mesh (``sharding``), or onto the default device
    without one (not the device they were saved from)."""
    return sharding.replicated() or jax.sharding.SingleDeviceSharding(jax.devices()[0])


def _abstract(tree: Any) -> Any:
    """Target tree for an orbax restore: a ShapeDtypeStruct per leaf (arrays or structs)."""
    default = _default_sharding()

    def leaf(x: Any) -> jax.ShapeDtypeStruct:
        x_sharding = getattr(x, "sharding", None)
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x_sharding or default)

    return jax.tree.map(leaf, tree)


def _dict_key_paths(tree: Any, prefix: tuple[str | int, ...] = ()) -> Iterator[list[str | int]]:
    """Key paths of a nested dict of arrays; TypeError for anything else (lists, None, ...)."""
    if not isinstance(tree, Mapping):
        raise TypeError(f"params must be a nested dict of arrays; {leaf_name(prefix) or 'the root'}"
                        f" is a {type(tree).__name__}")
    as_text = [str(k) for k in tree]
    if len(set(as_text)) != len(as_text):
        raise TypeError(f"params at {leaf_name(prefix) or 'the root'} have keys that are equal as "
                        f"strings ({sorted(as_text)}); orbax cannot store both")
    for key, value in tree.items():
        if not isinstance(key, str | int) or isinstance(key, bool):
            raise TypeError(f"params keys must be str or int; found {key!r} under "
                            f"{leaf_name(prefix) or 'the root'}")
        path = (*prefix, key)
        if isinstance(value, Mapping):
            yield from _dict_key_paths(value, path)
        elif hasattr(value, "shape") and hasattr(value, "dtype"):
            yield list(path)
        else:
            raise TypeError(f"params leaf {leaf_name(path)} is a {type(value).__name__}, "
                            "not an array")


def _metadata_leaf(tree: Mapping[str, Any], path: list[str | int]) -> Any:
    """The orbax metadata leaf at ``path`` (orbax keys are strings); None if absent."""
    node: Any = tree
    for key in path:
        if not isinstance(node, Mapping) or str(key) not in node:
            return None
        node = node[str(key)]
    return node


def _stored_leaves(path: str, required: bool = True
                   ) -> list[tuple[list[str | int], Any]] | None:
    """``(key path, orbax array metadata)`` of every leaf of a ``params/`` folder, saved order.

    A folder saved without key paths (``save_tree`` of a tree that is not a nested dict) gives
    None when not ``required``.
    """
    with ocp.StandardCheckpointer() as checkpointer:
        step = _orbax(lambda: checkpointer.metadata(path), path, "read the metadata of")
    key_paths = (step.custom_metadata or {}).get(KEY_PATHS)
    tree = getattr(step.item_metadata, "tree", None)
    if key_paths is None and not required:
        return None
    if key_paths is None or not isinstance(tree, Mapping):
        raise CheckpointError(f"{path} is corrupt or was not written by oneshui_jax.checkpoints:"
                              " its orbax metadata (_CHECKPOINT_METADATA, _METADATA) is missing, "
                              "unreadable or lacks the key paths that save_params records")
    leaves = [(key_path, _metadata_leaf(tree, key_path)) for key_path in key_paths]
    missing = [leaf_name(p) for p, m in leaves if m is None]
    if missing:
        raise CheckpointError(f"{path} is corrupt: arrays {short_list(missing)} are recorded but "
                              "missing from its orbax metadata")
    return leaves


def _nested(items: list[tuple[list[str | int], Any]]) -> dict:
    """Nested dict from ``(key path, value)`` pairs."""
    out: dict = {}
    for key_path, value in items:
        node = out
        for key in key_path[:-1]:
            node = node.setdefault(key, {})
        node[key_path[-1]] = value
    return out



ORBAX_TMP_SUFFIX = ".orbax-checkpoint-tmp"  # orbax writes <path><suffix>-<time>, then renames


def remove_uncommitted(path: str) -> list[str]:
    """Removes orbax's temporary folders of an unfinished save to ``path`` (primary process
    only); returns what was removed. Orbax commits by renaming a complete temporary folder, so
    these hold nothing a reader may use."""
    if not sharding.is_primary():
        return []
    stale = glob.glob(glob.escape(path.rstrip(os.sep)) + ORBAX_TMP_SUFFIX + "*")
    for folder in stale:
        shutil.rmtree(folder, ignore_errors=True)
    return stale


def save_params(run_dir: str, params: Params, metadata: Mapping[str, Any], *,
                overwrite: bool = False) -> str:
    """Saves finished parameters to ``run_dir/params`` and marks the run done; returns the hash.

    ``metadata.json`` says "training" while ``params/`` is (re)written, so an interrupted save
    leaves an unfinished run, never a finished one with the wrong parameters. Replacing a finished
    run needs ``overwrite=True``.
    """
    if is_finished(run_dir) and not overwrite:
        raise CheckpointError(f"{run_dir} already holds a finished run; pass overwrite=True to "
                              "replace it")
    key_paths = list(_dict_key_paths(params))
    digest = params_hash(params)
    write_metadata(run_dir, {k: v for k, v in metadata.items() if k != "params_hash"},
                   status="training")
    path = os.path.join(os.path.abspath(run_dir), PARAMS_DIR)

    def save() -> None:
        with ocp.StandardCheckpointer() as checkpointer:
            checkpointer.save(path, params, force=True, custom_metadata={KEY_PATHS: key_paths})
            checkpointer.wait_until_finished()

    try:
        _orbax(save, path, "save parameters to", reading=False)  # every process, collectively
    except BaseException:  # an interrupt or a full disk: orbax's uncommitted folder goes too
        remove_uncommitted(path)
        raise
    write_metadata(run_dir, {**metadata, "params_hash": digest}, status="done")
    sharding.barrier(f"saved {path}")  # no process reads the run before it is marked done
    return digest


def params_info(run_dir: str) -> list[LeafInfo]:
    """Name, shape and dtype of every saved parameter, from orbax metadata (nothing loaded)."""
    path, _ = _finished(run_dir)
    return [LeafInfo(leaf_name(key_path), tuple(meta.shape), np.dtype(meta.dtype))
            for key_path, meta in _stored_leaves(path)]


def _finished(run_dir: str) -> tuple[str, dict]:
    """``(run_dir/params, metadata)`` of a finished run; CheckpointError otherwise."""
    metadata = read_metadata(run_dir)
    if metadata["status"] != "done":
        raise CheckpointError(f"{run_dir} is not finished (status {metadata['status']!r}): its "
                              f"{PARAMS_DIR}/ were never committed")
    path = os.path.join(os.path.abspath(run_dir), PARAMS_DIR)
    if not os.path.isdir(path):
        raise CheckpointError(f"{path} is missing: {METADATA_FILE} says the run is done, so the "
                              "parameters were deleted or moved")
    _check_data_files(run_dir, metadata, PARAMS_DIR)
    return path, metadata


def _check_template(path: str, stored: Mapping[str, tuple[int, ...]], template: Any) -> None:
    """CheckpointError naming the leaves in which ``template`` and the stored tree differ."""
    differences = structure_differences(
        stored, {name: leaf.shape for name, leaf in named_leaves(template)}, "the checkpoint",
        "the template")
    if differences:
        raise CheckpointError(f"{path} does not match the template: " + "; ".join(differences))


def load_params(run_dir: str, template: Params = None, *, verify: bool = True) -> Params:
    """Restores the finished parameters of ``run_dir`` as jax arrays on the default device.

    Without ``template`` the tree is rebuilt from the recorded key paths (int keys stay ints);
    with one (arrays or ``jax.ShapeDtypeStruct``), the result has its structure. ``verify``
    checks the content hash against ``metadata.json`` (mismatch: CheckpointError "corrupt").
    """
    path, metadata = _finished(run_dir)
    params = _restore_tree(path, template, "parameters")
    if verify:
        expected = metadata.get("params_hash")
        actual = params_hash(params)
        if actual != expected:
            raise CheckpointError(f"{path} is corrupt: its content hash {actual[:16]}... differs "
                                  f"from {str(expected)[:16]}... recorded in {METADATA_FILE}")
    return params


def _restore_tree(path: str, template: Params, what: str) -> Params:
    """Restores the orbax folder ``path``: shaped like ``template``, or, without one, rebuilt
    from the key paths recorded at save time (int keys stay ints)."""
    stored = _stored_leaves(path, required=template is None)
    if template is None:
        default = _default_sharding()
        target = _nested([(key_path, jax.ShapeDtypeStruct(tuple(meta.shape), meta.dtype,
                                                          sharding=default))
                          for key_path, meta in stored])
    else:
        if stored is not None:  # otherwise orbax itself checks the structure
            _check_template(path, {leaf_name(key_path): meta.shape for key_path, meta in stored},
                            template)
        target = _abstract(template)

    def restore() -> Params:
        with ocp.StandardCheckpointer() as checkpointer:
            return checkpointer.restore(path, target)

    return _orbax(restore, path, f"restore {what} from")


def save_tree(run_dir: str, name: str, tree: Params) -> str:
    """Saves another array tree of a run (e.g. a method's artifacts) to ``run_dir/name``.

    Any pytree of arrays (optax states included). For a nested dict of arrays the key paths are
    recorded, as ``save_params`` does, so ``load_tree`` needs no template; other trees are
    loaded with one. Committed atomically by orbax; returns its content hash (record it in the
    metadata).
    """
    path = os.path.join(os.path.abspath(run_dir), name)
    try:
        custom = {KEY_PATHS: list(_dict_key_paths(tree))}
    except TypeError:  # not a nested dict of arrays: restored with a template
        custom = {}

    def save() -> None:
        with ocp.StandardCheckpointer() as checkpointer:
            checkpointer.save(path, tree, force=True, custom_metadata=custom)
            checkpointer.wait_until_finished()

    _orbax(save, path, f"save {name} to", reading=False)
    return params_hash(tree)


def load_tree(run_dir: str, name: str, template: Params = None,
              expected_hash: str | None = None) -> Params:
    """Restores ``run_dir/name`` (shaped like ``template`` if given); checks ``expected_hash``."""
    path = os.path.join(os.path.abspath(run_dir), name)
    if not os.path.isdir(path):
        raise CheckpointError(f"{path} does not exist: the run at {run_dir} has no {name!r}")
    if os.path.isfile(os.path.join(run_dir, METADATA_FILE)):
        _check_data_files(run_dir, read_metadata(run_dir), name)
    tree = _restore_tree(path, template, name)
    if expected_hash is not None and params_hash(tree) != expected_hash:
        raise CheckpointError(f"{path} is corrupt: its content hash differs from the one "
                              f"recorded in {METADATA_FILE}")
    return tree
