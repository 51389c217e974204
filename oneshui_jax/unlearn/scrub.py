"""scrub: SCRUB (Kurmanji et al., NeurIPS 2023), the reference's full-data baseline (SPEC.md 7.1).

A student starts from the pretrained parameters; the teacher is the pretrained model, frozen. With
``T`` = ``temperature`` (4) and the reference's ``DistillKL``::

    KL_T(s, t) = T² · (1/B) Σ_rows Σ_c q_c (log q_c − log p_c),   q = softmax(t/T), p = softmax(s/T)

(``F.kl_div(log_softmax(s/T), softmax(t/T), size_average=False) · T² / B``, B the rows of the
batch), ``epochs`` (10) epochs of::

    if epoch < forgetting_epochs:                       (the gate; Q24: 0 for CelebA N=20, 50)
        for each forget batch (batch_size):   max-step  loss = −KL_T(student, teacher)
                                              global gradient-norm clipping at 1.0
    for each retain batch (batch_size_retain): min-step loss = α KL_T + γ task_loss(student, y)
                                              no clipping

in that order within an epoch (all max-steps of the epoch, then all min-steps), α = ``alpha``
(``alpha_scrub``, 0.001), γ = ``gamma`` (``gamma_scrub``, 0.99), the task loss the model's own
(BCE-with-logits mean over rows x labels, or cross-entropy mean over rows). One optimiser for both
kinds of step (its momentum carries over from max- to min-steps, as the reference's single
``SGD``): torch's SGD, momentum 0.9, weight decay 5e-4 added to the (clipped) gradient
(``optim.sgd``); epoch ``e`` runs at ``lr (1 + cos(π e / epochs)) / 2`` (``CosineAnnealingLR``
stepped per epoch, ``optim.epoch_cosine``). Clipping is torch's ``clip_grad_norm_``: every
gradient scaled by ``min(1, 1.0 / (‖g‖₂ + 1e-6))``, ``‖g‖₂`` over all parameters together. The
student starts equal to the teacher, so the very first max-step has KL 0 and a zero gradient
(only weight decay moves it), as in the reference.

Q20: the softmax and KL run over the independent multi-label logits as if they were one
categorical distribution (``kl="softmax"``, faithful, the default). ``kl="bernoulli"`` is the fix
for multi-label tasks: per label, the KL between the Bernoulli distributions σ(t/T) and σ(s/T),
summed over labels, otherwise the same (rows, ``T²``, 1/B).

Data (``get_unlearning_data(train=use_train_aug)``): the forget set's and the retain set's images,
reshuffled every epoch, with the training augmentation (RandomResizedCrop + flip) when
``use_train_aug`` and the eval transform otherwise. The reference's loaders keep the last, short
batch (``drop_last=False``); here it is padded and masked, and every loss divides by the batch's
*valid* rows, so it equals the reference's short-batch value. A set smaller than its batch size
runs in batches of its own size.

Where the SPEC is silent, this port chooses:

* batch order: a fresh permutation per epoch of each set, from ``data.seed`` (the forget and
  retain streams from two independent seeds derived from it), where the reference draws from
  torch's generator (``rng`` is unused);
* the training augmentation's crop area range is the study's (``FullData.crop_scale``, the
  reference's (0.08, 1) in the paper's configs);
* the forward passes of student and teacher run in ``compute_dtype`` (bfloat16, the reference's
  autocast), the losses in float32; the GradScaler of the reference only guards float16 and is
  omitted (it does not change a bfloat16 step);
* the reference validates (prints retain / forget / VAL loss and mAP) after every epoch; that
  changes nothing it returns and is skipped here (the study evaluates the result).

``info``: per epoch the learning rate, the mean over max-steps of ``KL_T`` on forget batches
(before each step) and of its pre-clipping gradient norm, and the mean over min-steps of their
loss; the numbers of max- and min-steps. ACCESS ``full``: a full-data reference, not servable.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import os
from collections.abc import Iterator, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm.auto import tqdm

from oneshui_jax import interrupts, losses, optim, sharding
from oneshui_jax.data import pipeline
from oneshui_jax.errors import METHOD_KEPT, ConfigError, check_finite
from oneshui_jax.unlearn import api

ACCESS = api.FULL
TASKS = ("multilabel", "classification")
KL_KINDS = ("softmax", "bernoulli")
COMPUTE_DTYPES = ("bfloat16", "float32")
MAX_GRAD_NORM = 1.0  # clip_grad_norm_(1.0) on the max-steps (hard-coded in the reference)
CLIP_EPS = 1e-6  # torch's clip_grad_norm_: max_norm / (total_norm + 1e-6)

Params = Any
Batch = Mapping[str, Any]  # image [B, S, S, 3], label [B, C] or [B], mask bool [B], index [B]


# The ranges of the numeric settings SCRUB and Bad Teacher share (api.check_ranges).
COMMON_RANGES = {"epochs": api.COUNT, "lr": api.NON_NEGATIVE, "momentum": api.MOMENTUM,
                 "weight_decay": api.NON_NEGATIVE, "batch_size": api.COUNT}


def check_common(method: str, cfg: Any) -> None:
    """ConfigErrors naming ``config.<method>.<field>`` for the settings SCRUB and Bad Teacher
    share (task, kl, compute_dtype), then every range of ``cfg.RANGES``."""
    where = f"config.{method}"
    for name, allowed in (("task", TASKS), ("kl", KL_KINDS), ("compute_dtype", COMPUTE_DTYPES)):
        if getattr(cfg, name) not in allowed:
            raise ConfigError(f"{where}.{name} must be one of {allowed}, got "
                              f"{getattr(cfg, name)!r}")
    if cfg.kl == "bernoulli" and cfg.task != "multilabel":
        raise ConfigError(f"{where}.kl='bernoulli' is the per-label KL of multi-label tasks; a "
                          f"{cfg.task} model's softmax is already its distribution (use "
                          f"'softmax')")
    api.check_ranges(cfg, where)


@dataclasses.dataclass(frozen=True)
class Config:
    """SCRUB's settings: the study's ``config.scrub`` block (reference names in metadata).

    Defaults are the reference's values for a (dataset, N) it never tuned (SPEC Q24): lr 0.1,
    augmentation on and no max-step at all; the real-data configs fill in the tuned values.
    """

    task: str = dataclasses.field(default="multilabel", metadata={"bound": "task"})
    epochs: int = 10
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    batch_size: int = 32  # forget batches (max-steps)
    batch_size_retain: int = 32  # retain batches (min-steps)
    # Epochs (the first ones) that start with max-steps over the forget set.
    forgetting_epochs: int = 0
    # α: weight of the KL term of the min-step.
    alpha: float = dataclasses.field(default=0.001, metadata={"reference": "alpha_scrub"})
    # γ: weight of the task loss of the min-step.
    gamma: float = dataclasses.field(default=0.99, metadata={"reference": "gamma_scrub"})
    temperature: float = dataclasses.field(default=4.0,
                                           metadata={"reference": "temperature_scrub"})
    use_train_aug: bool = True  # training augmentation on forget and retain images
    # "softmax": one categorical over the multi-label logits (Q20, faithful); "bernoulli": fix.
    kl: str = "softmax"
    compute_dtype: str = "bfloat16"  # forward passes (the reference's autocast)

    RANGES = {**COMMON_RANGES, "batch_size_retain": api.COUNT,
              "forgetting_epochs": api.COUNT_OR_ZERO, "alpha": api.NON_NEGATIVE,
              "gamma": api.NON_NEGATIVE, "temperature": api.POSITIVE}

    def __post_init__(self):
        check_common("scrub", self)


# ---------------------------------------------------------------------------------------------
# KL divergences (Q20)


def teacher_probs(kind: str, logits: jax.Array) -> jax.Array:
    """The teacher's distribution: ``softmax`` over the logits (one categorical, Q20) or, for
    ``bernoulli``, the per-label probabilities ``σ(logits)``. Float32."""
    logits = logits.astype(jnp.float32)
    return jax.nn.softmax(logits, axis=-1) if kind == "softmax" else jax.nn.sigmoid(logits)


def kl_rows(kind: str, q: jax.Array, student_logits: jax.Array) -> jax.Array:
    """``KL(q ‖ student)`` per row [B], summed over classes (``F.kl_div``'s elementwise
    ``q (log q − log p)``, 0 where ``q`` = 0).

    ``softmax``: ``p = softmax(student_logits)``; ``bernoulli``: ``q`` and ``p = σ(logits)`` are
    per-label Bernoulli probabilities and each label adds ``KL(Ber(q) ‖ Ber(p))``.
    """
    s = student_logits.astype(jnp.float32)
    xlogy = jax.scipy.special.xlogy
    if kind == "softmax":
        return jnp.sum(xlogy(q, q) - q * jax.nn.log_softmax(s, axis=-1), axis=-1)
    if kind != "bernoulli":
        raise ValueError(f"unknown kl {kind!r}; expected one of {KL_KINDS}")
    terms = (xlogy(q, q) - q * jax.nn.log_sigmoid(s)
             + xlogy(1.0 - q, 1.0 - q) - (1.0 - q) * jax.nn.log_sigmoid(-s))
    return jnp.sum(terms, axis=-1)


def batch_sum_mean(per_row: jax.Array, mask: jax.Array) -> jax.Array:
    """``Σ_valid rows / #valid rows``: the reference's ``size_average=False`` sum divided by the
    batch size (``batchmean``), padded rows excluded (0 without a valid row)."""
    return losses.masked_mean(per_row, mask)


def distill_kl(kind: str, student_logits: jax.Array, teacher_logits: jax.Array,
               temperature: float, mask: jax.Array) -> jax.Array:
    """The reference's ``DistillKL``: ``T² · Σ_rows KL(q_t/T ‖ p_s/T) / B`` over the valid rows."""
    t = jnp.float32(temperature)
    q = teacher_probs(kind, teacher_logits.astype(jnp.float32) / t)
    per_row = kl_rows(kind, q, student_logits.astype(jnp.float32) / t)
    return batch_sum_mean(per_row, mask) * t * t


