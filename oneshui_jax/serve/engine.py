"""The method-agnostic engine: a model and one method run, ready to unlearn portraits.

Serving runs the request-time half of a method (``unlearn`` of ``unlearn/api.py``) on the
portraits alone (paper section 3). A *method run* is the run directory the study writes for a
method (``study/stages.py``): it records ``method``, ``access``, ``method_config`` and the
pretrained model it started from (``base_run_dir``, ``base_params_hash``), and holds the
artifacts its ``prepare`` computed (``artifacts/``, hash ``artifacts_hash``). Its ``params/`` are
the model it unlearned for the study's own request and are not used here.

Where the model and the method run come from (:func:`resolve_sources`), given ``--checkpoint``:

* a method run: its own method, config and artifacts, on the model it started from
  (``base_run_dir``, the pretrained model);
* a request's output (``stage: "request"``): the model is that output and the method run the
  one it recorded (``method_run_dir``), so deletions chain with no flag; the output's
  ``receipt.json`` must be there, of a known version, and name its request and the hash of its
  parameters (``request.check_receipt``; ``load_params`` checks that hash against the
  parameters);
* any other run (a pretrained model): the model is that run, the method run ``--artifacts``.

``--artifacts RUN_DIR`` always names the method run (on a method run, the model is still its
``base_run_dir``). The model must have the method run's architecture (``model_config``), its
training identities (``splits["train"]``) and lineage: the pretrained model the method was
prepared on (``base_params_hash``) is the model itself or the start of its chain of requests.
``full`` methods are refused: they read the forget and retain sets at request time.

Deviation (named): when no labels are given, the model's own predictions on the portraits are
used (sigmoid > 0.5 for multi-label tasks, argmax for classification), for every method. The
reference feeds the dataset's annotations; a person deleting themselves does not hand in
attribute annotations. The receipt says which labels were used and whether they were predicted.

:class:`Engine` keeps one model, method and artifacts in memory. The first request of a size
calls the method twice: the first call (compilation included) is timed as ``compile_s``, the
second as ``compute_s``; later requests of that size call it once (``compile_s`` 0) and trace
nothing (tests/test_request_path.py counts traces and compilations). The portraits' copy to the
device is timed apart (``h2d_s``), and the output's checksum is computed on the device
(``serve.digest.params_digest``: 16 bytes come back, ``digest_s``); the sha256 of the saved
parameters (``checkpoints.params_hash``) stays what the chain of requests is checked with.
"""

from __future__ import annotations

import dataclasses
import os
import time
import types
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np

from oneshui_jax import checkpoints
from oneshui_jax.data import catalog, transforms
from oneshui_jax.errors import CheckpointError, ConfigError, DataError
from oneshui_jax.models import vit
from oneshui_jax.serve import digest as digest_lib
from oneshui_jax.serve import request as request_lib
from oneshui_jax.serve.request import REQUEST_STAGE
from oneshui_jax.unlearn import api, registry

Params = Any
ARTIFACTS_DIR = checkpoints.ARTIFACTS_DIR


def servable_methods() -> list[str]:
    """The registered methods a request can be served with (ACCESS support or stats)."""
    return [n for n, m in registry.METHODS.items() if m.ACCESS in api.SERVABLE]


def train_hint() -> str:
    """How to make a method run, for error messages."""
    methods = servable_methods()
    return ("train one with the study: python -m oneshui_jax.main --config=configs/<dataset>.py "
            f"--config.stages='(\"pretrain\", \"{methods[0] if methods else 'meta_unlearn'}\")' "
            f"(servable methods: {', '.join(methods)}; the run directory "
            "<checkpoint_dir>/<dataset>/<model>/<method>_<N>_<seed>/ holds "
            f"{ARTIFACTS_DIR}/)")


# --------------------------------------------------------------------------------------------
# Where the model and the method run come from


def is_method_run(run_dir: str, metadata: Mapping[str, Any]) -> bool:
    """A method's run directory: it holds ``artifacts/`` or records a ``method``, and is not a
    request's output."""
    if metadata.get("stage") == REQUEST_STAGE:
        return False
    return os.path.isdir(os.path.join(run_dir, ARTIFACTS_DIR)) or bool(metadata.get("method"))


