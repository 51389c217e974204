"""What MetaUnlearn's learned step does, measured on held-out simulated requests.

The paper reports MetaUnlearn's end result only. These functions look at the step itself, on
simulated requests of TRAIN identities kept out of meta-training (``training`` draws them; the
real request's people are never among them), with dropout off, as at request time:

* the outer objective (SPEC.md 6.3, the one MetaUnlearn minimises) with no step (``none``),
  after the learned step (``learned``) and after a gradient-ascent step on the portraits' task
  loss of the same length (``ascent``, the ``support_ascent`` direction): how much of the
  objective each removes (``reduction_*``, a fraction of ``none``);
* ``relative_step``: ``‖Δθ‖ / ‖θ‖`` of the learned step;
* per portrait, the norm of its gradient ``‖∇_θ ℓ_φ(x_i)‖`` (the step is their mean):
  ``dead_share``, the share of portraits whose gradient is below ``DEAD_FRACTION`` of the largest
  of their request (a Softplus pinned at zero gives no step), ``top_share`` (the largest
  portrait's share of the request's summed norms: 1/n when equal, 1 when one portrait is the
  whole step) and ``portrait_cv`` (their coefficient of variation).

``scale_losses`` is the line search's objective: the outer objective after the learned step
multiplied by each candidate factor (``step_control`` line_search / normalize).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from oneshui_jax.unlearn import support_ascent
from oneshui_jax.unlearn.meta_unlearn import core as mu

DEAD_FRACTION = 1e-3  # a portrait's gradient below this share of its request's largest: no step
SUMMARY_FIELDS = ("outer_none", "outer_learned", "outer_ascent", "reduction_learned",
                  "reduction_ascent", "relative_step", "dead_share", "top_share", "portrait_cv")


def outer_loss(model_cfg, cfg: mu.Config, theta_u, theta, forget, val, retain) -> jax.Array:
    """The outer objective of ``theta_u`` over stacked batches, each weighing its valid forget
    images (as ``core.meta_gradient``, padded batches skipped), without gradients."""
    weights = mu._weights(forget)

    def add(total, k):
        batch_retain = None if retain is None else mu._stack_item(retain, k)
        value = mu.outer_batch_loss(model_cfg, cfg, theta_u, theta, mu._stack_item(forget, k),
                                    mu._stack_item(val, k), batch_retain)
        return total + weights[k] * value.astype(jnp.float32)

    def body(total, k):
        return jax.lax.cond(weights[k] > 0, add, lambda t, _: t, total, k), None

    total, _ = jax.lax.scan(body, jnp.zeros((), jnp.float32),
                            jnp.arange(forget["mask"].shape[0]))
    return total


def scale_losses(model_cfg, ml_cfg, cfg: mu.Config, theta, phi, support, forget, val, retain,
                 scales: jax.Array) -> jax.Array:
    """The outer objective after ``θ − s c g`` for each ``s`` of ``scales`` [A] -> [A]."""
    grads = mu.learned_gradient(model_cfg, ml_cfg, cfg, theta, phi, support, None)
    c = mu.step_coefficient(cfg, theta, grads)

    def one(s):
        theta_u = jax.tree.map(lambda p, g: p - (s * c) * g, theta, grads)
        return outer_loss(model_cfg, cfg, theta_u, theta, forget, val, retain)

    return jax.lax.map(one, scales)


def portrait_gradient_norms(model_cfg, ml_cfg, cfg: mu.Config, theta, phi,
                            support) -> jax.Array:
    """``‖∇_θ (ℓ_φ − λ L_task)(x_i)‖`` of every support row [S] (padded rows included)."""

    def one(i):
        single = jax.tree.map(lambda x: jax.lax.dynamic_slice_in_dim(x, i, 1), support)
        single = {**single, "mask": jnp.ones((1,), bool)}
        return mu.safe_norm(mu.learned_gradient(model_cfg, ml_cfg, cfg, theta, phi, single,
                                                None))

    return jax.lax.map(one, jnp.arange(support["mask"].shape[0]))


def request_diagnostics(model_cfg, ml_cfg, cfg: mu.Config, theta, phi, support, forget, val,
                        retain, scale) -> dict[str, jax.Array]:
    """The raw diagnostics of one held-out request after the step ``θ − scale c g``."""
    grads = mu.learned_gradient(model_cfg, ml_cfg, cfg, theta, phi, support, None)
    c = scale * mu.step_coefficient(cfg, theta, grads)
    theta_u = jax.tree.map(lambda p, g: p - c * g, theta, grads)
    step_norm = c * mu.safe_norm(grads)
    ascent = support_ascent.support_gradient(model_cfg, cfg.task, theta, support)
    theta_a = support_ascent.ascend(theta, ascent, step_norm / mu.safe_norm(ascent))
    # the three models' objectives in one loop (one compiled body, not three)
    stacked = jax.tree.map(lambda *p: jnp.stack(p), theta, theta_u, theta_a)
    outer = jax.lax.map(
        lambda t: outer_loss(model_cfg, cfg, t, theta, forget, val, retain), stacked)
    return {"outer_none": outer[0], "outer_learned": outer[1],
            "outer_ascent": outer[2], "step_norm": step_norm,
            "theta_norm": mu.safe_norm(theta),
            "portrait_norms": portrait_gradient_norms(model_cfg, ml_cfg, cfg, theta, phi,
                                                      support),
            "mask": support["mask"]}


def jitted(model_cfg, ml_cfg, cfg: mu.Config) -> tuple[Any, Any]:
    """``(request_diagnostics, scale_losses)`` compiled for this model, meta-loss and config
    (``core.compile_key``: once for configs that differ only in what is not compiled)."""
    return _jitted(model_cfg, ml_cfg, mu.compile_key(cfg))


@mu.compiled_cache(8)
def _jitted(model_cfg, ml_cfg, cfg: mu.Config) -> tuple[Any, Any]:
    return (jax.jit(functools.partial(request_diagnostics, model_cfg, ml_cfg, cfg)),
            jax.jit(functools.partial(scale_losses, model_cfg, ml_cfg, cfg)))


def summarize(raw: Sequence[dict[str, Any]]) -> dict[str, float]:
    """The per-epoch record (``SUMMARY_FIELDS``) of several requests' ``request_diagnostics``."""
    get = lambda key: np.asarray([float(np.asarray(r[key])) for r in raw], np.float64)
    none, learned, ascent = get("outer_none"), get("outer_learned"), get("outer_ascent")
    dead, tops, cvs = [], [], []
    for r in raw:
        norms = np.asarray(r["portrait_norms"], np.float64)[np.asarray(r["mask"], bool)]
        if norms.size == 0:
            continue
        threshold = max(DEAD_FRACTION * float(norms.max()), 1e-12)
        dead.extend((norms < threshold).tolist())
        total = float(norms.sum())
        tops.append(float(norms.max()) / total if total > 0 else 1.0)
        cvs.append(float(norms.std() / norms.mean()) if norms.mean() > 0 else 0.0)
    base = max(float(none.sum()), 1e-30)
    return {"outer_none": float(none.mean()), "outer_learned": float(learned.mean()),
            "outer_ascent": float(ascent.mean()),
            "reduction_learned": 1.0 - float(learned.sum()) / base,
            "reduction_ascent": 1.0 - float(ascent.sum()) / base,
            "relative_step": float(np.mean(get("step_norm") / get("theta_norm"))),
            "dead_share": float(np.mean(dead)) if dead else 0.0,
            "top_share": float(np.mean(tops)) if tops else 0.0,
            "portrait_cv": float(np.mean(cvs)) if cvs else 0.0}


def choose_scale(scales: Sequence[float], mean_losses: Sequence[float]) -> int:
    """Index of the factor with the lowest mean outer objective; on ties the smallest."""
    return support_ascent.choose(scales, mean_losses)