# ---------------------------------------------------------------------------------------------
# Losses and steps (pure; ``_steps`` jit-compiles them per model and Config)


def forget_loss(model: api.Model, cfg: Config, params: Params, teacher: Params,
                batch: Batch) -> jax.Array:
    """The max-step loss ``−KL_T(student, teacher)`` on a forget batch."""
    s = model.logits(params, batch["image"], cfg.compute_dtype)
    t = jax.lax.stop_gradient(model.logits(teacher, batch["image"], cfg.compute_dtype))
    return -distill_kl(cfg.kl, s, t, cfg.temperature, batch["mask"])


def retain_loss(model: api.Model, cfg: Config, params: Params, teacher: Params,
                batch: Batch) -> jax.Array:
    """The min-step loss ``α KL_T(student, teacher) + γ task_loss(student, y)`` on a retain
    batch."""
    s = model.logits(params, batch["image"], cfg.compute_dtype)
    t = jax.lax.stop_gradient(model.logits(teacher, batch["image"], cfg.compute_dtype))
    kl = distill_kl(cfg.kl, s, t, cfg.temperature, batch["mask"])
    task = losses.task_loss(cfg.task, s, batch["label"], batch["mask"])
    return jnp.float32(cfg.alpha) * kl + jnp.float32(cfg.gamma) * task


