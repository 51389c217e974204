"""pgu: Projected Gradient Unlearning, the reference's PGU baseline (SPEC.md 7.5, Q25).

Before the request (``prepare``, ACCESS ``stats``): for every dense layer of the ViT (the patch
projection, per block ``attn.qkv``, ``attn.proj``, ``mlp.fc1``, ``mlp.fc2``, and the head: 50
layers for ViT-B/16) the uncentred covariance of its inputs over the train-augmented TRAIN images
(the request's support images held out), in batches of ``batch_size``::

    C = Σ XᵀX        X: the layer's inputs, tokens flattened (padded rows contribute nothing)

The layer inputs come from the model's own forward pass (``vit.apply(..., capture_inputs=True)``),
in float32 (the reference computes them outside autocast), accumulated in float32 on the device by
a jit-compiled step. The patch projection is a conv (kernel = stride = patch size); its inputs are
the image windows it multiplies, unfolded as the reference does (``Config.patch_covariance``):

* ``"stride1"`` (faithful, Q25): ``F.unfold(stride=1)``, every ``p x p`` window at stride 1:
  (224 - 16 + 1)² = 43,681 windows of 768 values per 224 px image instead of the 196 patches the
  layer sees. Unfolding one image takes 134 MB (float32; the step unfolds one image at a time in a
  scan, a batch of 128 at once would take 17 GB) and its ``XᵀX`` 25.8 GMAC, 223x the patches'
  0.12 GMAC and 1.5x the image's ViT-B/16 forward pass (17.5 GMAC). Per image, the covariance
  step costs 70 GMAC with it against 44 GMAC with ``"patches"`` (forward + the block layers'
  26.5 GMAC): 1.6x the arithmetic of ``prepare`` and of the support covariance at request time;
  the memory peak does not change (one batch of 128 at ViT-B/16 on 2 shared CPU cores: 188 s
  against 139 s, 2.0 GB of XLA temporaries and 4.5 GB peak RSS either way);
* ``"patches"`` (fix): the model's own non-overlapping patches.

Window features are ordered ``(kh, kw, channel)``, the layout of the flax kernel ``[p, p, C, D]``
reshaped to ``[p·p·C, D]`` (torch orders them ``(channel, kh, kw)``; a permutation of the same
space, so the projection below is the same map).

Artifacts: ``{"covariance": {layer: C}}`` with torch-style layer names (``"patch_embed.proj"``,
``"blocks.0.attn.qkv"``, ..., ``"head"``), float32 ``[in, in]``. The reference stores
``U, √S = svd(C)`` and rebuilds ``M = U diag(√S²) Uᵀ``, which is ``C`` itself (C is symmetric
positive semi-definite); storing ``C`` skips that round trip (and its rounding) and half the
storage. ViT-B/16: 537 MB. ``prepare`` is a single pass without checkpoints (a killed run
starts again).

At request time (``unlearn``), with the support images (eval transform) of the request::

    C_f = Σ XᵀX on the support images (same way, float32)
    U1, S1 = svd(C − C_f)                          (singular values, descending)
    k = #{j : cumsum(√S1)_j / Σ √S1 ≤ γ} + 1;      P = U1[:, :k] U1[:, :k]ᵀ

``C − C_f`` is symmetric but can be indefinite (the support images are not in C), so its singular
values are the absolute eigenvalues: computed here with ``eigh`` ordered by ``|λ|`` (the same
``U1``, ``S1`` as an SVD, several times faster). With ``γ == 1`` the reference builds no ``P`` at
all, and a parameter without ``P`` is never updated: PGU then returns the model unchanged.

Then ``epochs`` epochs over the support images (shuffled, batches of ``batch_size``, the forward
in ``compute_dtype``, bf16 as the reference's autocast) of manual SGD on::

    loss = reverse loss + 0.2 · mean_i Σ_c p_ic log(p_ic + 1e-15),   p = softmax(outputs) (Q20)

    classification: mean_i −log(1 − softmax(o_i)[y_i] + 0.05)
    multilabel, ``reverse_bce="index"`` (faithful, Q25): the reference's ``_reverse_bce_loss``
        ``mean_i mean_c −log(1 − σ(o_i)[y_ic] + 0.05)``: the 0/1 label vector is an integer index,
        so it reads columns 0 and 1 only;
    multilabel, ``reverse_bce="positives"`` (fix): the mean over the image's true labels of
        ``−log(1 − σ(o_ic) + 0.05)`` (a boolean mask, as intended); an image without a positive
        label contributes 0 (the boolean-mask reference would give NaN).

Only the kernels of layers with a ``P`` move (biases, LayerNorms, class token and position
embedding stay bit-identical). A kernel's gradient is projected on its *input* side: the reference
computes ``g − g[out, in] @ P``; with flax's ``[in, out]`` layout that is ``g − P @ g``. Epoch
``e`` uses ``lr (1 + cos(π e / E)) / 2`` (the reference's CosineAnnealingLR), no momentum.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import math
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from oneshui_jax import interrupts, losses, optim, sharding
from oneshui_jax.data import pipeline
from oneshui_jax.errors import METHOD_KEPT, ConfigError, check_finite
from oneshui_jax.models import vit
from oneshui_jax.models.tree import Path, get_path
from oneshui_jax.unlearn import api

ACCESS = api.STATS
TASKS = ("multilabel", "classification")
PATCH_COVARIANCES = ("stride1", "patches")
REVERSE_BCE = ("index", "positives")
COMPUTE_DTYPES = ("bfloat16", "float32")
ENTROPY_WEIGHT = 0.2  # the reference's loss2_w
REVERSE_MARGIN = 0.05  # −log(1 − p + 0.05)
LOG_EPS = 1e-15  # p log(p + 1e-15)

Params = Any
_HIGHEST = jax.lax.Precision.HIGHEST


@dataclasses.dataclass(frozen=True)
class Config:
    """pgu's settings: the study's ``config.pgu`` block (reference names in metadata)."""

    task: str = dataclasses.field(default="multilabel", metadata={"bound": "task"})
    batch_size: int = 128  # TRAIN covariance batches and support batches
    lr: float = 0.1
    epochs: int = 5
    # Energy threshold of the retained subspace (--pgu_gamma); 1 = no update at all.
    gamma: float = dataclasses.field(default=0.8, metadata={"reference": "pgu_gamma"})
    # "stride1": the reference's unfold at stride 1 (Q25); "patches": the conv's own patches.
    patch_covariance: str = "stride1"
    # "index": the reference's reverse BCE indexing with the 0/1 labels (Q25); "positives": fix.
    reverse_bce: str = "index"
    compute_dtype: str = "bfloat16"  # the forward of the update steps (covariances: float32)

    RANGES = {"batch_size": api.COUNT, "lr": api.NON_NEGATIVE,  # api.check_ranges
              "epochs": api.COUNT, "gamma": api.FRACTION}

    def __post_init__(self):
        if self.task not in TASKS:
            raise ConfigError(f"config.pgu.task must be one of {TASKS}, got {self.task!r}")
        if self.patch_covariance not in PATCH_COVARIANCES:
            raise ConfigError(f"config.pgu.patch_covariance must be one of {PATCH_COVARIANCES},"
                              f" got {self.patch_covariance!r}")
        if self.reverse_bce not in REVERSE_BCE:
            raise ConfigError(f"config.pgu.reverse_bce must be one of {REVERSE_BCE}, got "
                              f"{self.reverse_bce!r}")
        if self.compute_dtype not in COMPUTE_DTYPES:
            raise ConfigError(f"config.pgu.compute_dtype must be bfloat16 or float32, got "
                              f"{self.compute_dtype!r}")
        api.check_ranges(self, "config.pgu")

# ---------------------------------------------------------------------------------------------
# Layers and their input covariances


def layer_name(path: Path) -> str:
    """``("blocks", 0, "attn", "qkv", "kernel")`` -> ``"blocks.0.attn.qkv"`` (torch's name)."""
    return ".".join(str(k) for k in path[:-1])


def layer_paths(model_cfg: vit.ViTConfig) -> dict[str, Path]:
    """Every dense layer (``vit.dense_kernel_paths``) by name -> the path of its kernel."""
    return {layer_name(path): path for path in vit.dense_kernel_paths(model_cfg)}


def fan_in(params: Params, path: Path) -> int:
    """Input size of the layer whose kernel is at ``path`` (flax kernels are ``[..., out]``)."""
    return math.prod(get_path(params, path).shape[:-1])


def windows(images: jax.Array, patch_size: int, stride: int) -> jax.Array:
    """Every ``p x p`` window of NHWC images at ``stride`` (no padding): [B, L, p·p·C].

    Windows in row-major order; features ordered ``(kh, kw, channel)`` like a flax conv kernel
    ``[p, p, C, D]`` reshaped to ``[p·p·C, D]``. Exact (slices, no convolution).
    """
    b, h, w, c = images.shape
    p = patch_size
    rows, cols = (h - p) // stride + 1, (w - p) // stride + 1
    parts = [images[:, i:i + stride * (rows - 1) + 1:stride, j:j + stride * (cols - 1) + 1:stride]
             for i in range(p) for j in range(p)]
    return jnp.stack(parts, axis=3).reshape(b, rows * cols, p * p * c)


def _gram(x: jax.Array) -> jax.Array:
    """``xᵀx`` of [n, F] rows in float32 (full float32 precision on every backend)."""
    x = x.astype(jnp.float32)
    return jnp.einsum("nf,ng->fg", x, x, precision=_HIGHEST)


def window_covariance(images: jax.Array, patch_size: int, stride: int) -> jax.Array:
    """``Σ w wᵀ`` over every window of every image [F, F]; stride-1 windows one image at a time
    (those of a whole batch do not fit in memory: 17 GB for 128 images at 224 px)."""
    features = patch_size * patch_size * images.shape[-1]
    if stride == patch_size:
        return _gram(windows(images, patch_size, stride).reshape(-1, features))

    def body(acc, image):
        return acc + _gram(windows(image[None], patch_size, stride)[0]), None

    acc, _ = jax.lax.scan(body, jnp.zeros((features, features), jnp.float32), images)
    return acc


def batch_covariances(model_cfg: vit.ViTConfig, params: Params, images: jax.Array,
                      mask: jax.Array, patch_covariance: str = "stride1",
                      attention: str = "xla") -> dict[str, jax.Array]:
    """``Σ XᵀX`` of every dense layer's inputs over the valid images of one batch, float32.

    The inputs come from the model's float32 forward pass (``vit.apply(capture_inputs=True)``);
    a padded image (``mask`` False) contributes nothing to any layer.
    """
    _, _, inputs = vit.apply(model_cfg, params, images.astype(jnp.float32), dtype=jnp.float32,
                             attention=attention, capture_inputs=True)
    keep = mask.astype(jnp.float32)
    out = {}
    for path, x in inputs.items():
        x = x.astype(jnp.float32) * keep.reshape(-1, *([1] * (x.ndim - 1)))
        if path[0] == "patch_embed":
            p = model_cfg.patch_size
            out[layer_name(path)] = window_covariance(
                x, p, 1 if patch_covariance == "stride1" else p)
        else:
            out[layer_name(path)] = _gram(x.reshape(-1, x.shape[-1]))
    return out


@functools.lru_cache(maxsize=16)
def _covariance_step(model_cfg: vit.ViTConfig, patch_covariance: str, attention: str):
    def step(params, acc, images, mask):
        batch = batch_covariances(model_cfg, params, images, mask, patch_covariance, attention)
        return {name: acc[name] + batch[name] for name in acc}

    return jax.jit(step, donate_argnums=1)


def accumulate_covariances(model_cfg: vit.ViTConfig, params: Params, batches, *,
                           patch_covariance: str = "stride1", attention: str = "xla",
                           progress: bool = False, total: int | None = None,
                           desc: str = "pgu: covariances") -> dict[str, jax.Array]:
    """``batch_covariances`` summed over ``batches`` (dicts with ``image`` and ``mask``) on the
    device, one jit-compiled step per batch: ``{layer name: C [in, in] float32}``."""
    step = _covariance_step(model_cfg, patch_covariance, attention)
    acc = {name: jnp.zeros((fan_in(params, path),) * 2, jnp.float32)
           for name, path in layer_paths(model_cfg).items()}
    for batch in tqdm(batches, desc=desc, total=total, unit="batch", disable=not progress,
                      leave=False):
        interrupts.check()
        acc = step(params, acc, *sharding.shard_batch((batch["image"], batch["mask"])))
    return acc


# ---------------------------------------------------------------------------------------------
# The projection


def retained_rank(singular_values: jax.Array, gamma: float) -> jax.Array:
    """``k = #{j : cumsum(√S)_j / Σ√S ≤ γ} + 1`` for singular values in descending order."""
    s = jnp.sqrt(singular_values)
    return jnp.sum(jnp.cumsum(s) / jnp.sum(s) <= gamma) + 1


def projection(covariance: jax.Array, support_covariance: jax.Array,
               gamma: float) -> tuple[jax.Array, jax.Array]:
    """``(P, k)``: ``P = U1[:, :k] U1[:, :k]ᵀ`` with ``U1, S1 = svd(C − C_f)`` (module docstring).

    ``C − C_f`` is symmetric, so its SVD is its eigendecomposition ordered by ``|λ|``.
    """
    d = covariance - support_covariance
    eigenvalues, vectors = jnp.linalg.eigh((d + d.T) / 2)
    order = jnp.argsort(-jnp.abs(eigenvalues), stable=True)
    u1 = vectors[:, order]
    k = retained_rank(jnp.abs(eigenvalues)[order], gamma)
    kept = u1 * (jnp.arange(u1.shape[1]) < k).astype(u1.dtype)
    return jnp.einsum("ij,kj->ik", kept, kept, precision=_HIGHEST), k


_projection = jax.jit(projection)


def project(grad: jax.Array, p: jax.Array) -> jax.Array:
    """The kernel gradient without its component in the retained input subspace: the
    reference's ``g − g[out, in] @ P`` is ``g − P @ g`` for a flax kernel ``[..., in, out]``."""
    g = grad.reshape(-1, grad.shape[-1])
    return (g - jnp.einsum("ij,jo->io", p, g, precision=_HIGHEST)).reshape(grad.shape)


# ---------------------------------------------------------------------------------------------
# The unlearning loss


def reverse_loss(task: str, logits: jax.Array, labels: jax.Array, mask: jax.Array,
                 reverse_bce: str = "index") -> jax.Array:
    """The reference's reverse loss over the valid rows (module docstring), float32."""
    logits = logits.astype(jnp.float32)
    if task == "classification":
        probs = jax.nn.softmax(logits, axis=-1)
        picked = jnp.take_along_axis(probs, labels.astype(jnp.int32)[:, None], axis=-1)[:, 0]
        per_image = -jnp.log(1.0 - picked + REVERSE_MARGIN)
    elif reverse_bce == "index":  # σ(o_i)[y_i] with the 0/1 vector y_i as an integer index
        picked = jnp.take_along_axis(jax.nn.sigmoid(logits), labels.astype(jnp.int32), axis=-1)
        per_image = jnp.mean(-jnp.log(1.0 - picked + REVERSE_MARGIN), axis=-1)
    else:  # the mean over the true labels
        positive = (labels > 0).astype(jnp.float32)
        terms = -jnp.log(1.0 - jax.nn.sigmoid(logits) + REVERSE_MARGIN)
        per_image = jnp.sum(terms * positive, axis=-1) / jnp.maximum(
            jnp.sum(positive, axis=-1), 1.0)
    return losses.masked_mean(per_image, mask)


def negative_entropy(logits: jax.Array, mask: jax.Array) -> jax.Array:
    """``mean_i Σ_c p_ic log(p_ic + 1e-15)``, ``p = softmax(logits)`` (multilabel too, Q20)."""
    probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
    return losses.masked_mean(jnp.sum(probs * jnp.log(probs + LOG_EPS), axis=-1), mask)


def unlearning_loss(task: str, logits: jax.Array, labels: jax.Array, mask: jax.Array,
                    reverse_bce: str = "index") -> jax.Array:
    """``reverse_loss + 0.2 · negative_entropy``."""
    return (reverse_loss(task, logits, labels, mask, reverse_bce)
            + ENTROPY_WEIGHT * negative_entropy(logits, mask))


def _with_kernels(params: Params, kernels: dict[Path, jax.Array]) -> Params:
    """``params`` with the kernels at the given paths replaced (the other leaves shared)."""
    out = jax.tree.map(lambda x: x, params)
    for path, kernel in kernels.items():
        node = out
        for key in path[:-1]:
            node = node[key]
        node[path[-1]] = kernel
    return out


@functools.lru_cache(maxsize=16)
def _update_step(model_cfg: vit.ViTConfig, task: str, reverse_bce: str, compute_dtype: str,
                 attention: str):
    dtype = jnp.dtype(compute_dtype)
    paths = layer_paths(model_cfg)

    def step(params, kernels, projections, batch, lr):
        def loss_fn(k):
            p = _with_kernels(params, {paths[name]: k[name] for name in k})
            logits = vit.apply(model_cfg, p, batch["image"], dtype=dtype, attention=attention)[0]
            return unlearning_loss(task, logits, batch["label"], batch["mask"], reverse_bce)

        loss, grads = jax.value_and_grad(loss_fn)(kernels)
        new = {name: kernels[name] - lr * project(grads[name], projections[name])
               for name in kernels}
        return new, loss

    return jax.jit(step)


# ---------------------------------------------------------------------------------------------
# The method


def train_images(data: api.TrainData) -> np.ndarray:
    """The reference's ``get_train_data``: every image of every TRAIN identity but the support
    images, in dataset order."""
    held_out = set(data.support_images)
    images = itertools.chain.from_iterable(data.identity_images.values())
    return np.asarray(sorted({int(i) for i in images} - held_out), np.int64)


def prepare(model: api.Model, params: Params, data: api.TrainData, cfg: Config,
            rng: jax.Array) -> tuple[api.Artifacts, dict[str, Any]]:
    """``C = Σ XᵀX`` of every dense layer over the train-augmented TRAIN images (docstring).

    Artifacts: ``{"covariance": {layer: C}}``. Info: the number of images, batches and layers
    and the patch covariance used. The augmentation follows ``data.seed`` (``rng`` is unused).
    """
    del rng
    indices = train_images(data)
    pcfg = pipeline.PipelineConfig(image_size=data.image_size, batch_size=cfg.batch_size,
                                   seed=data.seed, num_threads=min(8, os.cpu_count() or 1),
                                   crop_scale=tuple(data.crop_scale))
    batches = pipeline.to_iterator(pipeline.train_dataset(data.source, indices, pcfg, 1), pcfg)
    total = pipeline.steps_per_epoch(len(indices), cfg.batch_size)
    covariance = accumulate_covariances(
        model.vit, params, batches, patch_covariance=cfg.patch_covariance,
        attention=model.attention, progress=data.progress, total=total)
    info = {"train_images": len(indices), "batches": total, "layers": len(covariance),
            "patch_covariance": cfg.patch_covariance}
    return {"covariance": covariance}, info


def unlearn(model: api.Model, params: Params, artifacts: api.Artifacts, request: api.Request,
            cfg: Config, rng: jax.Array, data=None) -> tuple[Params, dict[str, Any]]:
    """Projections from ``C − C_f``, then ``epochs`` of projected SGD on the portraits."""
    del data
    n = request.size
    if cfg.gamma == 1.0:  # the reference builds no projection, so no parameter moves
        return params, {"updated_layers": 0, "ranks": {}, "steps": 0, "loss": []}
    batch_size = min(cfg.batch_size, n)
    support = accumulate_covariances(
        model.vit, params, api.request_batches(request, batch_size),
        patch_covariance=cfg.patch_covariance, attention=model.attention)
    projections, ranks = {}, {}
    for name, c in artifacts["covariance"].items():
        projections[name], k = _projection(jnp.asarray(c, jnp.float32), support[name],
                                           cfg.gamma)
        ranks[name] = int(k)
    del support
    paths = layer_paths(model.vit)
    kernels = {name: get_path(params, paths[name]) for name in projections}
    step = _update_step(model.vit, cfg.task, cfg.reverse_bce, cfg.compute_dtype,
                        model.attention)
    epoch_losses, steps = [], 0
    for epoch in range(cfg.epochs):
        lr = jnp.float32(optim.epoch_cosine(cfg.lr, epoch, cfg.epochs))
        order = np.asarray(jax.random.permutation(jax.random.fold_in(rng, epoch), n))
        batch_losses = []
        for batch in api.request_batches(request, batch_size, order):
            interrupts.check()
            kernels, loss = step(params, kernels, projections, batch, lr)
            batch_losses.append(loss)
            steps += 1
        epoch_losses.append(float(np.mean(jax.device_get(batch_losses))))
        check_finite({"loss": epoch_losses[-1]}, where="pgu",
                     when=f"epoch {epoch} (epochs 0-{cfg.epochs - 1})", kept=METHOD_KEPT,
                     advice=f"Lower config.pgu.lr ({cfg.lr:g}) or check the portraits")
    new = _with_kernels(params, {paths[name]: k for name, k in kernels.items()})
    return new, {"updated_layers": len(kernels), "ranks": ranks, "steps": steps,
                 "loss": epoch_losses}
