"""Optimisers and learning-rate schedules of the reference (SPEC.md 4.2, Q16).

Pretrain / retrain use torch's SGD (momentum 0.9, no Nesterov, weight decay added to the gradient of
*every* parameter): ``add_decayed_weights(wd) -> trace(0.9)``, and the step ``p -= lr * update``
is applied by the caller with the learning rate passed in as an array (no recompilation when it
changes).

Schedule (``engine.train`` with ``WarmUpLR`` and ``CosineAnnealingLR`` stepped per epoch): global
batch ``k`` of the first ``warmup_epochs`` epochs uses ``base * k / (T + 1e-8)`` with
``T = warmup_epochs * steps_per_epoch`` (so the very first batch has lr 0), and epoch
``e >= warmup_epochs`` uses ``base * (1 + cos(pi * (e - warmup_epochs) / t_max)) / 2`` with
``t_max = epochs``: the schedule never reaches 0 (30 epochs: the last one runs at 2.45% of base).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax


def sgd(weight_decay: float, momentum: float = 0.9) -> optax.GradientTransformation:
    """torch.optim.SGD(momentum, weight_decay) without the learning-rate scale."""
    return optax.chain(optax.add_decayed_weights(weight_decay), optax.trace(decay=momentum))


def adamw(weight_decay: float, b1: float = 0.9, b2: float = 0.999,
          eps: float = 1e-8) -> optax.GradientTransformation:
    """torch.optim.AdamW (decoupled decay ``lr * wd * p``) without the learning-rate scale."""
    return optax.chain(optax.scale_by_adam(b1=b1, b2=b2, eps=eps),
                       optax.add_decayed_weights(weight_decay))


OPTIMIZERS = ("sgd", "adamw")


def make(name: str, weight_decay: float, momentum: float = 0.9) -> optax.GradientTransformation:
    """The optimiser called ``name``: ``sgd`` (the reference's, default) or ``adamw``."""
    if name == "sgd":
        return sgd(weight_decay, momentum)
    if name == "adamw":
        return adamw(weight_decay)
    raise ValueError(f"unknown optimizer {name!r}; expected one of {OPTIMIZERS}")


def epoch_cosine(lr: float, epoch: int, epochs: int) -> float:
    """``lr (1 + cos(π e / E)) / 2``: torch's ``CosineAnnealingLR(T_max=E)`` stepped once per
    epoch, the learning rate of epoch ``e`` (0-based) of the reference's unlearning methods."""
    return lr * (1.0 + math.cos(math.pi * epoch / epochs)) / 2.0


def reference_lr(step: int, *, base_lr: float, steps_per_epoch: int, epochs: int,
                 warmup_epochs: int = 2, t_max: float | None = None) -> float:
    """Learning rate of global batch ``step`` (0-based) under the reference's schedule."""
    epoch = step // steps_per_epoch
    warmup_steps = warmup_epochs * steps_per_epoch
    if epoch < warmup_epochs:
        return base_lr * step / (warmup_steps + 1e-8)
    t_max = epochs if t_max is None else min(t_max, epochs)
    return base_lr * (1.0 + math.cos(math.pi * (epoch - warmup_epochs) / t_max)) / 2.0


class TorchAMSGradState(NamedTuple):
    """State of :func:`torch_adamw_amsgrad`: torch's ``step``, ``exp_avg``, ``exp_avg_sq`` and
    ``max_exp_avg_sq`` (the running max of the *raw*, not bias-corrected, second moment)."""

    count: jax.Array
    mu: optax.Updates
    nu: optax.Updates
    nu_max: optax.Updates


def torch_adamw_amsgrad(weight_decay: float = 0.0, b1: float = 0.9, b2: float = 0.999,
                        eps: float = 1e-8) -> optax.GradientTransformation:
    """torch.optim.AdamW(amsgrad=True) without the learning-rate scale (SPEC.md 6.4, Q29).

    MetaUnlearn's meta-net optimiser. torch's step ``t`` (``_single_tensor_adam``) is::

        p      <- p * (1 - lr * wd)
        m      <- m + (g - m) * (1 - b1);   v <- v * b2 + (1 - b2) * g**2
        v_max  <- max(v_max, v)                       # raw second moment
        p      <- p - lr / (1 - b1**t) * m / (sqrt(v_max) / sqrt(1 - b2**t) + eps)

    so the update returned here is ``wd * p + m / ((1 - b1**t) * (sqrt(v_max / (1 - b2**t)) +
    eps))`` and the caller's ``p - lr * update`` is torch's step. optax's ``scale_by_amsgrad``
    takes the max of the *bias-corrected* second moment instead, which differs in early steps.
    The bias corrections are computed as ``-expm1(t * log(b))`` (float32 ``b**t`` loses about
    1e-6 relative at ``b2 = 0.999``; torch computes them in float64). The state is a NamedTuple
    of arrays (checkpointable); ``params`` must be passed to ``update`` when ``weight_decay``
    is not 0.
    """
    log_b1, log_b2 = math.log(b1), math.log(b2)

    def init_fn(params):
        zeros = lambda: jax.tree.map(jnp.zeros_like, params)
        return TorchAMSGradState(count=jnp.zeros([], jnp.int32), mu=zeros(), nu=zeros(),
                                 nu_max=zeros())

    def update_fn(updates, state, params=None):
        if weight_decay != 0.0 and params is None:
            raise ValueError("torch_adamw_amsgrad with weight_decay != 0 needs params in update")
        count = optax.safe_increment(state.count)
        t = count.astype(jnp.float32)
        bc1 = -jnp.expm1(t * jnp.float32(log_b1))
        bc2 = -jnp.expm1(t * jnp.float32(log_b2))
        mu = jax.tree.map(lambda m, g: m + (g - m) * (1.0 - b1), state.mu, updates)
        nu = jax.tree.map(lambda v, g: v * b2 + (1.0 - b2) * g * g, state.nu, updates)
        nu_max = jax.tree.map(jnp.maximum, state.nu_max, nu)
        steps = jax.tree.map(
            lambda m, v: (m / ((jnp.sqrt(v) / jnp.sqrt(bc2) + eps) * bc1)).astype(m.dtype),
            mu, nu_max)
        if weight_decay != 0.0:
            steps = jax.tree.map(lambda s, p: s + weight_decay * p, steps, params)
        return steps, TorchAMSGradState(count=count, mu=mu, nu=nu, nu_max=nu_max)

    return optax.GradientTransformation(init_fn, update_fn)