def clip_grad_norm(grads: Params, max_norm: float) -> tuple[Params, jax.Array]:
    """torch's ``clip_grad_norm_``: ``g · min(1, max_norm / (‖g‖₂ + 1e-6))``; returns the clipped
    gradients and ``‖g‖₂`` before clipping."""
    norm = optax.global_norm(grads)
    coef = jnp.minimum(1.0, jnp.float32(max_norm) / (norm + CLIP_EPS))
    return jax.tree.map(lambda g: (g * coef).astype(g.dtype), grads), norm


def sgd_apply(params: Params, opt_state: Any, grads: Params, lr: jax.Array,
              weight_decay: float, momentum: float) -> tuple[Params, Any]:
    """One step of torch's SGD (``optim.sgd``: decay added to the gradient, then momentum):
    ``θ − lr · update``."""
    updates, opt_state = optim.sgd(weight_decay, momentum).update(grads, opt_state, params)
    return jax.tree.map(lambda p, u: p - lr.astype(p.dtype) * u, params, updates), opt_state


def max_step(model: api.Model, cfg: Config, params: Params, opt_state: Any, teacher: Params,
             batch: Batch, lr: jax.Array):
    """A max-step: gradient of ``−KL_T`` on a forget batch, clipped to norm 1.0, one SGD step.
    Returns ``(params, opt_state, KL_T before the step, gradient norm before clipping)``."""
    loss, grads = jax.value_and_grad(functools.partial(forget_loss, model, cfg))(
        params, teacher, batch)
    grads, norm = clip_grad_norm(grads, MAX_GRAD_NORM)
    params, opt_state = sgd_apply(params, opt_state, grads, lr, cfg.weight_decay, cfg.momentum)
    return params, opt_state, -loss, norm


