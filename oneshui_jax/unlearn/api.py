"""The method API: one interface for every unlearning method, and what each may read.

1-SHUI (paper section 3) is defined by what an unlearning method may touch: a person hands in
portraits (the support images) and the training data is gone. This module makes that a typed
fact. Every method is a module that declares

* ``ACCESS``, one of :data:`ACCESS_LEVELS`:

  ========  =====================================================================  ==========
  ACCESS    what ``unlearn`` receives                                              servable
  ========  =====================================================================  ==========
  support   the :class:`Request` alone (support images, labels, identities)       yes
  stats     the request + ``artifacts`` that ``prepare`` computed *before* it     yes
            from TRAIN / VAL data (MetaUnlearn's meta-loss, a step length, ...)
  full      the request + :class:`FullData` (the forget and retain sets), as the  no
            reference's SCRUB and Bad Teacher read them: full-data references
  ========  =====================================================================  ==========

* ``Config``: a frozen dataclass, the method's only schema. The study's config block
  ``config.<method>`` (:func:`default_block`, :func:`reference_block`), the reference's values
  (``oneshui_jax.hparams``, mapped through each field's ``metadata["reference"]`` name) and
  validation (:func:`make_config`) are all derived from it. A field with
  ``metadata={"bound": "task"}`` is not a setting: the study fills it from the model. Its
  ``RANGES`` maps every numeric setting to a :class:`Range` (``COUNT``, ``LEARNING_RATE``, ...;
  declared in ``oneshui_jax.ranges``), checked by ``__post_init__`` (:func:`check_ranges`) and by
  :func:`make_config`; a numeric setting without one is refused when the registry loads
  (:func:`check_method`);

* ``prepare(model, params, data, cfg, rng) -> (artifacts, info)`` (optional): runs before the
  request. ``data`` is a :class:`TrainData` for ``stats`` and ``full`` methods and None for
  ``support`` ones. ``artifacts`` is a nested dict of arrays the study saves next to the unlearned
  parameters (and serving loads); ``info`` is JSON-able and goes into the results record;

* ``unlearn(model, params, artifacts, request, cfg, rng, data=None) -> (params, info)``: the
  request-time step. ``data`` is a :class:`FullData` for ``full`` methods and None otherwise.

Methods never see the test split, the config object or paths, and never write files. The study
builds what each call receives from ``ACCESS`` (``oneshui_jax.study.access``), and the images come
through a :class:`GuardedSource` that refuses every index the method may not read, so a contract
violation raises :class:`AccessError` instead of silently leaking data.
"""

from __future__ import annotations

import dataclasses
import difflib
import random
import time
import types
import typing
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from oneshui_jax import metric_writer
from oneshui_jax import splits as splits_lib
from oneshui_jax.errors import ConfigError
from oneshui_jax.models import vit

# The ranges of numeric settings (``oneshui_jax.ranges``, shared with ``splits``), named here too:
# a method's ``Config.RANGES`` reads them as ``api.COUNT``, ``api.NON_NEGATIVE``, ...
from oneshui_jax.ranges import BELOW_ONE as BELOW_ONE
from oneshui_jax.ranges import COUNT as COUNT
from oneshui_jax.ranges import COUNT_OR_ZERO as COUNT_OR_ZERO
from oneshui_jax.ranges import FRACTION as FRACTION
from oneshui_jax.ranges import LEARNING_RATE as LEARNING_RATE
from oneshui_jax.ranges import MAX_SEED as MAX_SEED
from oneshui_jax.ranges import MOMENTUM as MOMENTUM
from oneshui_jax.ranges import NON_NEGATIVE as NON_NEGATIVE
from oneshui_jax.ranges import NON_NEGATIVE_LIST as NON_NEGATIVE_LIST
from oneshui_jax.ranges import POSITIVE as POSITIVE
from oneshui_jax.ranges import SEED as SEED
from oneshui_jax.ranges import Range as Range
from oneshui_jax.ranges import check_ranges as check_ranges
from oneshui_jax.ranges import numeric_settings as numeric_settings

SUPPORT, STATS, FULL = "support", "stats", "full"
ACCESS_LEVELS = (SUPPORT, STATS, FULL)
SERVABLE = (SUPPORT, STATS)  # a request can be served from portraits alone

Params = Any
Artifacts = dict[str, Any]  # a nested dict of arrays (may be empty)


class AccessError(PermissionError):
    """A method tried to read an image its ACCESS does not grant."""


# ---------------------------------------------------------------------------------------------
# What a method works on


