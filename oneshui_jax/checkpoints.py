"""Checkpoints of trained models and resumable training state (orbax).

Corresponds to the reference's ``.pth`` checkpoints ``{"args", "splits", "state_dict"}`` (SPEC.md
4.4), with orbax instead of pickles. One directory per run, like the reference::

    <root>/<dataset>/<model>/<stage>_<N>_<seed>/     run_dir(); stage: pretrain, retrain, a method
        params/          the finished model's parameters (orbax StandardCheckpointer, committed
                         atomically: written to a temporary folder, then renamed)
        metadata.json    config, splits, metrics, library versions, params_hash, created,
                         status ("training" | "done"), data_files (a finished run's orbax
                         files and sizes), metadata_hash (sha256 of its own content, run_dir
                         aside); written atomically (temp file + rename)
        train_state/     while training runs: the latest resumable state (TrainCheckpointer,
                         orbax CheckpointManager; one folder per step, the newest 1-2 kept)
        artifacts/       an unlearning method's prepared artifacts (e.g. MetaUnlearn's meta-loss;
                         save_tree, key paths recorded, hash in metadata ``artifacts_hash``)

Parameters are a plain nested dict (``vit.init_params``) whose keys are strings or ints (block
indices). Orbax stores every key as a string, so ``save_params`` records the leaf key paths with
their types (JSON keeps ints apart from strings) in the checkpoint's custom metadata, and
``load_params`` restores into a target tree rebuilt from them: the ints come back as ints.

Every failure a user can cause (missing, foreign or corrupt directory, a mismatching run) raises
one ``CheckpointError`` naming the path and what was expected; orbax's own exception is kept as
``__cause__``. A missing or resized orbax data file of a run that records ``data_files`` is named
before orbax reads the folder (orbax itself only says that an array cannot be read).
"""

from __future__ import annotations

import datetime
import glob
import hashlib
import importlib.metadata
import json
import os
import platform
import shutil
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, NamedTuple, TypeVar

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from oneshui_jax import sharding
from oneshui_jax.errors import CheckpointError, ConfigError
from oneshui_jax.files import os_reason, save_json, to_json

PARAMS_DIR = "params"
TRAIN_STATE_DIR = "train_state"
ARTIFACTS_DIR = "artifacts"  # a method's prepared artifacts (save_tree / load_tree)
METADATA_FILE = "metadata.json"
STATUSES = ("training", "done")
KEY_PATHS = "oneshui_jax/key_paths"
"""Custom-metadata entry of ``params/``: every leaf's key path, ints kept as ints."""

_VERSIONED = ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "numpy")
_REQUIRED_CONFIG = ("dataset", "model", "num_identities", "seed")
_LISTED = 8  # how many names an error message lists before "..."
METADATA_HASH = "metadata_hash"
"""Field of ``metadata.json``: sha256 of its own content (``metadata_hash``), so that a hand edit
is found by ``inspect --verify``. Runs written before it existed have none."""
DATA_FILES = "data_files"
"""Field of a finished run's ``metadata.json``: every file of its orbax folders (``params/``,
``artifacts/``) as saved, ``{"params/manifest.ocdbt": bytes, ...}``; a missing or resized one
is named before orbax reads the folder."""
_ORBAX_FOLDERS = (PARAMS_DIR, ARTIFACTS_DIR)
_UNHASHED = (METADATA_HASH, "run_dir")  # run_dir: where the run lives, rewritten when moved
_OBJECT_FIELDS = ("config", "splits", "versions", "model_config", "method_config", "data_audit",
                  DATA_FILES)
"""Fields of ``metadata.json`` that are JSON objects (or null) when present."""

Params = Any
T = TypeVar("T")


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


# --------------------------------------------------------------------------------------------
# Names, hashes, JSON
# --------------------------------------------------------------------------------------------


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


# A device-side checksum of a parameter tree (the request path: only 16 bytes come to the host)

DIGEST_WORDS = 4  # uint32 words: 128 bits, 32 hex digits
_GOLDEN = np.uint32(0x9E3779B1)
_LANE_KEYS = tuple(np.uint32(k) for k in (0x85EBCA77, 0xC2B2AE3D, 0x27D4EB2F, 0x165667B1))
_LANE_ODD = tuple(np.uint32(k) for k in (0xCC9E2D51, 0x1B873593, 0x7FEB352D, 0x846CA68B))


