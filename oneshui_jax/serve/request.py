"""What a deletion request brings in and takes away: portraits, labels, the output and receipt.

The person's side of serving (paper section 3: a person hands in portraits of themselves, the
1-SHUI support images): :func:`read_portrait` reads any image PIL reads, as it is shown
(``data/images.py``: EXIF orientation, 16-bit and float greyscale, palettes, alpha over white;
regular files only, with byte and pixel caps), and hashes the file, :func:`parse_labels` reads
``--labels``. On the way out, :func:`check_output` refuses an output directory that would
overwrite something it must not, and :func:`write_output` writes the unlearned model as a run
directory (``params/``, ``metadata.json``) and then :class:`Receipt` as ``receipt.json``,
atomically and last, removing the directory again if anything fails. Nothing here knows which
method unlearned.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from oneshui_jax import checkpoints, files
from oneshui_jax.data import images
from oneshui_jax.errors import CheckpointError, ConfigError

RECEIPT_FILE = "receipt.json"
# 2: any servable method (access, method_config, artifacts_*); 3: params_digest_before/after
# and the h2d_s / digest_s timings
RECEIPT_VERSION = 3
REQUEST_STAGE = "request"  # the ``stage`` of a request's output run directory


# --------------------------------------------------------------------------------------------
# Coming in


def read_portrait(path: str, *, max_bytes: int = images.DEFAULT_MAX_BYTES,
                  max_pixels: int = images.DEFAULT_MAX_PIXELS) -> tuple[np.ndarray, str]:
    """``(uint8 RGB HxWx3 array, sha256 of the file)``: the image as it is shown
    (``images.decode``: EXIF orientation applied, alpha over white, 16-bit scaled to 8).

    Any format PIL reads, from a regular file of at most ``max_bytes`` bytes and ``max_pixels``
    pixels; anything else (missing, a pipe or device, corrupt, too large, pixel values out of
    range) raises one DataError ``cannot read portrait <path>: ...``.
    """
    image, data = images.read(path, name=f"portrait {path}", max_bytes=max_bytes,
                              max_pixels=max_pixels)
    return image, hashlib.sha256(data).hexdigest()


def parse_labels(specs: Sequence[str], task: str, num_classes: int) -> list[Any]:
    """``--labels`` values: ``0,1,0,...`` (multi-hot, multi-label) or a class index.

    Only the syntax is checked here; values and counts are checked against the model by
    ``Engine.prepare``.
    """
    out = []
    for spec in specs:
        try:
            values = [int(v) for v in spec.split(",")]
        except ValueError:
            raise ConfigError(f"--labels {spec!r} is not a comma-separated list of integers"
                              ) from None
        if task == "classification" and len(values) != 1:
            raise ConfigError(f"--labels {spec!r}: give one class index in [0, {num_classes})")
        out.append(values[0] if task == "classification" else values)
    return out


def json_labels(labels: np.ndarray) -> list[Any]:
    """Labels as JSON: a class index or a list of 0/1 per portrait."""
    return [int(x) if np.ndim(x) == 0 else [int(v) for v in x] for x in labels]


# --------------------------------------------------------------------------------------------
# Going out


@dataclasses.dataclass(frozen=True)
class Receipt:
    """What was done for one request, written as ``receipt.json`` next to the new model.

    No names or pixels: portraits are recorded by ``sha256``, ``width`` and ``height``.
    ``method_config`` is the Config the method run recorded (``api.config_record``);
    ``hyperparameters`` is what the request-time step used: that record plus what the method's
    ``unlearn`` reported (e.g. support_ascent's ``alpha``, meta_unlearn's ``steps``).
    ``artifacts_run_dir`` / ``artifacts_hash`` name the method run whose prepared artifacts were
    used; ``base_params_hash`` is the pretrained model the chain of requests started from.
    ``params_hash_*`` are sha256 of the parameters on the host (the chain is checked with
    them); ``params_digest_*`` are ``digest.params_digest``, a 128-bit checksum computed on
    the device (not cryptographic; equal for equal parameters wherever they live, so a
    request's ``params_digest_after`` is the next one's ``params_digest_before``).
    ``seeds``: the study's, the method run's and the one the request's rng key was made from.
    ``timings`` in seconds: ``load_s`` (checkpoints, portraits, preprocessing), ``predict_s``
    (label prediction), ``compile_s`` (first call of this request size, prediction included),
    ``h2d_s`` (the portraits' copy to the device, in ``load_s``), ``compute_s`` (the unlearning,
    to completion), ``digest_s`` (``params_digest_after``), ``save_s``, ``total_s``.
    """

    request_id: str
    created: str  # UTC, ISO 8601
    method: str
    access: str
    portraits: list[dict[str, Any]]
    identities: list[int | None]
    labels: list[Any]
    labels_predicted: bool
    params_hash_before: str
    params_hash_after: str
    params_digest_before: str
    params_digest_after: str
    source_checkpoint: str
    artifacts_run_dir: str
    artifacts_hash: str | None
    base_params_hash: str
    output: str
    method_config: dict[str, Any]
    hyperparameters: dict[str, Any]
    seeds: dict[str, Any]
    versions: dict[str, str]
    device: str
    timings: dict[str, float]
    receipt_version: int = RECEIPT_VERSION

    def to_json(self) -> dict[str, Any]:
        """The receipt as plain JSON values (``receipt_version`` first)."""
        record = files.to_json(self)
        return {"receipt_version": record.pop("receipt_version"), **record}


def check_receipt(run_dir: str, metadata: Mapping[str, Any]) -> dict[str, Any]:
    """The receipt of the request output ``run_dir`` (``metadata``: its ``metadata.json``), as
    a request chained on it checks it: a JSON object of a known ``receipt_version`` whose
    ``request_id`` is the output's and whose ``params_hash_after`` is the ``params_hash`` of
    its parameters (which ``load_params`` checks against the parameters themselves). Anything
    else is one CheckpointError naming the receipt: the parameters cannot be traced to the
    request that made them."""
    path = os.path.join(run_dir, RECEIPT_FILE)
    if not os.path.isfile(path):
        raise CheckpointError(f"{path} is missing: {run_dir} is a request's output, and its "
                              "receipt says which request made its parameters; chain requests "
                              "from a complete output")
    try:
        with open(path, encoding="utf-8-sig") as f:
            receipt = json.load(f)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path} is not readable JSON ({e}); chain requests from a "
                              "complete output") from None
    version = receipt.get("receipt_version") if isinstance(receipt, dict) else None
    if type(version) is not int or not 1 <= version <= RECEIPT_VERSION:
        raise CheckpointError(f"{path} has receipt_version {version!r}; this version reads "
                              f"receipts 1..{RECEIPT_VERSION} (written by a newer oneshui_jax, "
                              "or not a receipt)")
    after, recorded = receipt.get("params_hash_after"), metadata.get("params_hash")
    if after != recorded:
        raise CheckpointError(f"{path} records params_hash_after {str(after)[:16]}... but the "
                              f"parameters of {run_dir} have sha256 {str(recorded)[:16]}... "
                              f"({checkpoints.METADATA_FILE}): the receipt is not the one of "
                              "these parameters")
    if receipt.get("request_id") != metadata.get("request_id"):
        raise CheckpointError(f"{path} is the receipt of request {receipt.get('request_id')!r}, "
                              f"but {run_dir} is the output of request "
                              f"{metadata.get('request_id')!r}")
    return receipt


def check_output(out: str, overwrite: bool, sources: Sequence[str]) -> None:
    """ConfigError if writing ``out`` would overwrite something it must not, or cannot work.

    ``out`` may not be one of ``sources`` (the model, the method run, the checkpoint given); an
    existing ``out`` is replaced only with ``overwrite`` and only if it is empty or holds an
    earlier request's output (a ``receipt.json``).
    """
    real = os.path.realpath(out)
    if any(real == os.path.realpath(s) for s in sources):
        raise ConfigError(f"--out {out} is the model or the method run being used; choose a new "
                          "directory")
    if not os.path.lexists(out):
        problem = files.cannot_create(out)
        if problem:
            raise ConfigError(f"--out {out} cannot be created: {problem}; expected a new "
                              "directory in a writable folder")
        return
    if not overwrite:
        raise ConfigError(f"--out {out} already exists; choose a new directory or pass "
                          "--overwrite")
    if not os.path.isdir(out) or (os.listdir(out)
                                  and not os.path.isfile(os.path.join(out, RECEIPT_FILE))):
        raise ConfigError(f"--out {out} exists and is not the output of an earlier request (no "
                          f"{RECEIPT_FILE}); refusing to replace it even with --overwrite")


def write_output(out: str, params: Any, metadata: Mapping[str, Any],
                 make_receipt: Any, *, overwrite: bool = True) -> Receipt:
    """Writes ``out`` (``params/``, ``metadata.json``, then the receipt) as a whole.

    ``make_receipt(params_hash_after)`` builds the :class:`Receipt` once the parameters are
    saved. Everything is written into a temporary sibling that is renamed to ``out`` at the end;
    an earlier output being replaced (``--overwrite``, after :func:`check_output`) is removed only
    then, so a failed request leaves it as it was and leaves nothing of its own. Without
    ``overwrite``, an ``out`` that appeared meanwhile (another writer not holding the lock of
    ``locks.hold``) is never replaced: ConfigError, and nothing of this request is kept.
    """
    out = out.rstrip(os.sep)
    tmp = f"{out}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        os.makedirs(tmp)
        receipt = make_receipt(checkpoints.save_params(tmp, params, metadata))
        stored = checkpoints.read_metadata(tmp)  # records where it lives: out, not tmp
        stored["run_dir"] = os.path.abspath(out)
        files.save_json(stored, os.path.join(tmp, checkpoints.METADATA_FILE))
        files.save_json(receipt.to_json(), os.path.join(tmp, RECEIPT_FILE), indent=2)
        old = None
        if os.path.lexists(out) and not overwrite:
            raise ConfigError(f"--out {out} was created by another process meanwhile; choose a "
                              "new directory or pass --overwrite")
        if os.path.lexists(out):
            old = f"{out}.old-{os.getpid()}"
            os.rename(out, old)
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return receipt
