"""Every setting of a study checked before any data is read or any stage runs.

``validate_config`` rejects unknown stages, the training settings, the model and every method's
``Config`` (``unlearn/api.make_config``), so ``--config.meta_unlearn.loss_type=bogus`` fails in
the first second with one line naming the setting, not after pretraining and retraining.
"""

from __future__ import annotations

from oneshui_jax import train as train_lib
from oneshui_jax.data import catalog
from oneshui_jax.errors import ConfigError
from oneshui_jax.models import vit
from oneshui_jax.unlearn import api, registry

TRAINING_STAGES = {"pretrain": "train", "retrain": "retain"}  # stage -> identities it fits


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


def validate_config(config) -> None:
    """One ConfigError for the first thing that would fail later; nothing is read or written."""
    unknown = [s for s in config.stages
               if s not in TRAINING_STAGES and not registry.is_method(config, s)]
    if unknown:
        raise ConfigError(f"config.stages has unknown stages {unknown}; available: "
                          f"{list(TRAINING_STAGES) + sorted(registry.METHODS)}, or a variant "
                          f"(a block config.<name> with {registry.VARIANT_KEY}=<method>)")
    if len(set(config.stages)) != len(config.stages):
        raise ConfigError(f"config.stages lists a stage twice: {tuple(config.stages)}")
    task = catalog.spec(config.dataset).task
    if config.num_identities < 1:
        raise ConfigError(f"config.num_identities must be >= 1, got {config.num_identities}")
    if config.train.epochs < 1 or config.train.batch_size < 1:
        raise ConfigError("config.train.epochs and config.train.batch_size must be >= 1")
    data = (config.get("mesh") or {}).get("data", -1)
    if isinstance(data, bool) or not isinstance(data, int) or not (data == -1 or data >= 1):
        raise ConfigError(f"config.mesh.data must be -1 (every device) or a number of devices "
                          f">= 1, got {data!r}")
    value = config.get("split_seed")
    if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                              or value < 0):
        raise ConfigError(f"config.split_seed must be a seed (an int >= 0) or None (the split "
                          f"follows config.seed), got {value!r}")
    mia = config.get("mia") or {}
    for key in ("loss_rf", "rmia"):
        if not isinstance(mia.get(key, False), bool):
            raise ConfigError(f"config.mia.{key} must be True or False, got {mia.get(key)!r}")
    from oneshui_jax.study.privacy import SUBSAMPLE_MODES, VARIANTS

    subsample = mia.get("subsample", "none")
    if subsample not in SUBSAMPLE_MODES:
        raise ConfigError(f"config.mia.subsample is {subsample!r}; expected one of "
                          f"{SUBSAMPLE_MODES}")
    sizes = ("subsample_z", "subsample_val") if subsample != "none" else ()
    for key in ("passes", "batch_size", *sizes):
        value = mia.get(key, 1)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"config.mia.{key} must be an int >= 1, got {value!r}")
    cache_mb = mia.get("cache_mb", 0)
    if isinstance(cache_mb, bool) or not isinstance(cache_mb, (int, float)) or not cache_mb >= 0:
        raise ConfigError(f"config.mia.cache_mb must be a number of MB >= 0, got {cache_mb!r}")
    if mia.get("passes", 1) > 255:
        raise ConfigError(f"config.mia.passes must be at most 255 (votes are counted in uint8), "
                          f"got {mia.get('passes')}")
    if mia.get("rmia_variant", "reference") not in VARIANTS:
        raise ConfigError(f"config.mia.rmia_variant is {mia.get('rmia_variant')!r}; expected "
                          f"one of {VARIANTS}")
    if mia.get("rmia", False) and "retrain" not in config.stages:
        raise ConfigError("config.mia.rmia needs the retrained model (the reference model of "
                          "pretrain and the start of every other reference model): add "
                          "'retrain' to config.stages")
    every = config.get("checkpoint_every_s", 0.0)
    if isinstance(every, bool) or not isinstance(every, (int, float)) or not every >= 0:
        raise ConfigError(f"config.checkpoint_every_s must be a number of seconds >= 0, got "
                          f"{every!r}")
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
    train_config(config, task)  # validates optimizer, dtype and attention
    for name in config.stages:
        if name not in TRAINING_STAGES:
            method_config(config, name, task)