def _fmix32(x: jax.Array) -> jax.Array:
    """MurmurHash3's 32-bit finaliser: a bijection of uint32 that spreads every input bit."""
    shift = jax.lax.shift_right_logical
    x = x ^ shift(x, np.uint32(16))
    x = x * np.uint32(0x85EBCA6B)
    x = x ^ shift(x, np.uint32(13))
    x = x * np.uint32(0xC2B2AE35)
    return x ^ shift(x, np.uint32(16))


def _words(x: jax.Array) -> jax.Array:
    """The bit pattern of ``x`` as a flat uint32 vector (64-bit elements give two words each,
    8- and 16-bit ones are zero-extended; bool as 0/1)."""
    dtype = np.dtype(x.dtype)
    if dtype == np.bool_:
        return x.astype(jnp.uint32).reshape(-1)
    if dtype.kind not in "biuf" and dtype.name not in ("bfloat16",) and not dtype.name.startswith(
            "float8"):
        raise TypeError(f"params_digest: unsupported leaf dtype {dtype} (real numbers, integers "
                        "and bool only)")
    unsigned = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32, 8: jnp.uint32}[dtype.itemsize]
    bits = jax.lax.bitcast_convert_type(x, unsigned)  # [..., 2] for 64-bit elements
    return bits.astype(jnp.uint32).reshape(-1)


def _leaf_seed(index: int, name: str, dtype: Any, shape: tuple[int, ...]) -> np.uint32:
    """A per-leaf constant from its position in name order, name, dtype and shape (static)."""
    text = f"{index}|{name}|{np.dtype(dtype).name}|{tuple(shape)}".encode()
    return np.uint32(int.from_bytes(hashlib.sha256(text).digest()[:4], "little"))


def _leaf_digest(words: jax.Array, seed: np.uint32) -> jax.Array:
    """uint32[DIGEST_WORDS] of one leaf: word ``j`` is the wrapping sum over elements of a
    hash keyed by lane ``j`` and the element's position, a bijection of the element's bits
    (an exact integer reduction: any order or sharding gives the same words; sums only, as
    cross-device reductions offer no xor)."""
    position = _fmix32(jnp.arange(words.shape[0], dtype=jnp.uint32) * _GOLDEN + seed)
    keys = jnp.asarray(_LANE_KEYS, jnp.uint32)
    lane_position = _fmix32(position[:, None] ^ keys)  # [n, lanes]
    hashed = _fmix32((words[:, None] ^ lane_position) * jnp.asarray(_LANE_ODD, jnp.uint32)
                     + keys)
    return jnp.sum(hashed, axis=0, dtype=jnp.uint32)


@jax.jit
def params_digest(params: Params) -> jax.Array:
    """A 128-bit checksum of a parameter tree, computed on the device: uint32[4].

    Covers every leaf's bits, name (dotted key path), dtype, shape and place in name order,
    like :func:`params_hash`; compiled once per tree structure and shapes. Only the four words
    leave the device (:func:`params_digest_hex`). Integer arithmetic and wrapping sums only, so
    the words are exact: the same on every backend, however the leaves are sharded or
    placed, and equal for equal bits (``-0.0`` and ``0.0``, or two NaN payloads, differ).

    A checksum, NOT a cryptographic hash: each element is mixed with its position, leaf and
    lane (MurmurHash3's finaliser, a bijection of its bits), then summed. Changing one element
    of one leaf always changes all four words (each lane's hash of that element changes).
    Other accidental changes (swapped elements or leaves, many elements) are caught unless each
    of the four words collides, about 2**-32 per word for unrelated changes; the words are not
    independent, so do not count on 2**-128. Collisions are easy to construct on purpose (every
    step is invertible or linear): :func:`params_hash` (sha256, on the host) remains the
    integrity check of checkpoints and of the request chain.
    """
    named, _ = jax.tree_util.tree_flatten_with_path(params)
    leaves = sorted(((leaf_name(path), leaf) for path, leaf in named), key=lambda item: item[0])
    out = jnp.zeros(DIGEST_WORDS, jnp.uint32)
    for index, (name, leaf) in enumerate(leaves):
        seed = _leaf_seed(index, name, leaf.dtype, leaf.shape)
        leaf_words = _leaf_digest(_words(leaf), seed)
        keys = _fmix32(jnp.asarray(_LANE_KEYS, jnp.uint32) + seed)
        out = out + _fmix32(leaf_words ^ keys)  # one leaf's change changes every summed word
    return _fmix32(out ^ np.uint32(len(leaves)))


def digest_hex(words: Any) -> str:
    """``params_digest`` words as 32 hex digits (fetches them to the host)."""
    return "".join(f"{int(w):08x}" for w in sharding.local_value(words).astype(np.uint32))


