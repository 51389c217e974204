"""Losses: the task losses of pretraining and retraining (SPEC.md 4) and MetaUnlearn's outer
objectives (SPEC.md 6.3, ``MetaUnlearn.forget_loss_fn``, ``step``).

Task losses: BCE-with-logits averaged over labels (multi-label) or cross-entropy (classification),
per example (``per_example_loss``, used by ``train``) or as a mean over valid rows
(``task_loss``, used by the outer objectives).

Outer objectives. For each forget batch ``f`` of a request, paired with one validation batch ``v``:

    A(logits, y, acc) = task_loss(logits, y) * (1 - acc)      (use_accs; acc is a constant)
    D(f, v)           = Dist(A(f), stop_gradient(A(v)))       Dist: smooth_l1 | l1 | l2

and, with ``u`` the one-step-unlearned model and ``o`` the original one,

    full      D(u_f, o_v) + D(u_f, u_v)
    original  D(u_f, o_v)
    unlearned D(u_f, u_v)
    rev       D(u_f, u_v) + D(u_v, o_v)      (u_v keeps its gradient here)
    scrub     0.99 BCE(u_r, y_r) + 0.001 * 16 KL(u_r/4 || o_r/4) - 16 KL(u_f/4 || o_f/4)

``acc`` is macro mAP in [0, 1] on sigmoid scores (multi-label) or top-1 accuracy (classification),
computed on the batch and treated as a constant. KL is ``F.kl_div``'s default 'mean' reduction
(over batch x classes), and scrub uses BCE even for classification, as the reference does (Q18).
All functions take a ``mask`` of valid rows so padded batches give exactly the unpadded values.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

LOSS_TYPES = ("full", "original", "unlearned", "rev", "scrub")
DISTANCES = ("smooth_l1", "l1", "l2")


def _f32(x: jax.Array) -> jax.Array:
    """At least float32 (float64 stays float64, for finite-difference tests)."""
    return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def masked_mean(values: jax.Array, mask: jax.Array) -> jax.Array:
    """Mean of ``values`` over all elements of the valid rows (0 when no row is valid).

    ``mask`` ``[B]`` marks the valid rows of ``values`` ``[B, ...]`` (leading axis) and is
    broadcast over the trailing dims: for ``[B, C]`` values the result is the mean over valid
    rows x C, for ``[B]`` values the mean over valid rows.
    """
    mask = mask.astype(bool)
    while mask.ndim < values.ndim:
        mask = mask[..., None]
    mask = jnp.broadcast_to(mask, values.shape)
    count = jnp.maximum(jnp.sum(mask.astype(values.dtype)), 1.0)
    return jnp.sum(jnp.where(mask, values, 0)) / count  # a non-finite padded value adds nothing


def per_example_loss(task: str, logits: jax.Array, labels: jax.Array) -> jax.Array:
    """BCE-with-logits averaged over labels (multi-label) or cross-entropy (classification)."""
    logits = logits.astype(jnp.float32)
    if task == "multilabel":
        return optax.sigmoid_binary_cross_entropy(logits, labels.astype(jnp.float32)).mean(-1)
    if task == "classification":
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels.astype(jnp.int32))
    raise ValueError(f"unknown task {task!r}; expected 'multilabel' or 'classification'")


def task_loss(task: str, logits: jax.Array, labels: jax.Array, mask: jax.Array) -> jax.Array:
    """Mean BCE-with-logits over valid rows x labels, or mean cross-entropy over valid rows."""
    logits = _f32(logits)
    if task == "multilabel":
        per = optax.sigmoid_binary_cross_entropy(logits, labels.astype(logits.dtype))
        return masked_mean(per, mask)
    return masked_mean(
        optax.softmax_cross_entropy_with_integer_labels(logits, labels.astype(jnp.int32)), mask)


def _average_precision(scores: jax.Array, targets: jax.Array) -> jax.Array:
    """AP of one label over the distinct-score PR curve; NaN without positives."""
    order = jnp.argsort(-scores, stable=True)
    s, t = scores[order], targets[order].astype(jnp.float32)
    tps = jnp.cumsum(t)
    rank = jnp.arange(1, s.shape[0] + 1, dtype=jnp.float32)
    is_last = jnp.concatenate([s[1:] != s[:-1], jnp.array([True])])
    tps_last = jnp.where(is_last, tps, 0.0)
    previous = jnp.concatenate([jnp.zeros(1), jax.lax.cummax(tps_last)[:-1]])
    num_pos = tps[-1]
    ap = jnp.sum(jnp.where(is_last, (tps - previous) * (tps / rank), 0.0)) / num_pos
    return jnp.where(num_pos > 0, ap, jnp.nan)


def batch_map(logits: jax.Array, labels: jax.Array, mask: jax.Array) -> jax.Array:
    """Macro mAP in [0, 1] over labels with a positive (torchmetrics 1.3.0), valid rows only."""
    scores = jax.nn.sigmoid(logits.astype(jnp.float32))
    scores = jnp.where(mask[:, None], scores, -jnp.inf)  # padding sorts last and adds nothing
    targets = jnp.where(mask[:, None], labels, 0)
    aps = jax.vmap(_average_precision, in_axes=(1, 1))(scores, targets)
    return jnp.nanmean(aps)


def batch_accuracy(task: str, logits: jax.Array, labels: jax.Array, mask: jax.Array) -> jax.Array:
    """The reference's per-batch ``acc`` in [0, 1]: mAP (multi-label) or top-1 accuracy."""
    if task == "multilabel":
        return batch_map(logits, labels, mask)
    return masked_mean((jnp.argmax(logits, -1) == labels).astype(jnp.float32), mask)