@dataclasses.dataclass(frozen=True)
class Model:
    """The task model a method unlearns (no parameters): architecture, task and numerics.

    Frozen and hashable, so methods can cache their jit-compiled steps per model.
    """

    vit: vit.ViTConfig
    task: str  # "multilabel" | "classification"
    compute_dtype: str = "float32"  # forward passes of the task model (config.train)
    attention: str = "xla"

    @property
    def num_classes(self) -> int:
        return self.vit.num_classes

    def logits(self, params: Params, images: jax.Array, dtype: str | None = None) -> jax.Array:
        """The task logits (float32 parameters, ``dtype`` compute; default ``compute_dtype``)."""
        return vit.apply(self.vit, params, images, dtype=jnp.dtype(dtype or self.compute_dtype),
                         attention=self.attention)[0]


@dataclasses.dataclass(frozen=True)
class Request:
    """A deletion request as a method sees it: the portraits and who they show.

    ``images`` [n, S, S, 3] float32 in [-1, 1] (the eval transform), ``labels`` multi-hot
    ``[n, C]`` or class indices ``[n]``, ``identities`` one training identity id per portrait (None
    where the requester gave none).
    """

    images: jax.Array
    labels: jax.Array
    identities: tuple[int | None, ...]

    def __post_init__(self) -> None:
        n = len(self.identities)
        if n == 0 or self.images.shape[0] != n or self.labels.shape[0] != n:
            raise ValueError(f"a request needs one image, label and identity per portrait; got "
                             f"{self.images.shape[0]} images, {self.labels.shape[0]} labels and "
                             f"{n} identities")

    @property
    def size(self) -> int:
        return len(self.identities)


class GuardedSource(Sequence):
    """The dataset's records, restricted to the images a method may read.

    Indices are the dataset's own; reading any other index raises :class:`AccessError` naming
    the image and what the method was granted.
    """

    def __init__(self, source: Sequence[Mapping[str, Any]], allowed: np.ndarray, granted: str):
        self._source = source
        self._allowed = np.zeros(len(source), bool)
        self._allowed[np.asarray(allowed, np.int64)] = True
        self.granted = granted

    def __len__(self) -> int:
        return len(self._source)

    def allows(self, index: int) -> bool:
        return bool(self._allowed[int(index)])

    def __getitem__(self, index):
        if not isinstance(index, int | np.integer):
            raise TypeError(f"records are read one index at a time, got {type(index).__name__}")
        if not 0 <= int(index) < len(self._source) or not self._allowed[int(index)]:
            raise AccessError(f"image {int(index)} is outside what this method may read "
                              f"({self.granted})")
        return self._source[int(index)]


@dataclasses.dataclass(frozen=True)
class TrainData:
    """What ``prepare`` may read, before any request: TRAIN identities' images and VAL images.

    The request's support images were held out of training and are not readable either; the
    test split is absent. ``holdout_identities`` are the TRAIN identities outside the request:
    hyper-parameters a method selects are selected on simulated requests of these people only,
    so no reported number has seen the people being forgotten. ``seed`` seeds the reference's
    request stream and batch order; ``checkpointer`` (or None) lets a long ``prepare`` save and
    resume its state without knowing where it is stored. ``crop_scale`` is the RandomResizedCrop
    area range the model was trained with, for a method that reads train-augmented images (PGU).
    ``writer`` (``metric_writer``; the study's writer of the stage, else one that writes nothing)
    takes a training loop's curves for TensorBoard.
    """

    source: GuardedSource
    identity_images: Mapping[int, list[int]]  # TRAIN identity -> its images, reference order
    image_identities: np.ndarray  # identity of every image of the dataset; -1 outside TRAIN
    train_identities: tuple[int, ...]  # the reference's TRAIN order (embedding rows)
    holdout_identities: tuple[int, ...]
    support_images: tuple[int, ...]  # excluded from simulated requests, as the reference does
    val_images: np.ndarray
    image_size: int
    seed: int
    progress: bool = False
    checkpointer: Any = None
    crop_scale: tuple[float, float] = (0.08, 1.0)  # the training augmentation's crop area range
    writer: metric_writer.NoOpWriter = dataclasses.field(
        default_factory=metric_writer.NoOpWriter, compare=False, repr=False)

    def _annotations(self) -> _TrainAnnotations:
        return _TrainAnnotations(self.identity_images, self.image_identities)

    def _splits(self, identities: Sequence[int] | None = None) -> splits_lib.Splits:
        train = list(self.train_identities if identities is None else identities)
        return splits_lib.Splits(train=train, val=[], test=[], support=list(self.support_images),
                                 forget=[], retain=[])

    def simulated_requests(self, num_ids: int, rng: random.Random,
                           identities: Sequence[int] | None = None
                           ) -> list[splits_lib.SimulatedRequest]:
        """The reference's simulated requests (``splits.simulated_requests``) over
        ``identities`` (default: every TRAIN identity, as MetaUnlearn meta-trains)."""
        return splits_lib.simulated_requests(self._annotations(), self._splits(identities),
                                             num_ids, rng)

    def retain_images(self, request: splits_lib.SimulatedRequest) -> np.ndarray:
        """Images of every TRAIN identity outside a simulated request (support held out)."""
        return splits_lib.retain_images(self._annotations(), self._splits(), request)


