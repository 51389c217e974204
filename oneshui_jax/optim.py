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


def reference_lr(step: int, *, base_lr: float, steps_per_epoch: int, epochs: int,
                 warmup_epochs: int = 2, t_max: float | None = None) -> float:
    """Learning rate of global batch ``step`` (0-based) under the reference's schedule."""
    epoch = step // steps_per_epoch
    warmup_steps = warmup_epochs * steps_per_epoch
    if epoch < warmup_epochs:
        return base_lr * step / (warmup_steps + 1e-8)
    t_max = epochs if t_max is None else min(t_max, epochs)
    return base_lr * (1.0 + math.cos(math.pi * (epoch - warmup_epochs) / t_max)) / 2.0
