"""Serving a real deletion request with MetaUnlearn: portraits in, unlearned model and receipt out.

This is the test-time half of MetaUnlearn (SPEC.md 6.5, the reference's
``MetaUnlearn.unlearn_model``) turned into a service: a person hands in one or more portraits
(the 1-SHUI support images, paper section 3) and the model takes ``forget_epochs`` plain gradient
steps ``θ ← θ − η ∇_θ mean ℓ_φ(portraits)`` on the trained meta-loss (dropout off), then one step
on the retain meta-loss if the meta-loss was trained with ``use_retain``. Nothing else is read:
the training data is gone.

Where the model and the meta-loss come from (:func:`resolve_sources`), given ``--checkpoint PATH``:

* PATH is a ``meta_unlearn`` run directory (it holds ``meta_loss/``): the meta-loss is PATH's
  (unless ``--meta_loss`` names another) and the model is the one it was meta-trained on, PATH's
  ``base_run_dir`` (the pretrained model), not the model PATH unlearned for the study's request;
* PATH is any other run directory (a pretrained model, or the output of an earlier request, so
  deletions chain): the model is PATH's parameters and the meta-loss is ``--meta_loss RUN_DIR``
  or, failing that, the ``meta_loss_run_dir`` recorded in PATH's metadata (request outputs record
  it, so a chained request needs no flag).

The model must have the meta-loss's architecture (``model_config``), training identities
(``splits["train"]``: the embedding row of an identity is its position there) and lineage: the
pretrained model the meta-loss was trained on (``base_params_hash``) is the model itself or the
start of its chain of requests.

Deviation (named): when the meta-loss reads the support image's targets (``use_targets``) and no
labels are given, the model's own predictions on the portraits are used (sigmoid > 0.5 for
multi-label tasks, argmax for classification). The reference feeds the dataset's annotations; a
person deleting themselves does not hand in attribute annotations. The receipt says which labels
were used and whether they were predicted.

:class:`Unlearner` holds one model and meta-loss in memory and compiles the unlearning step once
per number of portraits (ahead of time, so compile and compute are timed apart); later requests
of that size reuse it. :func:`serve_request` is the command line's work: read and hash the
portraits, unlearn, write the output run directory (``params/``, ``metadata.json``) and
``receipt.json``. Errors a user can cause raise one :class:`DataError` / :class:`ConfigError` /
:class:`CheckpointError` naming the file or setting, before anything is written.

The output directory is a run directory like the study's (``checkpoints.save_params``): the
source's ``config``, ``splits`` and ``model_config``, ``stage: "request"``, ``request_id``,
``requests`` (the ids of every request in the chain), ``source_checkpoint``,
``source_params_hash``, ``meta_loss_run_dir``, ``meta_loss_hashes``, and ``base_run_dir`` /
``base_params_hash`` of the pretrained model at the start of the chain. ``receipt.json``
(written last, atomically) holds ``receipt_version``, ``request_id``, ``created`` (UTC),
``method``, ``portraits`` (``sha256``, ``width``, ``height`` per file; no names or pixels),
``identities`` (one per portrait), ``labels`` and ``labels_predicted``, ``params_hash_before`` /
``params_hash_after``, ``source_checkpoint``, ``meta_loss_run_dir``, ``meta_loss_hashes``,
``base_params_hash``, ``output``, ``hyperparameters`` (``meta_lr``, ``forget_epochs``,
``use_retain``, ``meta_loss`` and ``meta_unlearn`` configs), ``seeds`` (the study's and the
meta-loss's; the request itself draws no random numbers), ``versions``, ``device`` and
``timings`` in seconds: ``load_s`` (checkpoints, portraits, preprocessing), ``predict_s`` (label
prediction), ``compile_s``, ``compute_s`` (the unlearning steps, to completion), ``save_s``,
``total_s``.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import hashlib
import io
import logging
import os
import shutil
import sys
import time
import uuid
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from oneshui_jax import checkpoints, files
from oneshui_jax.data import transforms
from oneshui_jax.errors import CheckpointError, ConfigError, DataError
from oneshui_jax.models import meta_loss, vit
from oneshui_jax.unlearn import meta_unlearn as mu

Params = Any
METHODS = ("meta_unlearn",)
META_LOSS_DIR = "meta_loss"
META_LOSS_RETAIN_DIR = "meta_loss_retain"
RECEIPT_FILE = "receipt.json"
RECEIPT_VERSION = 1
REQUEST_STAGE = "request"
TRAIN_HINT = ("train one with the study: python -m oneshui_jax.main --config=configs/<dataset>.py "
              "--config.stages='(\"pretrain\", \"meta_unlearn\")' (its run directory "
              "<checkpoint_dir>/<dataset>/<model>/meta_unlearn_<N>_<seed>/ holds meta_loss/)")


# --------------------------------------------------------------------------------------------
# Where the model and the meta-loss come from


def _has_meta_loss(run_dir: str) -> bool:
    return os.path.isdir(os.path.join(run_dir, META_LOSS_DIR))


def resolve_sources(checkpoint: str, meta_loss_dir: str | None = None) -> tuple[str, str]:
    """``(model run dir, meta-loss run dir)`` of a request on ``checkpoint`` (module docstring)."""
    metadata = checkpoints.read_metadata(checkpoint)
    own = _has_meta_loss(checkpoint)
    model_dir = checkpoint
    if own:
        model_dir = metadata.get("base_run_dir")
        if not model_dir:
            raise CheckpointError(f"{checkpoint} holds a meta-loss but its metadata records no "
                                  "base_run_dir (the model it was meta-trained on); pass that "
                                  f"model as --checkpoint and --meta_loss {checkpoint}")
        if not os.path.isdir(model_dir):
            raise CheckpointError(
                f"the meta-loss at {checkpoint} was trained on {model_dir}, which does not exist "
                f"(moved?); pass the pretrained run as --checkpoint and --meta_loss {checkpoint}")
    if meta_loss_dir is None:
        meta_loss_dir = checkpoint if own else metadata.get("meta_loss_run_dir")
    if meta_loss_dir is None:
        raise CheckpointError(
            f"{checkpoint} has no trained meta-loss: it is a {metadata.get('stage', 'training')!r}"
            " run without meta_loss/ and its metadata records no meta_loss_run_dir. Pass "
            f"--meta_loss RUN_DIR (a meta_unlearn run directory), or {TRAIN_HINT}")
    if not _has_meta_loss(meta_loss_dir):
        raise CheckpointError(f"{meta_loss_dir} holds no trained meta-loss (no {META_LOSS_DIR}/); "
                              f"expected a meta_unlearn run directory: {TRAIN_HINT}")
    return os.path.abspath(model_dir), os.path.abspath(meta_loss_dir)


def _lineage_hash(metadata: Mapping[str, Any]) -> str | None:
    """The pretrained model a run descends from: itself, or the start of its request chain."""
    if metadata.get("stage") == REQUEST_STAGE:
        return metadata.get("base_params_hash")
    return metadata.get("params_hash")


def _check_pair(model_meta: Mapping[str, Any], ml_meta: Mapping[str, Any]) -> None:
    """CheckpointError unless the model is one the meta-loss was trained for."""
    model_dir, ml_dir = model_meta["run_dir"], ml_meta["run_dir"]
    ours, theirs = model_meta.get("model_config"), ml_meta["model_config"]
    if ours != theirs:
        differ = sorted(k for k in set(ours or {}) | set(theirs)
                        if (ours or {}).get(k) != theirs.get(k))
        raise CheckpointError(
            f"the model at {model_dir} does not match the meta-loss at {ml_dir}: model_config "
            f"differs in {differ} ({ {k: (ours or {}).get(k) for k in differ} } vs "
            f"{ {k: theirs.get(k) for k in differ} })")
    if (model_meta.get("splits") or {}).get("train") != ml_meta["splits"]["train"]:
        raise CheckpointError(f"the model at {model_dir} was trained on other identities than "
                              f"the meta-loss at {ml_dir} (splits['train'] differ)")
    lineage = _lineage_hash(model_meta)
    if lineage != ml_meta["base_params_hash"]:
        raise CheckpointError(
            f"the meta-loss at {ml_dir} was meta-trained on the model {ml_meta.get('base_run_dir')}"
            f" (params sha256 {str(ml_meta['base_params_hash'])[:16]}...), but {model_dir} "
            f"descends from sha256 {str(lineage)[:16]}...: use a meta-loss trained on this model")


def _configs(ml_meta: Mapping[str, Any]) -> tuple[vit.ViTConfig, mu.MetaUnlearnConfig,
                                                   meta_loss.MetaLossConfig]:
    """The model, MetaUnlearn and meta-loss configs recorded by the ``meta_unlearn`` stage."""
    try:
        return (vit.ViTConfig(**ml_meta["model_config"]),
                mu.MetaUnlearnConfig(**ml_meta["meta_unlearn"]),
                meta_loss.MetaLossConfig(**ml_meta["meta_loss"]))
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{ml_meta['run_dir']}/{checkpoints.METADATA_FILE} records configs "
                              f"this version cannot use: {e}") from e


# --------------------------------------------------------------------------------------------
# The unlearner


@dataclasses.dataclass(frozen=True)
class Request:
    """One prepared deletion request: the support batch and what went into it."""

    support: dict[str, jax.Array]  # image [n,S,S,3] f32, label, row int32 [n], mask bool [n]
    identities: list[int | None]
    labels: np.ndarray  # uint8 multi-hot [n, C] or int32 class [n]
    labels_predicted: bool
    timings: dict[str, float]  # prepare_s (preprocessing), predict_s and compile_s (labels)


class Unlearner:
    """A model and its trained meta-loss, ready to serve deletion requests (SPEC.md 6.5).

    ``forget`` is pure: it starts from ``params`` (default: the loaded model) and returns new
    parameters, leaving the unlearner unchanged. Compiled steps are kept per number of portraits.
    """

    def __init__(self, model_cfg: vit.ViTConfig, params: Params, cfg: mu.MetaUnlearnConfig,
                 ml_cfg: meta_loss.MetaLossConfig, phi: Params, phi_retain: Params | None,
                 train_ids: Sequence[int], *, model_metadata: Mapping[str, Any] | None = None,
                 meta_loss_metadata: Mapping[str, Any] | None = None) -> None:
        self.model_cfg, self.params, self.cfg, self.ml_cfg = model_cfg, params, cfg, ml_cfg
        self.phi, self.phi_retain = phi, phi_retain
        self.rows = mu.identity_rows([int(i) for i in train_ids])
        self.model_metadata = dict(model_metadata or {})
        self.meta_loss_metadata = dict(meta_loss_metadata or {})
        self._step = mu.make_unlearn_step(model_cfg, ml_cfg, cfg.meta_lr)
        self._predict = jax.jit(lambda p, x: vit.apply(model_cfg, p, x)[0])
        self._compiled: dict[tuple, Any] = {}

    @classmethod
    def from_checkpoint(cls, path: str, meta_loss_dir: str | None = None) -> Unlearner:
        """Loads the model and meta-loss of a request on ``path`` (see :func:`resolve_sources`)."""
        model_dir, ml_dir = resolve_sources(path, meta_loss_dir)
        model_meta = checkpoints.read_metadata(model_dir)
        ml_meta = checkpoints.read_metadata(ml_dir)
        missing = [k for k in ("model_config", "meta_unlearn", "meta_loss", "meta_loss_hashes",
                               "base_params_hash") if not ml_meta.get(k)]
        if missing or not (ml_meta.get("splits") or {}).get("train"):
            raise CheckpointError(f"{ml_dir}/{checkpoints.METADATA_FILE} lacks "
                                  f"{missing or ['splits.train']}: not a finished meta_unlearn run")
        _check_pair(model_meta, ml_meta)
        model_cfg, cfg, ml_cfg = _configs(ml_meta)
        params = checkpoints.load_params(model_dir)
        template = jax.eval_shape(lambda: meta_loss.init_params(ml_cfg, jax.random.key(0)))
        hashes = ml_meta["meta_loss_hashes"]
        phi = checkpoints.load_tree(ml_dir, META_LOSS_DIR, template, hashes.get(META_LOSS_DIR))
        phi_retain = None
        if cfg.use_retain:
            phi_retain = checkpoints.load_tree(ml_dir, META_LOSS_RETAIN_DIR, template,
                                               hashes.get(META_LOSS_RETAIN_DIR))
        return cls(model_cfg, params, cfg, ml_cfg, phi, phi_retain, ml_meta["splits"]["train"],
                   model_metadata=model_meta, meta_loss_metadata=ml_meta)

    @property
    def cache_size(self) -> int:
        """How many executables are compiled (unlearning steps and label predictions)."""
        return len(self._compiled)

    def _compile(self, name: str, fn: Any, *args: Any) -> tuple[Any, float]:
        """``fn`` compiled for these argument shapes (cached) and the seconds it took now."""
        key = (name, *((x.shape, x.dtype) for x in jax.tree.leaves(args[-1])))
        if key in self._compiled:
            return self._compiled[key], 0.0
        start = time.perf_counter()
        self._compiled[key] = fn.lower(*args).compile()
        return self._compiled[key], time.perf_counter() - start

    def _identity_rows(self, identities: int | Sequence[int] | None, n: int
                       ) -> tuple[list[int | None], np.ndarray]:
        if identities is None:
            if self.ml_cfg.use_ids:
                raise ConfigError("the meta-loss uses identity embeddings (use_ids): give the "
                                  "person's training identity id (--identity ID)")
            return [None] * n, np.zeros(n, np.int32)
        ids = [identities] if isinstance(identities, int | np.integer) else list(identities)
        if len(ids) == 1:
            ids = ids * n
        if len(ids) != n:
            raise ConfigError(f"give one identity for all {n} portraits or one per portrait, "
                              f"got {len(ids)}")
        unknown = sorted({int(i) for i in ids} - set(self.rows))
        if unknown:
            raise ConfigError(f"identities {unknown} are not training identities of this model "
                              f"({len(self.rows)} known); the meta-loss can only forget people "
                              "it was trained on")
        return [int(i) for i in ids], np.asarray([self.rows[int(i)] for i in ids], np.int32)

    def _check_labels(self, labels: Sequence[Any], n: int) -> np.ndarray:
        """Given labels as the support batch holds them; ConfigError naming what is wrong."""
        c = self.model_cfg.num_classes
        if len(labels) != n:
            raise ConfigError(f"give labels for each of the {n} portraits, got {len(labels)}")
        classification = self.ml_cfg.task == "classification"
        for k, item in enumerate(labels):
            values = np.asarray(item)
            ok = (values.shape == () and 0 <= values < c) if classification else (
                values.shape == (c,) and bool(np.isin(values, (0, 1)).all()))
            if not ok or not np.issubdtype(values.dtype, np.integer):
                expected = (f"a class index in [0, {c})" if classification
                            else f"{c} values 0/1 (multi-hot)")
                raise ConfigError(f"labels of portrait {k} must be {expected}, got {item!r}")
        return np.asarray(labels, np.int32 if classification else np.uint8)

    def prepare(self, portraits: Sequence[np.ndarray], identities: int | Sequence[int] | None,
                labels: Sequence[Any] | None = None, params: Params = None) -> Request:
        """Eval-transforms the portraits (uint8 HxWx3, any size) into the support batch.

        Labels default to the predictions of ``params`` (the model to unlearn) when the
        meta-loss uses targets (module docstring: a named deviation).
        """
        start = time.perf_counter()
        n = len(portraits)
        if n == 0:
            raise DataError("an empty request: give at least one portrait")
        for k, image in enumerate(portraits):
            if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3 or not all(
                    image.shape):
                raise DataError(f"portrait {k} must be a non-empty uint8 HxWx3 RGB array, got "
                                f"{image.dtype} {image.shape}")
        ids, rows = self._identity_rows(identities, n)
        images = jnp.asarray(transforms.preprocess_eval(portraits, self.model_cfg.image_size))
        timings = {"prepare_s": time.perf_counter() - start, "predict_s": 0.0, "compile_s": 0.0}
        predicted = labels is None
        if labels is not None:
            labels = self._check_labels(labels, n)
        else:
            theta = self.params if params is None else params
            predict, timings["compile_s"] = self._compile("predict", self._predict, theta,
                                                          images)
            start = time.perf_counter()
            logits = np.asarray(predict(theta, images))
            labels = (logits.argmax(-1).astype(np.int32) if self.ml_cfg.task == "classification"
                      else (logits > 0).astype(np.uint8))
            timings["predict_s"] = time.perf_counter() - start
        support = {"image": images, "label": jnp.asarray(labels),
                   "row": jnp.asarray(rows), "mask": jnp.ones(n, bool)}
        return Request(support, ids, labels, predicted, timings)

    def unlearn(self, request: Request, params: Params = None) -> tuple[Params, dict[str, float]]:
        """``forget_epochs`` meta-loss steps on the request's support (+ the retain one).

        Returns the new parameters and ``{"compile_s", "compute_s"}`` (0 compile when cached;
        compute timed to completion with ``jax.block_until_ready``).
        """
        theta = self.params if params is None else params
        step, compile_s = self._compile("unlearn", self._step, theta, self.phi, request.support)
        start = time.perf_counter()
        new = jax.block_until_ready(mu.unlearn(step, theta, self.phi, request.support,
                                               self.cfg.forget_epochs, self.phi_retain))
        return new, {"compile_s": compile_s, "compute_s": time.perf_counter() - start}

    def forget(self, portraits: Sequence[np.ndarray], identities: int | Sequence[int] | None,
               labels: Sequence[Any] | None = None, params: Params = None
               ) -> tuple[Params, dict[str, float]]:
        """:meth:`prepare` then :meth:`unlearn`: ``(new params, {prepare_s, predict_s,
        compile_s, compute_s})`` (compile_s covers the label prediction too)."""
        request = self.prepare(portraits, identities, labels, params)
        new, timings = self.unlearn(request, params)
        return new, {**request.timings, "compute_s": timings["compute_s"],
                     "compile_s": request.timings["compile_s"] + timings["compile_s"]}


# --------------------------------------------------------------------------------------------
# Portraits, output directory, receipt


def read_portrait(path: str) -> tuple[np.ndarray, str]:
    """``(uint8 RGB HxWx3 array, sha256 of the file)``; EXIF orientation applied.

    Any format PIL reads; a missing, unreadable or corrupt file raises one DataError naming it.
    """
    try:
        with open(path, "rb") as f:
            data = f.read()
        with Image.open(io.BytesIO(data)) as image:
            rgb = ImageOps.exif_transpose(image).convert("RGB")
    except UnidentifiedImageError:
        raise DataError(f"cannot read portrait {path}: not an image in a format PIL reads "
                        "(jpg, png, webp, ...)") from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise DataError(f"cannot read portrait {path}: {e}") from None
    array = np.asarray(rgb, dtype=np.uint8)
    if not all(array.shape):
        raise DataError(f"portrait {path} is empty ({array.shape[1]}x{array.shape[0]} pixels)")
    return array, hashlib.sha256(data).hexdigest()


def parse_labels(specs: Sequence[str], task: str, num_classes: int) -> list[Any]:
    """``--labels`` values: ``0,1,0,...`` (multi-hot, multi-label) or a class index."""
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


def _check_output(out: str, overwrite: bool, sources: Sequence[str]) -> None:
    """ConfigError if writing ``out`` would overwrite something it must not."""
    real = os.path.realpath(out)
    if any(real == os.path.realpath(s) for s in sources):
        raise ConfigError(f"--out {out} is the model or the meta-loss being used; choose a new "
                          "directory")
    if not os.path.lexists(out):
        return
    if not overwrite:
        raise ConfigError(f"--out {out} already exists; choose a new directory or pass "
                          "--overwrite")
    if not os.path.isdir(out) or (os.listdir(out)
                                  and not os.path.isfile(os.path.join(out, RECEIPT_FILE))):
        raise ConfigError(f"--out {out} exists and is not the output of an earlier request (no "
                          f"{RECEIPT_FILE}); refusing to replace it even with --overwrite")


def _json_labels(labels: np.ndarray) -> list[Any]:
    return [int(x) if np.ndim(x) == 0 else [int(v) for v in x] for x in labels]


def serve_request(checkpoint: str, portraits: Sequence[str], out: str, *,
                  meta_loss_dir: str | None = None, identities: Sequence[int] | None = None,
                  labels: Sequence[str] | None = None, request_id: str | None = None,
                  method: str = "meta_unlearn", overwrite: bool = False) -> dict[str, Any]:
    """Serves one request end to end and returns its receipt (also written to ``out``)."""
    start = time.perf_counter()
    if method not in METHODS:
        raise ConfigError(f"--method {method!r} is not served; available: {METHODS}")
    if not portraits:
        raise DataError("an empty request: give at least one --portrait")
    _check_output(out, overwrite, ())
    read = [read_portrait(path) for path in portraits]
    unlearner = Unlearner.from_checkpoint(checkpoint, meta_loss_dir)
    model_meta, ml_meta = unlearner.model_metadata, unlearner.meta_loss_metadata
    _check_output(out, overwrite, (model_meta["run_dir"], ml_meta["run_dir"], checkpoint))
    given = None if labels is None else parse_labels(labels, unlearner.ml_cfg.task,
                                                     unlearner.model_cfg.num_classes)
    load_s = time.perf_counter() - start
    request = unlearner.prepare([image for image, _ in read],
                                None if not identities else identities, given)
    params, timings = unlearner.unlearn(request)
    request_id = request_id or str(uuid.uuid4())
    created = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
    hash_before = model_meta["params_hash"]
    metadata = {
        "config": model_meta["config"], "splits": model_meta["splits"],
        "model_config": model_meta["model_config"], "stage": REQUEST_STAGE, "method": method,
        "request_id": request_id, "requests": [*model_meta.get("requests", []), request_id],
        "source_checkpoint": model_meta["run_dir"], "source_params_hash": hash_before,
        "meta_loss_run_dir": ml_meta["run_dir"], "meta_loss_hashes": ml_meta["meta_loss_hashes"],
        "base_run_dir": ml_meta.get("base_run_dir"),
        "base_params_hash": ml_meta["base_params_hash"],
    }
    save_start = time.perf_counter()
    if os.path.lexists(out):
        shutil.rmtree(out)
    try:
        os.makedirs(out)
        hash_after = checkpoints.save_params(out, params, metadata)
        receipt = {
            "receipt_version": RECEIPT_VERSION, "request_id": request_id, "created": created,
            "method": method,
            "portraits": [{"sha256": digest, "width": int(image.shape[1]),
                           "height": int(image.shape[0])} for image, digest in read],
            "identities": request.identities,
            "labels": _json_labels(request.labels), "labels_predicted": request.labels_predicted,
            "params_hash_before": hash_before, "params_hash_after": hash_after,
            "source_checkpoint": model_meta["run_dir"], "meta_loss_run_dir": ml_meta["run_dir"],
            "meta_loss_hashes": ml_meta["meta_loss_hashes"],
            "base_params_hash": ml_meta["base_params_hash"], "output": os.path.abspath(out),
            "hyperparameters": {
                "meta_lr": unlearner.cfg.meta_lr, "forget_epochs": unlearner.cfg.forget_epochs,
                "use_retain": unlearner.cfg.use_retain,
                "meta_loss": dataclasses.asdict(unlearner.ml_cfg),
                "meta_unlearn": dataclasses.asdict(unlearner.cfg)},
            "seeds": {"study": model_meta["config"].get("seed"),
                      "meta_loss": ml_meta["config"].get("seed"),
                      "request": None},  # request-time unlearning draws no random numbers
            "versions": checkpoints.library_versions(),
            "device": str(jax.devices()[0].platform),
            "timings": {"load_s": load_s + request.timings["prepare_s"],
                        "predict_s": request.timings["predict_s"],
                        "compile_s": request.timings["compile_s"] + timings["compile_s"],
                        "compute_s": timings["compute_s"],
                        "save_s": time.perf_counter() - save_start},
        }
        receipt["timings"]["total_s"] = time.perf_counter() - start
        files.save_json(receipt, os.path.join(out, RECEIPT_FILE), indent=2)
    except BaseException:
        shutil.rmtree(out, ignore_errors=True)
        raise
    return receipt


# --------------------------------------------------------------------------------------------
# Command line


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m oneshui_jax.unlearn",
        description="Serve a deletion request: unlearn a person from a model given their "
                    "portraits, write the new model and a receipt.")
    parser.add_argument("--checkpoint", required=True, metavar="PATH",
                        help="run directory of the model (pretrained, a meta_unlearn run, or "
                             "an earlier request's output)")
    parser.add_argument("--method", default="meta_unlearn", choices=METHODS)
    parser.add_argument("--portrait", action="append", required=True, metavar="FILE",
                        help="an image of the person (any format PIL reads); repeat for more")
    parser.add_argument("--out", required=True, metavar="DIR", help="new run directory")
    parser.add_argument("--meta_loss", metavar="RUN_DIR",
                        help="meta_unlearn run directory holding the trained meta-loss")
    parser.add_argument("--identity", type=int, action="append", metavar="ID",
                        help="training identity id: once for all portraits or once per portrait")
    parser.add_argument("--labels", action="append", metavar="SPEC",
                        help="labels of one portrait, in portrait order: 0,1,0,... (multi-hot) "
                             "or a class index; default: the model's predictions")
    parser.add_argument("--request_id", help="id of the request (default: a random uuid4)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace --out if it holds an earlier request's output")
    return parser.parse_args(argv)


def summary(receipt: Mapping[str, Any]) -> str:
    """A few lines for the terminal."""
    t = receipt["timings"]
    ids = sorted({i for i in receipt["identities"] if i is not None})
    labels = "predicted by the model" if receipt["labels_predicted"] else "given"
    return "\n".join([
        f"request {receipt['request_id']}: forgot {len(receipt['portraits'])} portrait(s) of "
        f"identity {', '.join(map(str, ids)) or '-'} with {receipt['method']} "
        f"(meta_lr {receipt['hyperparameters']['meta_lr']}, "
        f"{receipt['hyperparameters']['forget_epochs']} step(s))",
        f"model      {receipt['source_checkpoint']}",
        f"meta-loss  {receipt['meta_loss_run_dir']}",
        f"params     sha256 {receipt['params_hash_before'][:16]}... -> "
        f"{receipt['params_hash_after'][:16]}...",
        f"labels     {labels}",
        f"time       load {t['load_s']:.2f} s, compile {t['compile_s']:.2f} s, labels "
        f"{t['predict_s'] * 1e3:.1f} ms, unlearn {t['compute_s'] * 1e3:.1f} ms, save "
        f"{t['save_s']:.2f} s",
        f"wrote      {receipt['output']} (params/, {checkpoints.METADATA_FILE}, {RECEIPT_FILE})",
    ])


def main(argv: Sequence[str] | None = None) -> int:
    """The command line; returns the exit status (2: a request that cannot be served)."""
    args = parse_args(argv)
    logging.getLogger("absl").setLevel(logging.ERROR)
    try:
        receipt = serve_request(
            args.checkpoint, args.portrait, args.out, meta_loss_dir=args.meta_loss,
            identities=args.identity, labels=args.labels, request_id=args.request_id,
            method=args.method, overwrite=args.overwrite)
    except (CheckpointError, ConfigError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(summary(receipt))
    return 0
