"""What each method call receives, built from its ACCESS (``unlearn/api.py``).

The study, not the method, decides what a method can read:

* ``train_data``: for ``prepare`` of a ``stats`` / ``full`` method. TRAIN images (the request's
  support images held out, as in pretraining) and VAL images, through a guarded source; no test
  images, no forget/retain labels of the real request;
* ``full_data``: for ``unlearn`` of a ``full`` method. The forget and retain images (and VAL);
* ``study_request``: the request of the study (its support images, eval transform, their labels
  and identities), the only thing a ``support`` / ``stats`` method's ``unlearn`` receives.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from oneshui_jax import sharding
from oneshui_jax.data import transforms
from oneshui_jax.unlearn import api


def _image_table(ann, identities) -> dict[int, list[int]]:
    table = ann.identity_to_images()
    return {int(i): list(table[int(i)]) for i in identities}


def train_data(ctx, checkpointer=None) -> api.TrainData:
    """TRAIN (minus the support images) and VAL, readable before the request."""
    ann, splits, images = ctx.dataset.annotations, ctx.splits, ctx.images
    allowed = np.concatenate([images["train"], images["val"]])
    identities = np.where(np.isin(ann.identities, splits.train), ann.identities, -1)
    forget = set(splits.forget)
    return api.TrainData(
        source=api.GuardedSource(ctx.dataset.source, allowed,
                                 "TRAIN images without the request's support, and VAL"),
        identity_images=_image_table(ann, splits.train), image_identities=identities,
        train_identities=tuple(splits.train),
        holdout_identities=tuple(i for i in splits.train if i not in forget),
        support_images=tuple(int(i) for i in splits.support), val_images=images["val"],
        image_size=ctx.config.data.image_size, seed=ctx.config.seed,
        progress=ctx.config.progress and sharding.is_primary(), checkpointer=checkpointer,
        crop_scale=tuple(ctx.config.data.crop_scale))


def selection_data(ctx) -> api.TrainData:
    """``train_data`` without the request's people: TRAIN identities outside the request and
    their images (support held out), and VAL. What hyper-parameter selection
    (``oneshui_jax.select``) may read: nothing of the people being forgotten."""
    ann, splits, images = ctx.dataset.annotations, ctx.splits, ctx.images
    forget = set(splits.forget)
    kept = [i for i in splits.train if i not in forget]
    own = np.isin(ann.identities, kept)
    allowed = np.concatenate([images["train"][own[images["train"]]], images["val"]])
    return api.TrainData(
        source=api.GuardedSource(ctx.dataset.source, allowed,
                                 "TRAIN images of the identities outside the request, and VAL"),
        identity_images=_image_table(ann, kept),
        image_identities=np.where(own, ann.identities, -1), train_identities=tuple(kept),
        holdout_identities=tuple(kept),
        support_images=tuple(int(i) for i in splits.support), val_images=images["val"],
        image_size=ctx.config.data.image_size, seed=ctx.config.seed,
        progress=ctx.config.progress and sharding.is_primary(),
        crop_scale=tuple(ctx.config.data.crop_scale))


def full_data(ctx) -> api.FullData:
    """The forget and retain sets (and VAL): what the reference's SCRUB / Bad Teacher read."""
    images = ctx.images
    allowed = np.concatenate([images["forget"], images["retain"], images["val"]])
    return api.FullData(
        source=api.GuardedSource(ctx.dataset.source, allowed, "forget, retain and VAL images"),
        forget_images=images["forget"], retain_images=images["retain"],
        val_images=images["val"], image_size=ctx.config.data.image_size, seed=ctx.config.seed,
        progress=ctx.config.progress and sharding.is_primary(),
        crop_scale=tuple(ctx.config.data.crop_scale))


def study_request(ctx) -> api.Request:
    """The study's deletion request: its support images (eval transform), labels, identities."""
    records = [ctx.dataset.source[int(i)] for i in ctx.splits.support]
    images = transforms.preprocess_eval([np.asarray(r["image"]) for r in records],
                                        ctx.config.data.image_size)
    labels = np.stack([np.asarray(r["label"]) for r in records])
    identities = tuple(int(ctx.dataset.annotations.identities[int(i)])
                       for i in ctx.splits.support)
    return api.Request(jnp.asarray(images), jnp.asarray(labels), identities)


def prepare_data(ctx, access: str, checkpointer=None) -> api.TrainData | None:
    """``prepare``'s ``data``: None for ``support`` methods, ``train_data`` otherwise."""
    return None if access == api.SUPPORT else train_data(ctx, checkpointer)


def unlearn_data(ctx, access: str) -> api.FullData | None:
    """``unlearn``'s ``data``: ``full_data`` for ``full`` methods, None otherwise."""
    return full_data(ctx) if access == api.FULL else None