def resolve_sources(checkpoint: str, artifacts_dir: str | None = None) -> tuple[str, str]:
    """``(model run dir, method run dir)`` of a request on ``checkpoint`` (module docstring)."""
    metadata = checkpoints.read_metadata(checkpoint)
    model_dir, method_dir = checkpoint, artifacts_dir
    if is_method_run(checkpoint, metadata):
        model_dir = metadata.get("base_run_dir")
        if not model_dir:
            raise CheckpointError(f"{checkpoint} is a method run but its metadata records no "
                                  "base_run_dir (the model it was prepared on); pass that model "
                                  f"as --checkpoint and --artifacts {checkpoint}")
        if not os.path.isdir(model_dir):
            raise CheckpointError(
                f"the method run {checkpoint} was prepared on {model_dir}, which does not exist "
                f"(moved?); pass the pretrained run as --checkpoint and --artifacts {checkpoint}")
        method_dir = method_dir or checkpoint
    elif method_dir is None and metadata.get("stage") == REQUEST_STAGE:
        method_dir = metadata.get("method_run_dir")
        if not method_dir:
            raise CheckpointError(f"{checkpoint} is a request's output but its metadata records "
                                  "no method_run_dir; pass --artifacts METHOD_RUN_DIR")
    if method_dir is None:
        raise CheckpointError(
            f"{checkpoint} is a {metadata.get('stage', 'training')!r} run, not a method run (no "
            f"{ARTIFACTS_DIR}/, no recorded method) nor a request's output: pass --artifacts "
            f"METHOD_RUN_DIR, or {train_hint()}")
    method_meta = checkpoints.read_metadata(method_dir)
    if not is_method_run(method_dir, method_meta):
        raise CheckpointError(f"--artifacts {method_dir} is not a method run (no "
                              f"{ARTIFACTS_DIR}/, no recorded method): {train_hint()}")
    return os.path.abspath(model_dir), os.path.abspath(method_dir)


def lineage_hash(metadata: Mapping[str, Any]) -> str | None:
    """The pretrained model a run descends from: itself, or the start of its request chain."""
    if metadata.get("stage") == REQUEST_STAGE:
        return metadata.get("base_params_hash")
    return metadata.get("params_hash")


def check_pair(model_meta: Mapping[str, Any], method_meta: Mapping[str, Any]) -> None:
    """CheckpointError unless the model is one the method run was prepared for."""
    model_dir, method_dir = model_meta["run_dir"], method_meta["run_dir"]
    differ = checkpoints.model_config_differences(model_meta.get("model_config"),
                                                  method_meta["model_config"])
    if differ:
        raise CheckpointError(
            f"the model at {model_dir} does not match the method run {method_dir}: model_config "
            f"differs in {'; '.join(differ)} (the model's -> the method run's)")
    if (model_meta.get("splits") or {}).get("train") != method_meta["splits"]["train"]:
        raise CheckpointError(f"the model at {model_dir} was trained on other identities than "
                              f"the method run {method_dir} (splits['train'] differ)")
    lineage = lineage_hash(model_meta)
    if lineage != method_meta["base_params_hash"]:
        raise CheckpointError(
            f"the method run {method_dir} was prepared on the model "
            f"{method_meta.get('base_run_dir')} (params sha256 "
            f"{str(method_meta['base_params_hash'])[:16]}...), but {model_dir} descends from "
            f"sha256 {str(lineage)[:16]}...: use a method run prepared on this model")


def method_of(method_meta: Mapping[str, Any]) -> tuple[str, types.ModuleType]:
    """``(name, module)`` of the method a run recorded; refuses unknown and ``full`` methods."""
    where = f"{method_meta['run_dir']}/{checkpoints.METADATA_FILE}"
    name = method_meta.get("method")
    if not name:
        raise CheckpointError(f"{where} records no method: not a finished method run; "
                              f"{train_hint()}")
    if name in registry.METHODS:
        module = registry.METHODS[name]
    elif registry.is_module_path(name):  # a method outside the package, as its study loaded it
        module = registry.load(name, f"{where} (method)")
    else:
        raise ConfigError(f"{where} records the method {name!r}, which this version does not "
                          f"know; servable: {', '.join(servable_methods())}")
    access = {method_meta.get("access") or module.ACCESS, module.ACCESS}
    if api.FULL in access:
        raise ConfigError(
            f"method {name} (run {method_meta['run_dir']}) has access 'full': it reads the forget "
            "and retain sets at request time, so it cannot serve a request from portraits alone;"
            f" servable methods (access {' or '.join(api.SERVABLE)}): "
            f"{', '.join(servable_methods())}")
    return name, module


