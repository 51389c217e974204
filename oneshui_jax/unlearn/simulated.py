"""Batches of simulated deletion requests, read from the data a method may see before a request.

MetaUnlearn meta-trains on simulated requests (SPEC.md 6.4: ``splits.simulated_requests``) and
``support_ascent`` selects its step length on them. One request becomes, as in the reference's
``meta_unlearn.py:train_loss``:

* ``support``: one image per requested identity, eval transform, with its meta-loss embedding
  row, padded to the request size;
* ``forget``: the request's other images, shuffled, in outer batches of ``batch_size``;
* ``val``: as many batches from a shuffled pass over VAL (one per forget batch);
* ``retain`` (optional): as many batches of the other TRAIN identities' images.

Batches are stacked ``[K, B, ...]``, padded and masked, so every outer batch has one shape. With
``num_batches`` the stacks are padded further, with fully masked batches, to that many outer
batches: every request of a stage then has one shape, and the meta-step compiles once (the
padded batches weigh 0 and are skipped: ``meta_unlearn.core.meta_gradient``).
Everything is read through ``api.TrainData``'s guarded source.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from oneshui_jax.data import pipeline
from oneshui_jax.splits import SimulatedRequest
from oneshui_jax.unlearn import api

Batch = dict[str, jax.Array]


def load_batches(source, indices: np.ndarray, pcfg: pipeline.PipelineConfig,
                 rows: dict[int, int] | None = None, train: bool = False,
                 num_batches: int | None = None) -> Batch:
    """Images of ``indices`` (in this order) as stacked batches [K, B, ...], padded and masked.

    ``train`` uses the training augmentation; ``rows`` adds each image's embedding row.
    """
    if train:
        ds = pipeline.train_dataset(source, indices, pcfg, num_epochs=1)
    else:
        ds = pipeline.eval_dataset(source, indices, pcfg)
    count = len(ds) if num_batches is None else min(num_batches, len(ds))
    batches = [ds[k] for k in range(count)]
    out = {key: np.stack([b[key] for b in batches]) for key in ("image", "label", "mask")}
    if rows is not None:
        identities = np.stack([b["identity"] for b in batches])
        out["row"] = np.vectorize(lambda i: rows.get(int(i), 0))(identities).astype(np.int32)
    return jax.tree.map(jnp.asarray, out)


def outer_batches(num_images: int, batch_size: int) -> int:
    """``K``: the outer batches of a request whose forget set has ``num_images`` images."""
    return -(-num_images // batch_size)


def pad_batches(batches: Batch, num_batches: int, repeat_last: bool = False) -> Batch:
    """Stacked batches [K, B, ...] padded to ``num_batches``: with zero, fully masked batches,
    or (``repeat_last``) with copies of the last batch.

    The forget stack takes masked batches (they weigh 0 and are skipped). The val and retain
    stacks take copies of their last batch: a request whose forget set has more batches than
    VAL (or the retain set) gives, batch ``k``, the stack's batch ``min(k, K - 1)``, which is
    what indexing the unpadded stack inside the compiled step gives (JAX clamps the index).
    """
    have = batches["mask"].shape[0]
    if have > num_batches:
        raise ValueError(f"a request with {have} outer batches does not fit num_batches="
                         f"{num_batches}")
    if have == num_batches:
        return batches

    def pad(x):
        extra = (jnp.repeat(x[-1:], num_batches - have, axis=0) if repeat_last
                 else jnp.zeros((num_batches - have, *x.shape[1:]), x.dtype))
        return jnp.concatenate([x, extra])

    return jax.tree.map(pad, batches)


def support_batch(source, indices, image_size: int, rows: dict[int, int],
                  size: int | None = None) -> Batch:
    """The support images as one batch (eval transform), padded to ``size`` if given."""
    pcfg = pipeline.PipelineConfig(image_size=image_size,
                                   batch_size=max(size or len(indices), len(indices)))
    return jax.tree.map(lambda x: x[0], load_batches(source, np.asarray(indices), pcfg, rows))


def request_batches(data: api.TrainData, request: SimulatedRequest, *, batch_size: int,
                    support_size: int, rows: dict[int, int], rng: np.random.Generator,
                    retain: bool = False, retain_train_aug: bool = True,
                    num_batches: int | None = None
                    ) -> tuple[Batch, Batch, Batch, Batch | None]:
    """``(support, forget, val, retain or None)`` of one simulated request (module docstring);
    ``num_batches``: the outer batches padded to that many."""
    source, size = data.source, data.image_size
    pcfg = pipeline.PipelineConfig(image_size=size, batch_size=batch_size,
                                   seed=int(rng.integers(2**31)))
    support = support_batch(source, request.support, size, rows, size=support_size)
    forget = load_batches(source, rng.permutation(np.asarray(request.forget)), pcfg)
    num = forget["mask"].shape[0]
    val = load_batches(source, rng.permutation(data.val_images), pcfg, num_batches=num)
    retain_batches = None
    if retain:
        retain_idx = data.retain_images(request)
        retain_batches = load_batches(source, rng.permutation(retain_idx), pcfg,
                                      train=retain_train_aug, num_batches=num)
    if num_batches is not None:
        forget = pad_batches(forget, num_batches)
        val = pad_batches(val, num_batches, repeat_last=True)
        if retain_batches is not None:
            retain_batches = pad_batches(retain_batches, num_batches, repeat_last=True)
    return support, forget, val, retain_batches
