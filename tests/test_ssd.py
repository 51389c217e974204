"""SSD, Selective Synaptic Dampening (``unlearn/ssd.py``, SPEC.md 7.3), on a tiny ViT.

Expected values are computed here: per-batch gradients of a task loss written out in this file
(``jax.grad`` on the unpadded batch, no mask), squared and averaged in float64 numpy, and
``modify_weight``'s rule applied elementwise in numpy.
"""

import functools
import math

import doubles
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from oneshui_jax.errors import ConfigError
from oneshui_jax.models import vit
from oneshui_jax.unlearn import api, ssd

CFG = vit.ViTConfig(image_size=16, patch_size=8, width=16, depth=1, num_heads=2, num_classes=4)
C = CFG.num_classes


@pytest.fixture(scope="module")
def params():
    """Random parameters of the tiny ViT's shapes, no element zero (a zero hides a dampening);
    drawn in numpy (``vit.init_params`` runs op by op: seconds on CPU)."""
    rng = np.random.default_rng(0)
    shapes = jax.eval_shape(functools.partial(vit.init_params, CFG), jax.random.key(0))
    return jax.tree.map(lambda s: jnp.asarray(rng.normal(0, 0.3, s.shape), s.dtype), shapes)


@functools.cache
def _grad(task):
    """``∇_θ`` of the batch-mean task loss, written out: BCE over rows x labels, or CE."""

    def loss(p, images, labels):
        z = vit.apply(CFG, p, images)[0]
        if task == "multilabel":
            y = labels.astype(jnp.float32)
            return jnp.mean(jnp.maximum(z, 0) - z * y + jnp.log1p(jnp.exp(-jnp.abs(z))))
        log_p = z - jax.scipy.special.logsumexp(z, axis=-1, keepdims=True)
        return -jnp.mean(log_p[jnp.arange(z.shape[0]), labels])

    return jax.jit(jax.grad(loss))


def squared_gradients(task, params, batches):
    """Per batch, ``g_k²`` in float64 (one list of leaves per batch)."""
    return [[np.square(np.asarray(g, np.float64))
             for g in jax.tree.leaves(_grad(task)(params, jnp.asarray(im), jnp.asarray(lb)))]
            for im, lb in batches]


def numpy_importance(task, params, batches, weights=None):
    """``(1/K) Σ_k g_k²``, ``g_k`` the gradient of batch ``k``'s mean loss (or ``Σ w_k g_k²``)."""
    per_batch = squared_gradients(task, params, batches)
    weights = [1 / len(batches)] * len(batches) if weights is None else weights
    return [sum(w * sq[j] for w, sq in zip(weights, per_batch, strict=True))
            for j in range(len(per_batch[0]))]


def _data(rng, n, task):
    images = rng.uniform(-1, 1, (n, 16, 16, 3)).astype(np.float32)
    if task == "multilabel":
        labels = rng.integers(0, 2, (n, C)).astype(np.uint8)
    else:
        labels = rng.integers(0, C, n).astype(np.int32)
    return images, labels


def _close(got_leaves, want_leaves, rtol=2e-4):
    scale = max(float(np.max(w)) for w in want_leaves)
    for got, want in zip(got_leaves, want_leaves, strict=True):
        np.testing.assert_allclose(np.asarray(got, np.float64), want, rtol=rtol,
                                   atol=1e-6 * scale)


# ---------------------------------------------------------------------------------------------
# Importances