def _model(method_meta: Mapping[str, Any], cfg: Any) -> api.Model:
    """The task model as the method run's study saw it (architecture, task, numerics)."""
    where = f"{method_meta['run_dir']}/{checkpoints.METADATA_FILE}"
    config = method_meta.get("config") or {}
    try:
        vit_cfg = vit.ViTConfig(**method_meta["model_config"])
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{where} records a model_config this version cannot use: {e}"
                              ) from e
    task = getattr(cfg, "task", None)
    if task is None:
        task = catalog.spec(config.get("dataset")).task
    train = config.get("train") or {}
    attention = train.get("attention", "xla")
    if attention != "xla" and jax.default_backend() != "gpu":
        attention = "xla"  # cuDNN attention exists on GPUs only; the numbers are the same
    return api.Model(vit_cfg, task, train.get("compute_dtype", "float32"), attention)


# --------------------------------------------------------------------------------------------
# The engine


@dataclasses.dataclass(frozen=True)
class Prepared:
    """One prepared deletion request: what the method receives and how it was made."""

    request: api.Request
    labels_predicted: bool
    # prepare_s (preprocessing, the copy included), h2d_s (the copy of the portraits and
    # labels to the device), predict_s and compile_s (labels)
    timings: dict[str, float]

    @property
    def labels(self) -> np.ndarray:
        """uint8 multi-hot [n, C] or int32 class indices [n]."""
        return np.asarray(self.request.labels)

    @property
    def identities(self) -> list[int | None]:
        return list(self.request.identities)


