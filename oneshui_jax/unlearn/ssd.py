"""ssd: Selective Synaptic Dampening (Foster et al., AAAI 2024), a paper baseline (SPEC.md 7.3).

SSD dampens the parameters that matter much more to the data being forgotten than to the training
data. Importances are diagonal Fisher estimates: the squared gradient of a batch's mean task loss
(BCE-with-logits over rows x labels, or cross-entropy; float32, no dropout, the eval transform),
summed over batches and divided by the number of batches (``calc_importance``)::

    I(batches) = (1/K) Σ_k (∇_θ L_task(θ; batch_k))²          (elementwise)

* ``prepare`` (before the request): ``I_D`` on the TRAIN images (every TRAIN identity, the
  forgotten people included, minus the request's support images: the reference's
  ``get_train_data(train=False)``), in batches of ``batch_size`` (128). Saved as the artifact
  ``train_importance``, a params-shaped tree;
* ``unlearn`` (the request): ``I_f`` on the support images (the portraits, batches of
  ``batch_size``), then for every parameter element, as ``modify_weight``::

      mask = I_f > α · I_D          α = selection_weighting (ssd_selection_weighting)
      β    = min(λ · I_D / I_f, 1)  λ = dampening_constant (ssd_dampening_constant)
      θ[mask] *= β[mask]

  over every parameter (the reference iterates ``named_parameters``: biases, LayerNorms,
  embeddings and the head included).

Batch order. The reference's loaders are shuffled (``shuffle=True``, ``drop_last=False``); since a
batch enters through the square of its mean loss's gradient, ``I`` depends on which images share a
batch (not on the order of the batches). Here the TRAIN images (dataset index order, as
``get_data``) are permuted by ``np.random.default_rng(data.seed)``, so ``prepare`` is a
deterministic function of the study's seed; torch's stream cannot be replayed, so the batches
differ from the reference's own draw (an equally likely one). The portraits are taken in the
request's order, which the reference's split already draws at random. The last, partial batch is
padded and masked (its loss is the mean over its valid rows, so padding contributes nothing) and
counts as one batch, as ``len(loader)`` does.

ACCESS ``stats``: the request plus importances computed from TRAIN images before it (SPEC.md 7:
"support + training importances"); at request time only the portraits are read.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Iterable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from oneshui_jax import interrupts, losses, sharding
from oneshui_jax.data import pipeline
from oneshui_jax.errors import ConfigError
from oneshui_jax.unlearn import api

ACCESS = api.STATS
TASKS = ("multilabel", "classification")
DTYPES = ("float32", "bfloat16", "float64")

Params = Any
Batch = Mapping[str, Any]  # image [B, S, S, 3], label [B, C] or [B], mask bool [B]


@dataclasses.dataclass(frozen=True)
class Config:
    """SSD's settings: the study's ``config.ssd`` block (defaults: the reference's ``Const``)."""

    task: str = dataclasses.field(default="multilabel", metadata={"bound": "task"})
    batch_size: int = 128  # importance batches (TRAIN and support), the reference's loaders
    # λ: the dampening factor is min(λ I_D / I_f, 1).
    dampening_constant: float = dataclasses.field(
        default=0.1, metadata={"reference": "ssd_dampening_constant"})
    # α: a parameter is dampened where I_f > α I_D.
    selection_weighting: float = dataclasses.field(
        default=0.1, metadata={"reference": "ssd_selection_weighting"})
    compute_dtype: str = "float32"  # importance passes; the reference runs them in fp32 (Q2)

    RANGES = {"batch_size": api.COUNT, "dampening_constant": api.NON_NEGATIVE,
              "selection_weighting": api.NON_NEGATIVE}  # api.check_ranges

    def __post_init__(self):
        for name, allowed in (("task", TASKS), ("compute_dtype", DTYPES)):
            if getattr(self, name) not in allowed:
                raise ConfigError(f"config.ssd.{name} must be one of {allowed}, got "
                                  f"{getattr(self, name)!r}")
        api.check_ranges(self, "config.ssd")


# ---------------------------------------------------------------------------------------------
# Pure functions


def batch_gradient(model: api.Model, task: str, dtype: str, params: Params,
                   batch: Batch) -> Params:
    """``∇_θ`` of the mean task loss over the valid rows of ``batch`` (``dtype`` compute)."""

    def loss(p):
        logits = model.logits(p, batch["image"], dtype)
        return losses.task_loss(task, logits, batch["label"], batch["mask"])

    return jax.grad(loss)(params)


def accumulate(model: api.Model, task: str, dtype: str, params: Params, total: Params,
               batch: Batch) -> Params:
    """``total + (∇_θ L_task(θ; batch))²``, elementwise, in float32: one step of
    ``calc_importance``."""
    grads = batch_gradient(model, task, dtype, params, batch)
    return jax.tree.map(lambda t, g: t + jnp.square(g.astype(jnp.float32)), total, grads)


def dampen(params: Params, train_importance: Params, forget_importance: Params,
           dampening_constant: jax.Array, selection_weighting: jax.Array
           ) -> tuple[Params, Params]:
    """``modify_weight``: ``θ[mask] *= min(λ I_D / I_f, 1)[mask]`` with ``mask = I_f > α I_D``.

    Returns the new parameters and, per parameter, how many of its elements were dampened.
    """

    def select(i_d, i_f):
        return i_f.astype(jnp.float32) > selection_weighting * i_d.astype(jnp.float32)

    def one(p, i_d, i_f):
        i_d, i_f = i_d.astype(jnp.float32), i_f.astype(jnp.float32)
        mask = select(i_d, i_f)
        # Where mask holds, I_f > α I_D >= 0; elsewhere β is unused (the 1 avoids 0/0).
        beta = jnp.minimum((i_d * dampening_constant) / jnp.where(mask, i_f, 1.0), 1.0)
        return jnp.where(mask, p * beta.astype(p.dtype), p)

    new = jax.tree.map(one, params, train_importance, forget_importance)
    counts = jax.tree.map(lambda i_d, i_f: jnp.sum(select(i_d, i_f), dtype=jnp.int32),
                          train_importance, forget_importance)
    return new, counts


@functools.lru_cache(maxsize=16)
def _accumulate_step(model: api.Model, task: str, dtype: str):
    return jax.jit(functools.partial(accumulate, model, task, dtype), donate_argnums=(1,))


_dampen_step = jax.jit(dampen)


def importances(model: api.Model, params: Params, batches: Iterable[Batch], cfg: Config, *,
                desc: str = "ssd: importances", total: int | None = None,
                progress: bool = False) -> tuple[Params, int]:
    """``calc_importance``: the mean over ``batches`` of the squared batch-loss gradients.

    Batches must share one shape (pad and mask the last one): the step compiles once. Returns
    the params-shaped float32 importances and the number of batches; ValueError without any.
    """
    step = _accumulate_step(model, cfg.task, cfg.compute_dtype)
    acc = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)
    count = 0
    for batch in tqdm(batches, desc=desc, total=total, unit="batch", disable=not progress,
                      leave=False):
        interrupts.check()
        batch = sharding.shard_batch({k: np.asarray(batch[k]) for k in ("image", "label", "mask")})
        acc = step(params, acc, batch)
        count += 1
    if count == 0:
        raise ValueError("SSD importances need at least one batch")
    return jax.tree.map(lambda a: a / jnp.float32(count), acc), count


