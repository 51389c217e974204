"""lipschitz: zero-shot unlearning by Lipschitz regularisation (JiT), a baseline of the paper.

Foster et al., "Zero-Shot Machine Unlearning at Scale via Lipschitz Regularization", as the
reference runs it (``approaches/lipschitz.py:LipschitzRegularization``, driver
``main.py:lipschitz``; SPEC.md 7.4 and Q21). The model is made locally smooth around the
portraits: for each support batch ``x`` (batch 128, the request's order, no shuffle; one batch
when N <= 128)::

    out   = f_θ(x)
    x̃_s   = clip(x + σ ε_s, min(x), max(x))      ε_s ~ N(0, 1), s = 1..n_samples (25)
    out2_s = stop_gradient(f_θ(x̃_s))
    K_s   = | Σ_b ‖out_b − out2_{s,b}‖₂ / ‖x_b − x̃_{s,b}‖₂ |
    loss  = mean_s K_s
    θ    ← θ − lr · g                              plain SGD (lr 0.01, no momentum, no decay)

``min(x)`` and ``max(x)`` are scalars over the whole batch tensor, σ = ``weighting`` (the
reference's ``lipschitz_weighting``: 30 for ViT on images in [-1, 1], so the clamped noise images
are nearly binary, Q21) and the norms run over each image's pixels and each row's logits. Float32,
one pass over the support set.

``g`` is where the reference is peculiar (Q21): it never calls ``zero_grad``, so ``p.grad`` keeps
growing and the step after batch ``k`` uses the *sum* of the gradients of batches ``1..k`` (each
taken at the parameters of its own step). That is the faithful default here; the option
``zero_grad_between_batches=True`` is the fix (each step uses its own batch's gradient). The two
agree when the request fits one batch (one portrait per identity, so N <= 128: the main grid);
the N = 200 and 500 requests of the reference's larger runs span 2 and 4 batches, where they
differ.

Port notes:

* the noise comes from ``rng`` (``jax.random``), so the result is deterministic given it; batch
  ``k``, sample ``s``, row ``r`` draws from ``fold_in(fold_in(fold_in(rng, k), s), r)``
  (:func:`noise`), so a row's noise does not depend on the batch's padding;
* the 25 perturbed forward passes of a batch run inside the same jit-compiled step as its
  gradient and update (``jax.lax.map`` over the samples: one batch-sized forward at a time);
* the reference's last batch is short; here, when the request spans several batches, the last is
  padded to ``batch_size`` (one compilation for every batch) and its padded rows take no part:
  not in the batch min / max of the clamp, not in the sum over rows. A request that fits one
  batch runs unpadded at its own size;
* ``‖out_b − out2_{s,b}‖₂`` has gradient 0 where the difference is 0, as torch's ``vector_norm``
  (plain ``jnp.sqrt`` would give NaN). A batch whose pixels are all equal (min = max) makes
  ``x̃ = x`` and ``0 / 0`` in the reference and here alike; real portraits never do;
* the reference's float32 matmuls run as TF32 on its GPU (SPEC.md preamble); here they run at
  XLA's default precision for the device.

ACCESS ``support``: the request alone, nothing prepared before it.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp

from oneshui_jax import interrupts
from oneshui_jax.errors import METHOD_KEPT, ConfigError, check_finite
from oneshui_jax.unlearn import api

ACCESS = api.SUPPORT
COMPUTE_DTYPES = ("float32", "bfloat16", "float64")

Params = Any


@dataclasses.dataclass(frozen=True)
class Config:
    """lipschitz's settings: the study's ``config.lipschitz`` block (SPEC.md 7.4)."""

    task: str = dataclasses.field(default="multilabel", metadata={"bound": "task"})
    batch_size: int = 128  # support images per step; the last batch is padded (masked)
    lr: float = 0.01  # plain SGD: no momentum, no weight decay
    # σ of the Gaussian input noise (30 for ViT; the reference's 0.01 is for ResNet).
    weighting: float = dataclasses.field(default=30.0,
                                         metadata={"reference": "lipschitz_weighting"})
    # Perturbed copies of each batch whose K_s the loss averages.
    n_samples: int = dataclasses.field(default=25, metadata={"reference": "lipschitz_n_samples"})
    # False (faithful, Q21): gradients accumulate across batches as the reference's missing
    # zero_grad makes them; True (the fix): each step uses its own batch's gradient only.
    zero_grad_between_batches: bool = False
    compute_dtype: str = "float32"  # the reference runs this method in float32

    RANGES = {"batch_size": api.COUNT, "lr": api.NON_NEGATIVE,  # api.check_ranges
              "weighting": api.POSITIVE, "n_samples": api.COUNT}

    def __post_init__(self):
        if self.compute_dtype not in COMPUTE_DTYPES:
            raise ConfigError(f"config.lipschitz.compute_dtype must be one of {COMPUTE_DTYPES}, "
                              f"got {self.compute_dtype!r}")
        api.check_ranges(self, "config.lipschitz")
        if not isinstance(self.zero_grad_between_batches, bool):
            raise ConfigError(f"config.lipschitz.zero_grad_between_batches must be true or "
                              f"false, got {self.zero_grad_between_batches!r}")


# ---------------------------------------------------------------------------------------------
# Pure functions


def noise(rng: jax.Array, batch: jax.Array | int, sample: jax.Array | int, rows: int,
          image_shape: tuple[int, ...]) -> jax.Array:
    """Standard-normal draws ``ε`` [rows, *image_shape] (float32) of support batch ``batch``,
    perturbed copy ``sample``: row ``r`` from ``fold_in(fold_in(fold_in(rng, batch), sample), r)``.
    """
    key = jax.random.fold_in(jax.random.fold_in(rng, batch), sample)
    keys = jax.vmap(lambda r: jax.random.fold_in(key, r))(jnp.arange(rows, dtype=jnp.uint32))
    return jax.vmap(lambda k: jax.random.normal(k, image_shape, jnp.float32))(keys)


def perturb(images: jax.Array, mask: jax.Array, eps: jax.Array, sigma: jax.Array) -> jax.Array:
    """``clip(x + σ ε, min(x), max(x))`` with min and max over the valid rows of the batch.

    Padded rows (``mask`` False) are returned unchanged.
    """
    valid = mask.reshape((-1,) + (1,) * (images.ndim - 1))
    lo = jnp.min(jnp.where(valid, images, jnp.inf))
    hi = jnp.max(jnp.where(valid, images, -jnp.inf))
    noisy = jnp.clip(images + sigma.astype(images.dtype) * eps.astype(images.dtype), lo, hi)
    return jnp.where(valid, noisy, images)


def _row_norms(diff: jax.Array, mask: jax.Array) -> jax.Array:
    """‖diff_b‖₂ over all but the first axis; 1 on padded rows (a safe, gradient-free value).

    At ``diff_b = 0`` the gradient is 0, as torch's ``vector_norm`` defines it (not NaN).
    """
    flat = diff.reshape(diff.shape[0], -1)
    flat = jnp.where(mask[:, None], flat, jnp.ones_like(flat))
    sq = jnp.sum(jnp.square(flat), axis=1)
    positive = sq > 0
    return jnp.where(positive, jnp.sqrt(jnp.where(positive, sq, 1.0)), 0.0)


def perturbed_outputs(logits_fn, params: Params, images: jax.Array, mask: jax.Array,
                      rng: jax.Array, batch: jax.Array | int, sigma: jax.Array,
                      n_samples: int) -> tuple[jax.Array, jax.Array]:
    """``(out2 [S, B, C], in_norm [S, B])``: the model's logits on each perturbed copy (no
    gradient) and ``‖x_b − x̃_{s,b}‖₂`` (1 on padded rows). One forward of the batch at a time.
    """

    def one(sample):
        eps = noise(rng, batch, sample, images.shape[0], images.shape[1:])
        noisy = perturb(images, mask, eps, sigma)
        out2 = jax.lax.stop_gradient(logits_fn(params, noisy)).astype(jnp.float32)
        in_norm = _row_norms((images - noisy).astype(jnp.float32), mask)
        return out2, in_norm

    return jax.lax.map(one, jnp.arange(n_samples, dtype=jnp.uint32))


def lipschitz_loss(out: jax.Array, out2: jax.Array, in_norm: jax.Array,
                   mask: jax.Array) -> jax.Array:
    """``mean_s |Σ_b mask_b ‖out_b − out2_{s,b}‖₂ / in_norm_{s,b}|`` (out [B, C], out2 [S, B, C]).
    """
    out = out.astype(jnp.float32)
    ratios = jax.vmap(lambda o2, n: _row_norms(out - o2, mask) / n)(out2, in_norm)  # [S, B]
    k = jnp.abs(jnp.sum(jnp.where(mask[None, :], ratios, 0.0), axis=1))
    return jnp.mean(k)


def batch_loss_and_grad(logits_fn, params: Params, images: jax.Array, mask: jax.Array,
                        rng: jax.Array, batch: jax.Array | int, sigma: jax.Array,
                        n_samples: int) -> tuple[jax.Array, Params]:
    """The loss of one support batch and its gradient in ``θ`` (only ``out`` carries one)."""
    out2, in_norm = perturbed_outputs(logits_fn, params, images, mask, rng, batch, sigma,
                                      n_samples)

    def loss(p):
        return lipschitz_loss(logits_fn(p, images), out2, in_norm, mask)

    return jax.value_and_grad(loss)(params)


def sgd_step(params: Params, accumulated: Params, grads: Params, lr: jax.Array,
             zero_grad: jax.Array | bool) -> tuple[Params, Params]:
    """torch's ``SGD(lr)`` step: ``p.grad`` is ``grads`` (``zero_grad``) or the running sum
    ``accumulated + grads`` (no ``zero_grad``, Q21); ``θ ← θ − lr · p.grad``. Returns
    ``(params, p.grad)``."""
    total = jax.tree.map(lambda a, g: jnp.where(zero_grad, g, a + g), accumulated, grads)
    new = jax.tree.map(lambda p, g: p - lr.astype(p.dtype) * g.astype(p.dtype), params, total)
    return new, total


@functools.lru_cache(maxsize=16)
def compiled_step(model: api.Model, n_samples: int, compute_dtype: str = "float32"):
    """The jit-compiled update of one support batch (one compilation per batch shape)::

        step(params, accumulated, images [B, S, S, 3], mask [B], rng, batch, sigma, lr,
             zero_grad) -> (params, p.grad, loss)

    ``accumulated`` is ``p.grad`` after the previous batch (zeros before the first), ``batch``
    the batch's index (it picks the noise, :func:`noise`), ``zero_grad`` a bool array.
    """

    def logits_fn(p, images):
        return model.logits(p, images, dtype=compute_dtype)

    def step(params, accumulated, images, mask, rng, batch, sigma, lr, zero_grad):
        loss, grads = batch_loss_and_grad(logits_fn, params, images, mask, rng, batch, sigma,
                                          n_samples)
        params, accumulated = sgd_step(params, accumulated, grads, lr, zero_grad)
        return params, accumulated, loss

    return jax.jit(step)


# ---------------------------------------------------------------------------------------------
# The method


def unlearn(model: api.Model, params: Params, artifacts: api.Artifacts, request: api.Request,
            cfg: Config, rng: jax.Array, data=None) -> tuple[Params, dict[str, Any]]:
    """One pass of Lipschitz-regularising SGD steps over the portraits (module docstring).

    Info: ``loss`` (the loss of every support batch, in order), ``batches`` and whether the
    gradients were zeroed between batches.
    """
    del artifacts, data
    step = compiled_step(model, cfg.n_samples, cfg.compute_dtype)
    zero_grad = jnp.asarray(cfg.zero_grad_between_batches)
    sigma = jnp.asarray(cfg.weighting, jnp.float32)
    lr = jnp.asarray(cfg.lr, jnp.float32)
    accumulated = jax.tree.map(jnp.zeros_like, params)
    losses = []
    for k, batch in enumerate(api.request_batches(request, cfg.batch_size)):
        interrupts.check()
        params, accumulated, loss = step(params, accumulated, batch["image"], batch["mask"],
                                         rng, jnp.uint32(k), sigma, lr, zero_grad)
        losses.append(loss)
    losses = [float(v) for v in losses]
    for k, loss in enumerate(losses):
        check_finite({"loss": loss}, where="lipschitz", when=f"batch {k} of the request",
                     kept=METHOD_KEPT,
                     advice=f"Lower config.lipschitz.lr ({cfg.lr:g}) or check the portraits")
    return params, {"loss": losses, "batches": len(losses),
                    "zero_grad_between_batches": cfg.zero_grad_between_batches}