def min_step(model: api.Model, cfg: Config, params: Params, opt_state: Any, teacher: Params,
             batch: Batch, lr: jax.Array):
    """A min-step: gradient of ``α KL_T + γ task_loss`` on a retain batch, one SGD step, no
    clipping. Returns ``(params, opt_state, loss before the step)``."""
    loss, grads = jax.value_and_grad(functools.partial(retain_loss, model, cfg))(
        params, teacher, batch)
    params, opt_state = sgd_apply(params, opt_state, grads, lr, cfg.weight_decay, cfg.momentum)
    return params, opt_state, loss


LOOP_FIELDS = ("epochs", "lr", "batch_size", "batch_size_retain", "forgetting_epochs",
               "use_train_aug")  # settings of the loop, not of a step


def step_config(cfg: Any, loop_fields: tuple[str, ...] = LOOP_FIELDS) -> Any:
    """``cfg`` with the loop's settings at their defaults: the cache key of the compiled steps
    (another lr, epoch count or batch size does not recompile them)."""
    defaults = type(cfg)()
    return dataclasses.replace(cfg, **{f: getattr(defaults, f) for f in loop_fields
                                       if hasattr(defaults, f)})


@functools.lru_cache(maxsize=16)
def _steps(model: api.Model, cfg: Config):
    """``(max_step, min_step)`` jit-compiled for one model and ``step_config`` (the student and
    the optimiser state are donated)."""
    return (jax.jit(functools.partial(max_step, model, cfg), donate_argnums=(0, 1)),
            jax.jit(functools.partial(min_step, model, cfg), donate_argnums=(0, 1)))


# ---------------------------------------------------------------------------------------------
# Data


def stream_seed(seed: int, stream: int) -> int:
    """An independent pipeline seed for stream ``stream`` of a method run with ``seed``."""
    return int(np.random.SeedSequence([int(seed), int(stream)]).generate_state(1)[0] >> 1)


def epoch_batches(data: api.FullData, indices: np.ndarray, batch_size: int, augment: bool,
                  num_epochs: int, seed: int) -> Iterator[Iterator[Batch]]:
    """For each of ``num_epochs`` epochs, an iterator over that epoch's batches of ``indices``
    (consume each before asking for the next).

    Reshuffled every epoch; training augmentation (``pipeline.train_dataset``) when ``augment``,
    else the eval transform in a permutation drawn from ``(seed, epoch)``. Batches of
    ``min(batch_size, len(indices))`` rows, the last padded and masked; images are read only
    through ``data.source``.
    """
    indices = np.asarray(indices, np.int64)
    if num_epochs <= 0 or indices.size == 0:
        return
    rows = min(batch_size, indices.size)
    pcfg = pipeline.PipelineConfig(
        image_size=data.image_size, batch_size=rows, seed=seed,
        crop_scale=tuple(data.crop_scale),
        num_threads=min(8, os.cpu_count() or 1))
    steps = pipeline.steps_per_epoch(indices.size, rows)
    if augment:
        batches = pipeline.to_iterator(
            pipeline.train_dataset(data.source, indices, pcfg, num_epochs), pcfg)
        for _ in range(num_epochs):
            yield itertools.islice(batches, steps)
    else:
        for epoch in range(num_epochs):
            order = np.random.default_rng([seed, epoch]).permutation(indices.size)
            yield pipeline.eval_batches(data.source, indices[order], pcfg)