def distance(kind: str, a: jax.Array, b: jax.Array) -> jax.Array:
    """``F.smooth_l1_loss`` (beta 1), ``F.l1_loss`` or ``F.mse_loss`` of two scalars."""
    d = a - b
    if kind == "smooth_l1":
        return jnp.where(jnp.abs(d) < 1.0, 0.5 * d * d, jnp.abs(d) - 0.5)
    if kind == "l1":
        return jnp.abs(d)
    if kind == "l2":
        return d * d
    raise ValueError(f"unknown distance {kind!r}; expected one of {DISTANCES}")


def weighted_loss(task: str, logits, labels, mask, use_accs: bool) -> jax.Array:
    """``A(logits, y, acc)``: the task loss scaled by ``1 - acc`` (acc a constant)."""
    loss = task_loss(task, logits, labels, mask)
    if use_accs:
        loss = loss * (1.0 - jax.lax.stop_gradient(batch_accuracy(task, logits, labels, mask)))
    return loss


def kl_mean(student_logits, teacher_logits, mask, temperature: float = 4.0) -> jax.Array:
    """``F.kl_div(log_softmax(s/T), softmax(t/T))`` with 'mean' reduction (batch x classes)."""
    log_p = jax.nn.log_softmax(_f32(student_logits) / temperature, -1)
    log_q = jax.nn.log_softmax(_f32(teacher_logits) / temperature, -1)
    return masked_mean(jnp.exp(log_q) * (log_q - log_p), mask)


def forget_objective(task: str, loss_type: str, dist: str, use_accs: bool, *, u_f, y_f, m_f,
                     u_v, o_v, y_v, m_v, u_r=None, o_r=None, y_r=None, m_r=None,
                     o_f=None) -> jax.Array:
    """``L_b`` of one forget batch for ``loss_type`` (see the module docstring)."""
    if loss_type == "scrub":
        bce = task_loss("multilabel", u_r, y_r if y_r.ndim == 2 else jax.nn.one_hot(
            y_r, u_r.shape[-1]), m_r)
        return (0.99 * bce + 0.001 * 16.0 * kl_mean(u_r, o_r, m_r)
                - 16.0 * kl_mean(u_f, o_f, m_f))
    a_f = weighted_loss(task, u_f, y_f, m_f, use_accs)
    o_v = jax.lax.stop_gradient(o_v)
    a_ov = jax.lax.stop_gradient(weighted_loss(task, o_v, y_v, m_v, use_accs))
    if loss_type == "rev":
        a_uv = weighted_loss(task, u_v, y_v, m_v, use_accs)  # keeps its gradient
    else:
        a_uv = weighted_loss(task, jax.lax.stop_gradient(u_v), y_v, m_v, use_accs)
    terms = []
    if loss_type in ("full", "original"):
        terms.append(distance(dist, a_f, a_ov))
    if loss_type in ("full", "unlearned", "rev"):
        terms.append(distance(dist, a_f, jax.lax.stop_gradient(a_uv)))
    if loss_type == "rev":
        terms.append(distance(dist, a_uv, a_ov))
    if not terms:
        raise ValueError(f"unknown loss_type {loss_type!r}; expected one of {LOSS_TYPES}")
    return sum(terms)