class Engine:
    """A model and one servable method with its artifacts, ready to serve deletion requests.

    ``unlearn`` and ``forget`` are pure: they start from ``params`` (default: the loaded model)
    and return new parameters, leaving the engine unchanged. ``cache_size`` counts the
    (step, request size) pairs compiled so far, label prediction included.
    """

    def __init__(self, model: api.Model, params: Params, method: str,
                 module: types.ModuleType, cfg: Any, artifacts: api.Artifacts,
                 train_identities: Sequence[int], *, seed: int = 0,
                 model_metadata: Mapping[str, Any] | None = None,
                 method_metadata: Mapping[str, Any] | None = None) -> None:
        if module.ACCESS not in api.SERVABLE:
            raise ConfigError(f"method {method} has access {module.ACCESS!r}: it reads the "
                              "forget and retain sets at request time, so it cannot serve a "
                              "request from portraits alone")
        self.model, self.params, self.method, self.module = model, params, method, module
        self.cfg, self.artifacts, self.seed = cfg, artifacts, seed
        self.train_identities = frozenset(int(i) for i in train_identities)
        self.model_metadata = dict(model_metadata or {})
        self.method_metadata = dict(method_metadata or {})
        self._predict = jax.jit(lambda p, x: model.logits(p, x, "float32"))
        self._compiled: dict[tuple, Any] = {}
        self._params_digest: str | None = None

    @classmethod
    def from_checkpoint(cls, path: str, artifacts_dir: str | None = None) -> Engine:
        """Loads the model and method run of a request on ``path`` (:func:`resolve_sources`)."""
        model_dir, method_dir = resolve_sources(path, artifacts_dir)
        model_meta = checkpoints.read_metadata(model_dir)
        method_meta = checkpoints.read_metadata(method_dir)
        name, module = method_of(method_meta)
        where = f"{method_dir}/{checkpoints.METADATA_FILE}"
        missing = [k for k in ("model_config", "method_config", "base_params_hash")
                   if not method_meta.get(k)]
        if missing or not (method_meta.get("splits") or {}).get("train"):
            raise CheckpointError(f"{where} lacks {missing or ['splits.train']}: not a finished "
                                  f"{name} run")
        if method_meta["status"] != "done":
            raise CheckpointError(f"the method run {method_dir} is not finished (status "
                                  f"{method_meta['status']!r}); finish it with the study first")
        check_pair(model_meta, method_meta)
        if model_meta.get("stage") == REQUEST_STAGE:  # a chained request: its parent's receipt
            request_lib.check_receipt(model_dir, model_meta)
        try:
            cfg = api.config_from_record(name, module, method_meta["method_config"])
        except ConfigError as e:
            raise ConfigError(f"{where} records a method_config this version rejects: {e}"
                              ) from None
        model = _model(method_meta, cfg)
        params = checkpoints.load_params(model_dir)
        artifacts = load_artifacts(method_dir, method_meta)
        seed = (method_meta.get("config") or {}).get("seed", 0)
        return cls(model, params, name, module, cfg, artifacts, method_meta["splits"]["train"],
                   seed=int(seed or 0), model_metadata=model_meta, method_metadata=method_meta)

    @property
    def access(self) -> str:
        return self.module.ACCESS

    @property
    def params_digest(self) -> str:
        """``digest.params_digest_hex`` of the loaded model (computed once)."""
        if self._params_digest is None:
            self._params_digest = digest_lib.params_digest_hex(self.params)
        return self._params_digest

    @property
    def cache_size(self) -> int:
        """How many (step, request size) pairs are compiled (unlearning and label prediction)."""
        return len(self._compiled)

    def _key(self, name: str, tree: Any) -> tuple:
        return (name, *((x.shape, x.dtype) for x in jax.tree.leaves(tree)))

    def _identities(self, identities: int | Sequence[int | None] | None, n: int
                    ) -> tuple[int | None, ...]:
        """One identity per portrait (None where not given); unknown ones are refused."""
        if identities is None:
            return (None,) * n
        ids = [identities] if isinstance(identities, int | np.integer) else list(identities)
        if len(ids) == 1:
            ids = ids * n
        if len(ids) != n:
            raise ConfigError(f"give one identity for all {n} portraits or one per portrait, "
                              f"got {len(ids)}")
        unknown = sorted({int(i) for i in ids if i is not None} - self.train_identities)
        if unknown:
            raise ConfigError(f"identities {unknown} are not training identities of this model "
                              f"({len(self.train_identities)} known, splits['train'] of "
                              f"{self.method_metadata.get('run_dir', 'the method run')}); "
                              f"{self.method} can only forget people the model was trained on")
        return tuple(None if i is None else int(i) for i in ids)

    def _check_labels(self, labels: Sequence[Any], n: int) -> np.ndarray:
        """Given labels as the request holds them; ConfigError naming what is wrong."""
        c = self.model.num_classes
        if len(labels) != n:
            raise ConfigError(f"give labels for each of the {n} portraits, got {len(labels)}")
        classification = self.model.task == "classification"
        for k, item in enumerate(labels):
            values = np.asarray(item)
            ok = (values.shape == () and 0 <= values < c) if classification else (
                values.shape == (c,) and bool(np.isin(values, (0, 1)).all()))
            if not ok or not np.issubdtype(values.dtype, np.integer):
                expected = (f"a class index in [0, {c})" if classification
                            else f"{c} values 0/1 (multi-hot)")
                raise ConfigError(f"labels of portrait {k} must be {expected}, got {item!r}")
        return np.asarray(labels, np.int32 if classification else np.uint8)

    def prepare(self, portraits: Sequence[np.ndarray],
                identities: int | Sequence[int | None] | None,
                labels: Sequence[Any] | None = None, params: Params = None) -> Prepared:
        """Eval-transforms the portraits (uint8 HxWx3, any size) into an ``api.Request``.

        Labels default to the predictions of ``params`` (the model to unlearn; module
        docstring: a named deviation).
        """
        start = time.perf_counter()
        n = len(portraits)
        if n == 0:
            raise DataError("an empty request: give at least one portrait")
        for k, image in enumerate(portraits):
            image = np.asarray(image)
            if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3 or not all(
                    image.shape):
                raise DataError(f"portrait {k} must be a non-empty uint8 HxWx3 RGB array, got "
                                f"{image.dtype} {image.shape}")
        ids = self._identities(identities, n)
        host = transforms.preprocess_eval(portraits, self.model.vit.image_size)
        copy_start = time.perf_counter()
        images = jax.block_until_ready(jax.device_put(host))
        h2d_s = time.perf_counter() - copy_start
        timings = {"prepare_s": time.perf_counter() - start, "h2d_s": h2d_s, "predict_s": 0.0,
                   "compile_s": 0.0}
        predicted = labels is None
        if labels is not None:
            labels = self._check_labels(labels, n)
        else:
            theta = self.params if params is None else params
            key = self._key("predict", images)
            if key not in self._compiled:
                start = time.perf_counter()
                self._compiled[key] = self._predict.lower(theta, images).compile()
                timings["compile_s"] = time.perf_counter() - start
            start = time.perf_counter()
            logits = np.asarray(self._compiled[key](theta, images))
            labels = (logits.argmax(-1).astype(np.int32) if self.model.task == "classification"
                      else (logits > 0).astype(np.uint8))
            timings["predict_s"] = time.perf_counter() - start
        start = time.perf_counter()
        labels = jax.block_until_ready(jax.device_put(labels))
        timings["h2d_s"] += time.perf_counter() - start
        return Prepared(api.Request(images, labels, ids), predicted, timings)

    def unlearn(self, prepared: Prepared, params: Params = None
                ) -> tuple[Params, dict[str, Any]]:
        """The method's ``unlearn`` on the request: ``(new params, timings)``.

        Timings: ``compile_s`` (the first call for a new request size, 0 after),
        ``compute_s`` (a call to completion, the new parameters on the device) and
        ``digest_s`` (their ``digest.params_digest``, on the device, to the host);
        ``params_digest`` (32 hex digits) and ``method_info``: what the method's ``unlearn``
        reported (JSON-able, e.g. support_ascent's ``alpha``). ``params`` (default: the loaded
        model) is never modified or donated.
        """
        theta = self.params if params is None else params
        request = prepared.request
        key = self._key(f"unlearn:{self.method}", (request.images, request.labels))
        warm_up = key not in self._compiled
        new, info, compile_s, compute_s = api.timed_unlearn(
            self.module, self.model, theta, self.artifacts, request, self.cfg,
            jax.random.key(self.seed), warm_up=warm_up)
        if warm_up:  # the digest's compilation (once per model structure) counts as compile_s
            start = time.perf_counter()
            jax.block_until_ready(digest_lib.params_digest(new))
            compile_s += time.perf_counter() - start
        self._compiled[key] = True
        start = time.perf_counter()
        digest = digest_lib.params_digest_hex(new)
        return new, {"compile_s": compile_s, "compute_s": compute_s,
                     "digest_s": time.perf_counter() - start, "params_digest": digest,
                     "method_info": info}

    def forget(self, portraits: Sequence[np.ndarray],
               identities: int | Sequence[int | None] | None,
               labels: Sequence[Any] | None = None, params: Params = None
               ) -> tuple[Params, dict[str, Any]]:
        """:meth:`prepare` then :meth:`unlearn`: ``(new params, {prepare_s, h2d_s, predict_s,
        compile_s, compute_s, digest_s, params_digest, method_info})`` (compile_s covers the
        label prediction too)."""
        prepared = self.prepare(portraits, identities, labels, params)
        new, timings = self.unlearn(prepared, params)
        return new, {**prepared.timings, **timings,
                     "compile_s": prepared.timings["compile_s"] + timings["compile_s"]}


def load_artifacts(method_dir: str, method_meta: Mapping[str, Any]) -> api.Artifacts:
    """The artifacts a method run's ``prepare`` saved (``artifacts/``, hash-checked); {} if the
    method saved none."""
    expected = method_meta.get("artifacts_hash")
    if not os.path.isdir(os.path.join(method_dir, ARTIFACTS_DIR)):
        if expected:
            raise CheckpointError(f"{method_dir}/{ARTIFACTS_DIR} is missing, but "
                                  f"{checkpoints.METADATA_FILE} records its hash (deleted or "
                                  "moved?)")
        return {}
    return checkpoints.load_tree(method_dir, ARTIFACTS_DIR, expected_hash=expected)