@pytest.mark.parametrize("task", ["multilabel", "classification"])
def test_importance_is_the_mean_squared_batch_gradient_and_padding_adds_nothing(params, task):
    rng = np.random.default_rng(1)
    images, labels = _data(rng, 10, task)
    garbage_images, garbage_labels = _data(rng, 2, task)  # padding rows: must count for nothing
    batches = []
    for start in (0, 4, 8):
        im, lb = images[start:start + 4], labels[start:start + 4]
        valid = len(im)
        if valid < 4:
            im = np.concatenate([im, garbage_images])
            lb = np.concatenate([lb, garbage_labels])
        batches.append({"image": im, "label": lb, "mask": np.arange(4) < valid})
    got, count = ssd.importances(api.Model(CFG, task), params, batches, ssd.Config(task=task))
    assert count == 3
    want = numpy_importance(task, params, [(images[0:4], labels[0:4]),
                                           (images[4:8], labels[4:8]),
                                           (images[8:10], labels[8:10])])
    _close(jax.tree.leaves(got), want)
    # Dividing by the number of batches, not images: a last batch of 2 weighs as one of 4.
    by_images = numpy_importance(task, params, [(images[0:4], labels[0:4]),
                                                (images[4:8], labels[4:8]),
                                                (images[8:10], labels[8:10])], [.4, .4, .2])
    assert not np.allclose(jax.tree.leaves(got)[-1], by_images[-1], rtol=1e-2)


def _threshold_in_a_gap(ratios):
    """A value between two neighbouring middle ratios with a clear gap (no ties in float32)."""
    r = np.sort(ratios[np.isfinite(ratios) & (ratios > 0)])
    lo, hi = int(0.3 * len(r)), int(0.7 * len(r))
    gaps = np.log(r[lo + 1:hi + 1]) - np.log(r[lo:hi])
    k = lo + int(np.argmax(gaps))
    assert gaps.max() > 2e-3
    return float(np.sqrt(r[k] * r[k + 1]))


def test_unlearn_dampens_where_support_importance_exceeds_alpha_times_train(params):
    model = api.Model(CFG, "multilabel")
    rng = np.random.default_rng(2)
    train_images, train_labels = _data(rng, 6, "multilabel")
    support_images, support_labels = _data(rng, 6, "multilabel")
    i_d = numpy_importance("multilabel", params, [(train_images[:4], train_labels[:4]),
                                                  (train_images[4:], train_labels[4:])])
    # batch_size 4: the portraits come in two batches, the second padded.
    i_f = numpy_importance("multilabel", params, [(support_images[:4], support_labels[:4]),
                                                  (support_images[4:], support_labels[4:])])
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.concatenate([(f / d).ravel() for f, d in zip(i_f, i_d, strict=True)])
    alpha = _threshold_in_a_gap(ratio)
    lam = alpha * float(np.median(ratio[ratio > alpha]))  # β < 1 and β = 1 both occur
    cfg = ssd.Config(batch_size=4, dampening_constant=lam, selection_weighting=alpha)

    template = jax.tree.structure(params)
    artifacts = {"train_importance": jax.tree.unflatten(
        template, [d.astype(np.float32) for d in i_d])}
    request = api.Request(jnp.asarray(support_images), jnp.asarray(support_labels),
                          (1, 2, 3, 4, 5, 6))
    new, info = ssd.unlearn(model, params, artifacts, request, cfg, jax.random.key(0))

    # Elements whose importances are float32 round-off (the key biases: softmax ignores them)
    # have no well-defined side of the threshold; every other element is checked.
    scale = max(float(np.max(f)) for f in i_f)
    dampened, size, loose, below_one, clipped = 0, 0, 0, 0, 0
    for got, theta, d, f in zip(jax.tree.leaves(new), jax.tree.leaves(params), i_d, i_f,
                                strict=True):
        theta = np.asarray(theta, np.float64)
        mask = f > alpha * d
        with np.errstate(divide="ignore", invalid="ignore"):
            beta = np.minimum(lam * d / f, 1.0)
        want = np.where(mask, theta * beta, theta)
        checked = np.maximum(f, alpha * d) > 1e-12 * scale
        np.testing.assert_allclose(np.asarray(got, np.float64)[checked], want[checked],
                                   rtol=1e-4, atol=1e-7)
        dampened += int(mask[checked].sum())
        size += mask.size
        loose += int((~checked).sum())
        below_one += int((mask & checked & (beta < 0.9)).sum())
        clipped += int((mask & checked & (beta == 1.0)).sum())
    assert loose < 0.05 * size
    assert 0 < dampened < size - loose and below_one > 0 and clipped > 0  # both sides, branches
    assert dampened <= info["dampened"] <= dampened + loose
    assert info["dampened_fraction"] == pytest.approx(info["dampened"] / size)
    assert info["support_batches"] == 2