def train_order(data: api.TrainData) -> np.ndarray:
    """The TRAIN images minus the support images (``get_train_data``), permuted by
    ``data.seed`` (the reference shuffles its loader; module docstring)."""
    train = np.flatnonzero(np.asarray(data.image_identities) != -1)
    train = np.setdiff1d(train, np.asarray(data.support_images, np.int64))
    if train.size == 0:
        raise ValueError("SSD needs TRAIN images outside the support set; there are none")
    return train[np.random.default_rng(data.seed).permutation(train.size)]


# ---------------------------------------------------------------------------------------------
# The method


def prepare(model: api.Model, params: Params, data: api.TrainData, cfg: Config,
            rng: jax.Array) -> tuple[api.Artifacts, dict[str, Any]]:
    """``I_D`` over the TRAIN images minus the support images (eval transform).

    Artifacts: ``train_importance`` (params-shaped, float32). Info: how many images and batches.
    """
    del rng  # the batch order follows data.seed
    order = train_order(data)
    pcfg = pipeline.PipelineConfig(image_size=data.image_size, batch_size=cfg.batch_size,
                                   seed=data.seed)
    num = pipeline.steps_per_epoch(order.size, cfg.batch_size)
    train_importance, count = importances(
        model, params, pipeline.eval_batches(data.source, order, pcfg), cfg,
        desc="ssd: training importances", total=num, progress=data.progress)
    return ({"train_importance": train_importance},
            {"train_images": int(order.size), "train_batches": count})


def unlearn(model: api.Model, params: Params, artifacts: api.Artifacts, request: api.Request,
            cfg: Config, rng: jax.Array, data=None) -> tuple[Params, dict[str, Any]]:
    """``I_f`` on the portraits, then ``modify_weight`` with the ``I_D`` of ``prepare``.

    Info: ``dampened`` (elements scaled), ``dampened_fraction`` (of all parameter elements) and
    ``support_batches``.
    """
    del rng, data
    batches = api.request_batches(request, cfg.batch_size)
    forget_importance, count = importances(model, params, batches, cfg)
    new, counts = _dampen_step(params, artifacts["train_importance"], forget_importance,
                               jnp.float32(cfg.dampening_constant),
                               jnp.float32(cfg.selection_weighting))
    dampened = sum(int(c) for c in jax.tree.leaves(counts))
    size = sum(int(np.size(p)) for p in jax.tree.leaves(params))
    return new, {"dampened": dampened, "dampened_fraction": dampened / max(size, 1),
                 "support_batches": count}