@dataclasses.dataclass(frozen=True)
class _TrainAnnotations:
    """The part of ``IdentityAnnotations`` the request helpers of ``splits`` read, TRAIN only."""

    table: Mapping[int, list[int]]
    identities: np.ndarray

    def identity_to_images(self) -> Mapping[int, list[int]]:
        return self.table


def request_batches(request: Request, batch_size: int,
                    order: Sequence[int] | np.ndarray | None = None) -> list[dict[str, jax.Array]]:
    """The request's portraits in ``order`` (default: request order) as the reference's
    unlearning loaders batch them: batches of ``min(batch_size, n)`` rows, the last one padded by
    repeating its first portrait and masked, so every batch has one shape and padded rows count
    nowhere. Each batch is ``{"image", "label", "mask"}``.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    n = request.size
    order = np.arange(n) if order is None else np.asarray(order, np.int64)
    rows = min(batch_size, n)
    images, labels = jnp.asarray(request.images, jnp.float32), jnp.asarray(request.labels)
    out = []
    for start in range(0, len(order), rows):
        chunk = order[start:start + rows]
        valid = len(chunk)
        chunk = np.concatenate([chunk, np.full(rows - valid, chunk[0], np.int64)])
        out.append({"image": images[chunk], "label": labels[chunk],
                    "mask": jnp.asarray(np.arange(rows) < valid)})
    return out


@dataclasses.dataclass(frozen=True)
class FullData:
    """What a ``full`` method's ``unlearn`` reads: the forget and retain sets (and VAL).

    The reference's SCRUB and Bad Teacher read the forget identities' training images and the
    retain identities' images at request time; the test split stays absent. ``crop_scale`` is
    the training augmentation's RandomResizedCrop area range (as in :class:`TrainData`).
    """

    source: GuardedSource
    forget_images: np.ndarray
    retain_images: np.ndarray
    val_images: np.ndarray
    image_size: int
    seed: int
    progress: bool = False
    crop_scale: tuple[float, float] = (0.08, 1.0)


# ---------------------------------------------------------------------------------------------
# Methods and their configs


def check_method(name: str, module: types.ModuleType) -> None:
    """TypeError unless ``module`` declares the method interface (a programming error)."""
    problems = []
    if getattr(module, "ACCESS", None) not in ACCESS_LEVELS:
        problems.append(f"ACCESS must be one of {ACCESS_LEVELS}")
    config_cls = getattr(module, "Config", None)
    if not (dataclasses.is_dataclass(config_cls) and config_cls.__dataclass_params__.frozen):
        problems.append("Config must be a frozen dataclass")
    if not callable(getattr(module, "unlearn", None)):
        problems.append("unlearn(model, params, artifacts, request, cfg, rng, data=None) is "
                        "missing")
    if hasattr(module, "prepare") and not callable(module.prepare):
        problems.append("prepare must be a function")
    if config_cls is not None and dataclasses.is_dataclass(config_cls):
        ranges = getattr(config_cls, "RANGES", {})
        missing = [n for n in numeric_settings(config_cls) if n not in ranges]
        if missing or not all(isinstance(r, Range) for r in ranges.values()):
            problems.append(f"Config.RANGES must give a Range for every numeric setting; "
                            f"missing: {missing}")
    if problems:
        raise TypeError(f"method {name!r} ({module.__name__}): " + "; ".join(problems))


def settings(config_cls: type) -> list[dataclasses.Field]:
    """The fields of a method's ``Config`` that are settings (not bound to the model)."""
    return [f for f in dataclasses.fields(config_cls) if "bound" not in f.metadata]


def _plain(value: Any) -> Any:
    """Lists as tuples (ml_collections cannot override lists from the command line)."""
    return tuple(value) if isinstance(value, list) else value


def default_block(module: types.ModuleType):
    """``config.<method>``: every setting of ``module.Config`` with its default value."""
    import ml_collections

    block = ml_collections.ConfigDict()
    for f in settings(module.Config):
        if f.default is not dataclasses.MISSING:
            block[f.name] = _plain(f.default)
        elif f.default_factory is not dataclasses.MISSING:
            block[f.name] = _plain(f.default_factory())
        else:
            raise TypeError(f"{module.__name__}.Config.{f.name} needs a default value")
    return block