# ---------------------------------------------------------------------------------------------
# prepare reads TRAIN minus support only, through the guarded source


def test_prepare_reads_train_minus_support_and_averages_its_batches(params):
    rng = np.random.default_rng(3)
    # identities 0-2 TRAIN (images 0-11), 3 VAL (12-13), 4 TEST (14-15); support images 2, 6.
    identity = np.array([0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 4, 4])
    records = [{"image": rng.integers(0, 256, (16, 16, 3), dtype=np.uint8),
                "label": rng.integers(0, 2, C).astype(np.uint8), "identity": int(i)}
               for i in identity]
    train = [0, 1, 3, 4, 5, 7, 8, 9, 10, 11]
    recording = doubles.Recording(records)
    data = api.TrainData(
        source=api.GuardedSource(recording, np.array(train + [12, 13]),
                                 "TRAIN images without the support, and VAL"),
        identity_images={0: [0, 1, 2, 3], 1: [4, 5, 6, 7], 2: [8, 9, 10, 11]},
        image_identities=np.where(identity <= 2, identity, -1), train_identities=(0, 1, 2),
        holdout_identities=(0, 2), support_images=(2, 6), val_images=np.array([12, 13]),
        image_size=16, seed=5)
    model = api.Model(CFG, "multilabel")
    artifacts, info = ssd.prepare(model, params, data, ssd.Config(batch_size=4), None)
    assert info == {"train_images": 10, "train_batches": 3}

    order = recording.read[:10]  # the pipeline reads its slots in order; padding rereads one
    assert sorted(order) == train and set(recording.read) == set(train)

    def batch(idx):
        images = np.stack([records[i]["image"] for i in idx]).astype(np.float32) * (2 / 255) - 1
        return images, np.stack([records[i]["label"] for i in idx])

    want = numpy_importance("multilabel", params,
                            [batch(order[0:4]), batch(order[4:8]), batch(order[8:10])])
    assert jax.tree.structure(artifacts["train_importance"]) == jax.tree.structure(params)
    _close(jax.tree.leaves(artifacts["train_importance"]), want)


# ---------------------------------------------------------------------------------------------
# The method's interface and config


def test_reference_values_and_validation():
    block, h = api.reference_block(ssd, "ssd", "celebahq", 5)
    assert h.tuned and (block.batch_size, block.dampening_constant,
                        block.selection_weighting) == (128, 0.1, 50.0)
    block, h = api.reference_block(ssd, "ssd", "mufac", 10)
    assert h.tuned and (block.batch_size, block.dampening_constant,
                        block.selection_weighting) == (128, 0.1, 1.0)
    cfg = api.make_config("ssd", ssd, block, task="classification")
    assert (cfg.task, cfg.selection_weighting, cfg.compute_dtype) == (
        "classification", 1.0, "float32")
    assert "task" not in api.default_block(ssd)
    bad = {"dampening_constant": -0.1, "selection_weighting": math.nan, "batch_size": 0,
           "compute_dtype": "int8"}
    for key, value in bad.items():
        with pytest.raises(ConfigError, match=rf"config\.ssd\.{key}"):
            api.make_config("ssd", ssd, {key: value}, task="multilabel")
    with pytest.raises(ConfigError, match=r"config\.ssd\.task"):
        api.make_config("ssd", ssd, {}, task="regression")


def test_ssd_declares_the_method_interface():
    api.check_method("ssd", ssd)
    assert ssd.ACCESS == api.STATS and callable(ssd.prepare)
