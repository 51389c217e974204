"""A run's ``metadata.json``: its record of what was trained and how (SPEC.md 4.4, the ``args``
and ``splits`` of the reference's checkpoints).

Reading and writing it (atomically, one writer on a multi-host run), its content hash
(``metadata_hash``, sha256 of its own content, so that a hand edit is found), the fields every
run records (config naming the run, splits and their hash, library versions), the sizes of a
finished run's orbax files (``data_files``, checked before orbax reads a folder) and whether a
run is finished. No array is read here.
"""

from __future__ import annotations

import datetime
import hashlib
import importlib.metadata
import json
import os
import platform
from collections.abc import Mapping
from typing import Any

from oneshui_jax import sharding
from oneshui_jax.checkpoints.layout import (
    ARTIFACTS_DIR,
    METADATA_FILE,
    PARAMS_DIR,
    short_list,
)
from oneshui_jax.errors import CheckpointError
from oneshui_jax.files import save_json, to_json

STATUSES = ("training", "done")
_VERSIONED = ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "numpy")
_REQUIRED_CONFIG = ("dataset", "model", "num_identities", "seed")
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



def run_identity(metadata: Mapping[str, Any]) -> dict[str, Any]:
    """``dataset``, ``model``, ``num_identities``, ``seed`` recorded in ``metadata['config']``."""
    config = metadata.get("config") or {}
    model = config.get("model")
    if isinstance(model, Mapping):
        model = model.get("name")
    return {"dataset": config.get("dataset"), "model": model,
            "num_identities": config.get("num_identities"), "seed": config.get("seed")}