def reference_block(module: types.ModuleType, method: str, dataset: str, num_identities: int):
    """``default_block`` with the reference's values for (method, dataset, N) where it has them.

    A setting takes the value of the reference argument named in its ``metadata["reference"]``
    (default: its own name) when ``hparams.reference`` resolves one. Methods the reference lacks
    keep their defaults. Returns ``(block, Hyperparameters or None)``.
    """
    from oneshui_jax import hparams

    block = default_block(module)
    if method not in hparams.METHODS:
        return block, None
    h = hparams.reference(method, dataset, num_identities)
    for f in settings(module.Config):
        ref = f.metadata.get("reference", f.name)
        if ref in h.values:
            block[f.name] = _plain(h.values[ref])
    return block, h


def make_config(method: str, module: types.ModuleType, block: Mapping[str, Any] | None,
                **bound: Any):
    """``module.Config`` from the study's ``config.<method>`` block, validated.

    ``bound`` fills the fields bound to the model (``task=...``). Unknown keys, wrong types and
    values the Config rejects raise one ConfigError naming ``config.<method>.<field>``.
    """
    config_cls = module.Config
    names = {f.name: f for f in settings(config_cls)}
    given = dict(block.to_dict() if hasattr(block, "to_dict") else (block or {}))
    unknown = [k for k in given if k not in names]
    if unknown:
        hints = [f" (did you mean {m[0]!r}?)" if (m := difflib.get_close_matches(k, names, 1))
                 else "" for k in unknown]
        listed = ", ".join(f"{k!r}{h}" for k, h in zip(unknown, hints, strict=True))
        raise ConfigError(f"config.{method} has unknown settings {listed}; {method} accepts "
                          f"{', '.join(names)}")
    hints = typing.get_type_hints(config_cls)
    ranges = getattr(config_cls, "RANGES", {})
    values = {}
    for key, value in given.items():
        value = _check_type(method, key, _plain(value), hints.get(key))
        if key in ranges:  # named by the stage (a variant's own block), before the Config's
            ranges[key].check(f"config.{method}.{key}", value)
        values[key] = value
    try:
        return config_cls(**values, **bound)
    except ConfigError:
        raise
    except (TypeError, ValueError) as e:
        raise ConfigError(f"config.{method}: {e}") from None


def _check_type(method: str, key: str, value: Any, hint: Any) -> Any:
    """``value`` checked against a simple type hint (bool, int, float, str, tuple)."""
    where = f"config.{method}.{key}"
    if hint is bool:
        if not isinstance(value, bool | np.bool_):
            raise ConfigError(f"{where} must be true or false, got {value!r}")
        return bool(value)
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int | np.integer):
            raise ConfigError(f"{where} must be an integer, got {value!r}")
        return int(value)
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, int | float | np.number):
            raise ConfigError(f"{where} must be a number, got {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where} must be a string, got {value!r}")
        return value
    if typing.get_origin(hint) is tuple:
        if not isinstance(value, tuple | list):
            raise ConfigError(f"{where} must be a tuple, got {value!r}")
        return tuple(value)
    return value


def timed_unlearn(module: types.ModuleType, model: Model, params: Params,
                  artifacts: Artifacts, request: Request, cfg: Any, rng: jax.Array, *,
                  data: FullData | None = None, warm_up: bool = False
                  ) -> tuple[Params, dict[str, Any], float, float]:
    """``module.unlearn`` run to completion: ``(params, info, first_call_s, seconds)``.

    With ``warm_up`` it runs once first (compilation included, timed as ``first_call_s``) so
    that ``seconds`` is the one-shot cost after compilation, as the paper reports it.
    """
    first_call_s = 0.0
    if warm_up:
        start = time.perf_counter()
        jax.block_until_ready(module.unlearn(model, params, artifacts, request, cfg, rng,
                                             data=data)[0])
        first_call_s = time.perf_counter() - start
    start = time.perf_counter()
    new, info = module.unlearn(model, params, artifacts, request, cfg, rng, data=data)
    new = jax.block_until_ready(new)
    return new, info, first_call_s, time.perf_counter() - start


def config_record(cfg: Any) -> dict[str, Any]:
    """A method's Config as JSON-able values (tuples as lists), for metadata and receipts."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(cfg).items()}


def config_from_record(method: str, module: types.ModuleType, record: Mapping[str, Any]):
    """The Config a run recorded (``config_record``); ConfigError if this version rejects it."""
    bound = {f.name: record[f.name] for f in dataclasses.fields(module.Config)
             if "bound" in f.metadata and f.name in record}
    block = {k: v for k, v in record.items() if k not in bound}
    return make_config(method, module, block, **bound)