def device_batch(batch: Batch, keys=("image", "label", "mask")) -> dict[str, jax.Array]:
    """The arrays a step reads, on the device (split over the mesh: ``sharding``)."""
    return sharding.shard_batch({k: np.asarray(batch[k]) for k in keys})


def mean_or_none(values: list) -> float | None:
    """The mean of a list of scalars (None when empty), for `info`."""
    return float(np.mean(jax.device_get(values))) if values else None


def diverged(record: dict, method: str, epoch: int, cfg) -> None:
    """``TrainingDiverged`` when a number of the epoch's ``record`` (its mean losses, KL, norm)
    is NaN or infinite: the method stops at the end of that epoch (SCRUB, Bad Teacher)."""
    check_finite({k: v for k, v in record.items() if k not in ("epoch", "lr")
                  and isinstance(v, float)}, where=method,
                 when=f"epoch {epoch} (epochs 0-{cfg.epochs - 1})", kept=METHOD_KEPT,
                 advice=f"Lower config.{method}.lr ({cfg.lr:g}) or check the data")


# ---------------------------------------------------------------------------------------------
# The method


def unlearn(model: api.Model, params: Params, artifacts: api.Artifacts, request: api.Request,
            cfg: Config, rng: jax.Array, data: api.FullData | None = None
            ) -> tuple[Params, dict[str, Any]]:
    """SCRUB on the forget and retain sets of ``data`` (module docstring); the request's
    portraits are not used (the reference's SCRUB does not read them)."""
    del artifacts, request, rng
    if data is None:
        raise ValueError("scrub reads the forget and retain sets (ACCESS full): data is None")
    max_fn, min_fn = _steps(model, step_config(cfg))
    teacher = params
    student = jax.tree.map(jnp.copy, params)  # donated to the steps; the caller keeps params
    opt_state = optim.sgd(cfg.weight_decay, cfg.momentum).init(student)
    forgetting = min(cfg.forgetting_epochs, cfg.epochs)
    forget = np.asarray(data.forget_images, np.int64)
    retain = np.asarray(data.retain_images, np.int64)
    forget_epochs = epoch_batches(data, forget, cfg.batch_size, cfg.use_train_aug, forgetting,
                                  stream_seed(data.seed, 0))
    retain_epochs = epoch_batches(data, retain, cfg.batch_size_retain, cfg.use_train_aug,
                                  cfg.epochs, stream_seed(data.seed, 1))
    per_forget = pipeline.steps_per_epoch(forget.size, min(cfg.batch_size, max(forget.size, 1)))
    per_retain = pipeline.steps_per_epoch(retain.size,
                                          min(cfg.batch_size_retain, max(retain.size, 1)))
    total = per_forget * forgetting * (forget.size > 0) + per_retain * cfg.epochs * (
        retain.size > 0)
    history, max_steps, min_steps = [], 0, 0
    with tqdm(total=total, desc="scrub", unit="step", disable=not data.progress,
              leave=False) as bar:
        for epoch in range(cfg.epochs):
            lr = jnp.float32(optim.epoch_cosine(cfg.lr, epoch, cfg.epochs))
            kls, norms, retain_losses = [], [], []
            if epoch < cfg.forgetting_epochs:
                for batch in next(forget_epochs, ()):
                    interrupts.check()
                    student, opt_state, kl, norm = max_fn(student, opt_state, teacher,
                                                          device_batch(batch), lr)
                    kls.append(kl)
                    norms.append(norm)
                    max_steps += 1
                    bar.update()
            for batch in next(retain_epochs, ()):
                interrupts.check()
                student, opt_state, loss = min_fn(student, opt_state, teacher,
                                                  device_batch(batch), lr)
                retain_losses.append(loss)
                min_steps += 1
                bar.update()
            history.append({"epoch": epoch, "lr": float(lr), "max_steps": len(kls),
                            "forget_kl": mean_or_none(kls), "grad_norm": mean_or_none(norms),
                            "min_steps": len(retain_losses),
                            "retain_loss": mean_or_none(retain_losses)})
            diverged(history[-1], "scrub", epoch, cfg)
    info = {"max_steps": max_steps, "min_steps": min_steps, "forget_images": int(forget.size),
            "retain_images": int(retain.size), "kl": cfg.kl, "history": history}
    return student, info