def params_digest_hex(params: Params) -> str:
    """:func:`params_digest` of ``params`` as 32 hex digits: 16 bytes come to the host."""
    return digest_hex(params_digest(params))


def _as_json(obj: Any, what: str) -> Any:
    """``files.to_json(obj)``, its TypeError or ValueError as a CheckpointError naming ``what``."""
    try:
        return to_json(obj)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{what} cannot be written as JSON: {e}") from e


def metadata_hash(metadata: Mapping[str, Any]) -> str:
    """sha256 of a run's metadata as JSON (keys sorted), without ``metadata_hash`` itself and
    ``run_dir`` (where the run lives; a moved or served run rewrites it)."""
    content = {k: v for k, v in metadata.items() if k not in _UNHASHED}
    text = json.dumps(_as_json(content, "checkpoint metadata"), sort_keys=True,
                      separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def splits_hash(splits: Mapping[str, Any]) -> str:
    """sha256 of a splits dict (keys sorted, list order kept): equal splits, equal hash."""
    text = json.dumps(_as_json(dict(splits), "the splits"), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def library_versions() -> dict[str, str]:
    """Versions of Python and the libraries a checkpoint depends on."""
    versions = {"python": platform.python_version()}
    for name in _VERSIONED:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def short_list(items: list[Any]) -> str:
    """At most ``_LISTED`` items, then how many more."""
    shown = ", ".join(map(str, items[:_LISTED]))
    return shown + (f", ... ({len(items) - _LISTED} more)" if len(items) > _LISTED else "")


# --------------------------------------------------------------------------------------------
# Orbax plumbing
# --------------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------------
# Run directories: metadata and finished parameters
# --------------------------------------------------------------------------------------------


def _check_run_dir(path: str) -> None:
    """CheckpointError unless ``path`` is a folder holding ``metadata.json``."""
    expected = f"expected a run directory holding {METADATA_FILE} and {PARAMS_DIR}/"
    if not os.path.exists(path):
        raise CheckpointError(f"no checkpoint at {path}: the directory does not exist ({expected})")
    if not os.path.isdir(path):
        raise CheckpointError(f"{path} is a file, not a checkpoint: {expected}")
    if not os.path.isfile(os.path.join(path, METADATA_FILE)):
        found = sorted(os.listdir(path))
        contents = f"it holds {short_list(found)}" if found else "it is empty"
        raise CheckpointError(f"{path} is not a checkpoint: {expected} "
                              f"(written by oneshui_jax.checkpoints), but {contents}")


def _json_type(value: Any) -> str:
    """``a list``, ``a string``, ... : what a JSON value is, for messages."""
    kinds = {list: "a list", str: "a string", bool: "a boolean", int: "a number",
             float: "a number", dict: "an object"}
    return kinds.get(type(value), type(value).__name__)


def read_metadata(run_dir: str) -> dict:
    """The run's ``metadata.json`` (no array is read), with ``run_dir`` set to where it was read.

    CheckpointError unless it is a JSON object with a known ``status`` whose ``_OBJECT_FIELDS``,
    where present, are objects (the readers rely on both).
    """
    _check_run_dir(run_dir)
    path = os.path.join(run_dir, METADATA_FILE)
    try:
        with open(path, encoding="utf-8-sig") as f:  # a byte-order mark of an editor is read
            metadata = json.load(f)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path} is not readable JSON: {e}") from e
    if not isinstance(metadata, dict) or metadata.get("status") not in STATUSES:
        raise CheckpointError(f"{path} is not checkpoint metadata: expected a JSON object with "
                              f"'status' one of {STATUSES}")
    wrong = [key for key in _OBJECT_FIELDS
             if metadata.get(key) is not None and not isinstance(metadata[key], dict)]
    if wrong:
        raise CheckpointError(f"{path} is not checkpoint metadata: expected {wrong[0]!r} to be a "
                              f"JSON object, got {_json_type(metadata[wrong[0]])}")
    metadata["run_dir"] = os.path.abspath(run_dir)
    return metadata


def check_metadata_hash(metadata: Mapping[str, Any]) -> bool:
    """Whether ``metadata`` (as ``read_metadata`` returns it) still has the content hash it was
    written with: True when it has; False when it records none (written before metadata hashes
    were recorded: not checkable); CheckpointError naming the file when it differs (edited after
    it was written)."""
    recorded = metadata.get(METADATA_HASH)
    if recorded is None:
        return False
    actual = metadata_hash(metadata)
    if actual != recorded:
        path = os.path.join(str(metadata.get("run_dir", "")), METADATA_FILE)
        raise CheckpointError(f"{path} is corrupt: its content hash {actual[:16]}... differs "
                              f"from the {METADATA_HASH} {str(recorded)[:16]}... it records, so "
                              "it was changed after it was written (edited by hand?); the run's "
                              "record (config, splits, hashes, metrics) cannot be trusted")
    return True


def _data_files(run_dir: str) -> dict[str, int]:
    """``{relative path: bytes}`` of every file in the run's orbax folders (``_ORBAX_FOLDERS``)."""
    found = {}
    for folder in _ORBAX_FOLDERS:
        top = os.path.join(run_dir, folder)
        for root, _, names in os.walk(top):
            for name in names:
                full = os.path.join(root, name)
                found[os.path.relpath(full, run_dir).replace(os.sep, "/")] = \
                    os.path.getsize(full)
    return dict(sorted(found.items()))


def _check_data_files(run_dir: str, metadata: Mapping[str, Any], folder: str) -> None:
    """CheckpointError naming the first file of ``run_dir/folder`` that ``metadata``'s
    ``data_files`` records and that is missing or has another size (orbax would only say that
    an array cannot be read). A folder holding none of the recorded files is left to orbax's
    own check (empty, or another checkpoint); runs written before ``data_files`` are not
    checked here."""
    recorded = {rel: size for rel, size in (metadata.get(DATA_FILES) or {}).items()
                if rel.startswith(folder + "/")}
    if not recorded:
        return
    where = os.path.join(os.path.abspath(run_dir), folder)
    present = {rel: os.path.join(os.path.abspath(run_dir), *rel.split("/")) for rel in recorded}
    if not any(os.path.isfile(full) for full in present.values()):
        return
    for rel, size in recorded.items():
        full = present[rel]
        if not os.path.isfile(full):
            raise CheckpointError(
                f"{where} is corrupt: its orbax data file {full} is missing ({METADATA_FILE} "
                f"records the {len(recorded)} files of {folder}/ as saved; deleted, or the run "
                "was copied incompletely)")
        actual = os.path.getsize(full)
        if actual != size:
            raise CheckpointError(
                f"{where} is corrupt: its orbax data file {full} has {actual} bytes but {size} "
                f"were saved (recorded in {METADATA_FILE}): truncated or replaced")


def is_finished(run_dir: str) -> bool:
    """True if ``run_dir`` holds a finished run (status "done" and a committed ``params/``)."""
    try:
        metadata = read_metadata(run_dir)
    except CheckpointError:
        return False
    return metadata["status"] == "done" and os.path.isdir(os.path.join(run_dir, PARAMS_DIR))


def _check_fields(metadata: Mapping[str, Any]) -> None:
    """CheckpointError unless ``metadata`` has a config naming the run and a splits dict."""
    config = metadata.get("config")
    if not isinstance(config, Mapping):
        raise CheckpointError("checkpoint metadata needs 'config' (a dict with "
                              f"{', '.join(_REQUIRED_CONFIG)})")
    missing = [k for k, v in run_identity(metadata).items() if v is None]
    if missing:
        raise CheckpointError(f"checkpoint metadata 'config' lacks {missing}; expected "
                              f"{_REQUIRED_CONFIG} (model as config['model']['name'])")
    if not isinstance(metadata.get("splits"), Mapping):
        raise CheckpointError("checkpoint metadata needs 'splits' (a dict of id lists)")


def write_metadata(run_dir: str, metadata: Mapping[str, Any], *, status: str = "training") -> dict:
    """Writes ``metadata.json`` atomically with ``status``, versions, creation time; returns it.

    ``metadata`` holds ``config`` (a dict or ``ConfigDict`` naming dataset, model.name,
    num_identities, seed), ``splits`` (dict of lists) and optionally ``metrics`` or anything else
    JSON-able (numpy values are converted).
    """
    if status not in STATUSES:
        raise ValueError(f"status must be one of {STATUSES}, not {status!r}")
    record = _as_json(dict(metadata), "checkpoint metadata")
    _check_fields(record)
    record.pop(METADATA_HASH, None)  # recomputed below, like the data files of a finished run
    record.pop(DATA_FILES, None)
    record.update(status=status, run_dir=os.path.abspath(run_dir),
                  splits_hash=splits_hash(record["splits"]), versions=library_versions(),
                  created=datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"))
    if status == "done":
        record[DATA_FILES] = _data_files(run_dir)
    record[METADATA_HASH] = metadata_hash(record)
    if sharding.is_primary():  # one writer on a multi-host run
        save_json(record, os.path.join(run_dir, METADATA_FILE))
    return record


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


def structure_differences(a: Mapping[str, tuple[int, ...]], b: Mapping[str, tuple[int, ...]],
                          name_a: str, name_b: str) -> list[str]:
    """How two trees given as ``{leaf name: shape}`` differ (empty list: same structure)."""
    only_a, only_b = sorted(set(a) - set(b)), sorted(set(b) - set(a))
    shapes = [f"{name} {tuple(a[name])} vs {tuple(b[name])}" for name in sorted(set(a) & set(b))
              if tuple(a[name]) != tuple(b[name])]
    parts = ((f"only in {name_a}", only_a), (f"only in {name_b}", only_b),
             ("shapes differ", shapes))
    return [f"{label}: {short_list(items)}" for label, items in parts if items]


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


# --------------------------------------------------------------------------------------------
# Compatibility of a checkpoint with a request
# --------------------------------------------------------------------------------------------


def run_identity(metadata: Mapping[str, Any]) -> dict[str, Any]:
    """``dataset``, ``model``, ``num_identities``, ``seed`` recorded in ``metadata['config']``."""
    config = metadata.get("config") or {}
    model = config.get("model")
    if isinstance(model, Mapping):
        model = model.get("name")
    return {"dataset": config.get("dataset"), "model": model,
            "num_identities": config.get("num_identities"), "seed": config.get("seed")}


def _split_difference(name: str, stored: Any, wanted: Any) -> str:
    """How one split list of the checkpoint differs from the requested one."""
    if stored is None:
        return f"{name}: not recorded in the checkpoint"
    if not isinstance(stored, list) or not isinstance(wanted, list):
        return f"{name}: {stored!r} vs {wanted!r}"
    only_stored = [x for x in stored if x not in set(wanted)]
    only_wanted = [x for x in wanted if x not in set(stored)]
    if not only_stored and not only_wanted:
        return f"{name}: the same {len(stored)} entries in another order"
    return (f"{name}: {len(stored)} vs {len(wanted)} entries, {len(only_stored)} only in the "
            f"checkpoint [{short_list(only_stored)}], {len(only_wanted)} only in the request "
            f"[{short_list(only_wanted)}]")


def model_config_differences(stored: Mapping[str, Any] | None,
                             wanted: Mapping[str, Any] | None) -> list[str]:
    """``"width: 64 -> 48"`` for every field in which a checkpoint's model config (its recorded
    ``model_config``, a ``ViTConfig`` as a dict) differs from the requested one, by field name;
    ``[]`` when they are the same. A field one of them lacks reads ``(absent)``."""
    stored, wanted = stored or {}, wanted or {}
    a, b = ({k: config.get(k, "(absent)") for k in set(stored) | set(wanted)}
            for config in (stored, wanted))
    return [f"{k}: {a[k]!r} -> {b[k]!r}" for k in sorted(a) if a[k] != b[k]]


def check_compatible(metadata: Mapping[str, Any], *, dataset: str, model: str,
                     splits: Mapping[str, Any] | None = None, num_identities: int | None = None,
                     seed: int | None = None) -> None:
    """CheckpointError listing every way the checkpoint differs from the request.

    ``splits``: the split lists named in it must equal the recorded ones, in order (compared by
    ``splits_hash``; the message says which lists differ and how).
    """
    recorded = run_identity(metadata)
    requested = {"dataset": dataset, "model": model, "num_identities": num_identities,
                 "seed": seed}
    problems = [f"{field} {recorded[field]!r} but the request is {wanted!r}"
                for field, wanted in requested.items()
                if wanted is not None and recorded[field] != wanted]
    if splits is not None:
        stored = metadata.get("splits") or {}
        wanted = _as_json(dict(splits), "the requested splits")
        stored_part = {name: stored.get(name) for name in wanted}
        if splits_hash(stored_part) != splits_hash(wanted):
            differences = [_split_difference(name, stored_part[name], wanted[name])
                           for name in sorted(wanted) if stored_part[name] != wanted[name]]
            problems.append(f"splits differ ({'; '.join(differences)})")
    if problems:
        where = metadata.get("run_dir", "(unknown path)")
        raise CheckpointError(f"checkpoint {where} was trained on " + "; ".join(problems))


# --------------------------------------------------------------------------------------------
# Resumable training state
# --------------------------------------------------------------------------------------------


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
