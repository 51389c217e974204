"""Every setting of a study checked before any data is read or any stage runs.

``validate_config`` rejects unknown stages, the training settings, the model and every method's
``Config`` (``unlearn/api.make_config``), so ``--config.meta_unlearn.loss_type=bogus`` fails in
the first second with one line naming the setting, not after pretraining and retraining.

Numeric settings are checked from one schema (:func:`declared_ranges`): :data:`SETTINGS` for the
study's own (seeds, sizes, the privacy evaluation's passes and batches), ``TrainConfig.RANGES``
for ``config.train`` and each method ``Config``'s ``RANGES`` for its block; each range is an
``ranges.Range`` (``COUNT``, ``SEED``, ``LEARNING_RATE``, ...). A value outside its range is one
ConfigError naming ``config.<path>``, the value and the range.

``validate_config`` returns the :class:`Settings` it resolved (``config.train`` as a
``TrainConfig``, every method stage's ``Config``): the study resolves them once and carries them in
its context.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from oneshui_jax import ranges
from oneshui_jax import train as train_lib
from oneshui_jax.data import catalog
from oneshui_jax.errors import ConfigError
from oneshui_jax.metrics import SECOND_ORACLE
from oneshui_jax.mia import rmia
from oneshui_jax.models import vit
from oneshui_jax.unlearn import api, registry

# SECOND_ORACLE (metrics): the same split and data as retrain, every other draw from seed + 1
# (study/privacy.reference_context); its ToW against retrain is the noise floor of ToW.
TRAINING_STAGES = {"pretrain": "train", "retrain": "retain",
                   SECOND_ORACLE: "retain"}  # stage -> identities it fits
RMIA_VARIANTS = ("reference", "canonical")  # config.mia.rmia_variant (study/privacy.py)
SUBSAMPLE_MODES = ("none", "per_pass", "once")  # config.mia.subsample (study/privacy.py)

SETTINGS: dict[str, ranges.Range] = {
    "num_identities": ranges.COUNT,
    "seed": ranges.SEED,
    "split_seed": ranges.Range(f"an int seed in [0, {ranges.MAX_SEED}] or None (the split "
                               "follows config.seed)", integer=True, low=0,
                               high=ranges.MAX_SEED, optional=True),
    "checkpoint_every_s": ranges.Range("a finite number of seconds >= 0 (0: save at every "
                                       "epoch or request)", low=0.0),
    "data.image_size": ranges.COUNT,
    "data.crop_scale": ranges.Range("two numbers 0 < low <= high <= 1 (RandomResizedCrop's "
                                    "area range)", low=0.0, low_open=True, high=1.0,
                                    sequence=True, length=2, ordered=True),
    "data.num_threads": ranges.Range("an int >= 0 (0: read in the calling thread)",
                                     integer=True, low=0),
    "data.eval_batch_size": ranges.COUNT,
    "mia.passes": ranges.Range("an int >= 1 and <= 255 (votes are counted in uint8)",
                               integer=True, low=1, high=255),
    "mia.batch_size": ranges.COUNT,
    "mia.subsample_z": ranges.COUNT,
    "mia.subsample_val": ranges.COUNT,
    "mia.cache_mb": ranges.Range("a finite number of MB >= 0", low=0.0),
    "ensemble.size": ranges.Range("0 (no ensembles) or an int >= 3 (the per-person test fits "
                                  "each group without the model it scores)", integer=True,
                                  low=3, also=(0,)),
    "mia.rmia_point": ranges.Range("(gamma, a), two numbers > 0 (a point of RMIA's grid), or () "
                                   "for no fixed point", low=0.0, low_open=True, sequence=True,
                                   length=2, optional=True),
    "mesh.data": ranges.Range("-1 (every device) or a number of devices >= 1", integer=True,
                              low=1, also=(-1,)),
}
"""The range of every numeric setting of the study outside ``config.train`` and the method
blocks (dotted paths under ``config``); an absent setting keeps its default."""


def train_config(config, task: str) -> train_lib.TrainConfig:
    """Pretrain / retrain settings from ``config.train`` (validated by ``TrainConfig``)."""
    t = config.train
    return train_lib.TrainConfig(task=task, epochs=t.epochs, batch_size=t.batch_size, lr=t.lr,
                                 weight_decay=t.weight_decay, momentum=t.momentum,
                                 warmup_epochs=t.warmup_epochs, compute_dtype=t.compute_dtype,
                                 optimizer=t.optimizer, attention=t.attention,
                                 remat=t.get("remat", False),
                                 ap_scores=t.get("ap_scores", "reference"))


def method_config(config, name: str, task: str):
    """Stage ``name``'s method ``Config`` from the block ``config.<name>`` (defaults if absent;
    for a variant, its block without the ``method`` key: ``registry.resolve``)."""
    base, module = registry.resolve(config, name)
    block = config.get(name)
    if base != name:
        block = {k: v for k, v in block.items() if k != registry.VARIANT_KEY}
    return api.make_config(name, module, block, task=task)


_ABSENT = object()


def _value(config, path: str):
    """The value at the dotted ``path`` of ``config``, or ``_ABSENT`` where a block or key is
    missing (the code's default then applies)."""
    node = config
    for key in path.split("."):
        if not hasattr(node, "keys") or key not in node.keys():
            return _ABSENT
        node = node[key]
    return node


def declared_ranges(config) -> dict[str, ranges.Range]:
    """The range of every numeric setting ``config`` may hold, by dotted path under ``config``:
    :data:`SETTINGS`, ``train.<field>`` (``TrainConfig.RANGES``) and ``<block>.<field>`` for
    every method block, a method's or a variant's (its ``Config.RANGES``)."""
    ranges = dict(SETTINGS)
    ranges.update({f"train.{k}": r for k, r in train_lib.TrainConfig.RANGES.items()})
    for name in config.keys():
        if not registry.is_method(config, name):
            continue
        try:
            _, module = registry.resolve(config, name)
        except ConfigError:  # a variant of no method: refused if it is a stage
            continue
        ranges.update({f"{name}.{k}": r for k, r in module.Config.RANGES.items()})
    return ranges


def check_ranges(config, paths) -> None:
    """Every setting of ``paths`` (dotted, under ``config``) that ``config`` holds, checked
    against its range in :func:`declared_ranges`: one ConfigError naming the first one out of
    range, its value and the range."""
    ranges = declared_ranges(config)
    for path in paths:
        value = _value(config, path)
        if value is not _ABSENT:
            ranges[path].check(f"config.{path}", value)


@dataclasses.dataclass(frozen=True)
class Settings:
    """What ``validate_config`` resolved: ``train`` (``config.train`` as a ``TrainConfig``) and
    ``methods`` (each method stage's validated ``Config``, by stage name)."""

    train: train_lib.TrainConfig
    methods: dict[str, Any]


def validate_config(config) -> Settings:
    """One ConfigError for the first thing that would fail later; nothing is read or written.
    Returns the resolved :class:`Settings`."""
    unknown = [s for s in config.stages
               if s not in TRAINING_STAGES and not registry.is_method(config, s)]
    if unknown:
        raise ConfigError(f"config.stages has unknown stages {unknown}; available: "
                          f"{list(TRAINING_STAGES) + sorted(registry.METHODS)}, or a variant "
                          f"(a block config.<name> with {registry.VARIANT_KEY}=<method>)")
    if len(set(config.stages)) != len(config.stages):
        raise ConfigError(f"config.stages lists a stage twice: {tuple(config.stages)}")
    task = catalog.spec(config.dataset).task
    # The study's own numbers and config.train's; the method stages' through make_config below.
    check_ranges(config, [*SETTINGS, *(f"train.{k}" for k in train_lib.TrainConfig.RANGES)])
    mia = config.get("mia") or {}
    for key in ("loss_rf", "rmia", "rmia_held_out"):
        if not isinstance(mia.get(key, False), bool):
            raise ConfigError(f"config.mia.{key} must be True or False, got {mia.get(key)!r}")
    subsample = mia.get("subsample", "none")
    if subsample not in SUBSAMPLE_MODES:
        raise ConfigError(f"config.mia.subsample is {subsample!r}; expected one of "
                          f"{SUBSAMPLE_MODES}")
    point = mia.get("rmia_point", ())
    if point and (len(point) != 2 or point[0] not in rmia.GAMMAS or point[1] not in rmia.AS):
        raise ConfigError(f"config.mia.rmia_point is {point!r}; expected (gamma, a) with gamma "
                          f"in {rmia.GAMMAS} and a in {rmia.AS}, or () for no fixed point")
    if mia.get("rmia_variant", "reference") not in RMIA_VARIANTS:
        raise ConfigError(f"config.mia.rmia_variant is {mia.get('rmia_variant')!r}; expected "
                          f"one of {RMIA_VARIANTS}")
    if SECOND_ORACLE in config.stages and "retrain" not in config.stages:
        raise ConfigError(f"config.stages has {SECOND_ORACLE!r}, the second retrained model "
                          "whose ToW against the first is the noise floor of ToW, but not "
                          "'retrain': add it before")
    if mia.get("rmia", False) and "retrain" not in config.stages:
        raise ConfigError("config.mia.rmia needs the retrained model (the reference model of "
                          "pretrain and the start of every other reference model): add "
                          "'retrain' to config.stages")
    if not isinstance(config.get("wait_for_lock", True), bool):
        raise ConfigError("config.wait_for_lock must be True (wait for another process running "
                          f"a stage) or False (stop), got {config.wait_for_lock!r}")
    if not isinstance(config.get("tensorboard", False), bool):
        raise ConfigError("config.tensorboard must be True (training curves for "
                          "TensorBoard in <workdir>/tensorboard) or False, got "
                          f"{config.tensorboard!r}")
    try:
        vit.ViTConfig.preset(config.model.name, image_size=config.data.image_size)
    except ValueError as e:
        raise ConfigError(f"config.model: {e}") from None
    vit.check_init_scheme(config.model.get("init_scheme", "timm"))
    train = train_config(config, task)  # validates optimizer, dtype and attention
    return Settings(train, {name: method_config(config, name, task) for name in config.stages
                            if name not in TRAINING_STAGES})
