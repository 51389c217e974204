"""Ensembles of pretrained or retrained models trained together, in one compiled program.

The per-person likelihood-ratio test (``mia/ulira.py``) needs many models of each kind: K
retrained models (the oracle's distribution) and K pretrained models that a method is applied
to. Trained one at a time they cost K trainings; here the K members share one jitted step,
``jax.vmap`` of the training step of ``train.py`` over a leading member axis of parameters,
optimiser state and batches, so the accelerator sees one program with K times the work.

Member ``k`` is exactly the model trained alone with its own seed: its initial parameters, its
data order and its augmentation are those of a study with that training seed (the caller makes
them: ``iterators[k]`` and ``params[k]``); the learning-rate schedule is the same for all. Each
member keeps its own best-by-validation parameters, as ``train.fit`` does for one model.

``stack`` / ``member`` convert between a list of parameter trees and one stacked tree.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from oneshui_jax import interrupts, optim
from oneshui_jax import train as train_lib
from oneshui_jax.errors import TrainingDiverged
from oneshui_jax.models import vit

Params = Any


def stack(trees: Sequence[Any]) -> Any:
    """One tree whose leaves have a leading member axis, from K trees of equal structure."""
    return jax.tree.map(lambda *leaves: jnp.stack(leaves), *trees)


def member(tree: Any, k: int) -> Any:
    """Member ``k`` of a stacked tree."""
    return jax.tree.map(lambda leaf: leaf[k], tree)


@functools.lru_cache(maxsize=8)
def ensemble_step(model_cfg: vit.ViTConfig, step_cfg: train_lib.TrainConfig):
    """``(tx, step)``: ``step(params[K], opt_state[K], batch[K], lr)`` is ``train.fit``'s step
    mapped over the members and compiled once per (model, settings)."""
    tx = optim.make(step_cfg.optimizer, step_cfg.weight_decay, step_cfg.momentum)
    inner = train_lib.train_step_fn(model_cfg, step_cfg, tx)
    return tx, jax.jit(jax.vmap(inner, in_axes=(0, 0, 0, None)), donate_argnums=(0, 1))


@dataclasses.dataclass
class EnsembleResult:
    params: Params  # stacked best-by-validation parameters, one per member
    best_epochs: list[int]
    histories: list[list[dict[str, float]]]
    seconds: float
    images_per_s: float  # over every member, the whole run


def fit(model_cfg: vit.ViTConfig, cfg: train_lib.TrainConfig, params: Sequence[Params],
        iterators: Sequence[Any], steps_per_epoch: int,
        validate: Callable[[Params], dict[str, Any]], *, desc: str = "ensemble") -> EnsembleResult:
    """Trains ``len(params)`` members together (module docstring): member ``k`` from
    ``params[k]`` on the batches of ``iterators[k]``; ``validate`` scores one member's
    parameters after every epoch (``{"loss", "metric"}``). A non-finite mean loss of any member
    raises ``TrainingDiverged`` naming it."""
    if len(params) != len(iterators) or not params:
        raise ValueError(f"an ensemble needs one iterator per member: {len(params)} members, "
                         f"{len(iterators)} iterators")
    step_cfg = dataclasses.replace(cfg, epochs=1, batch_size=1, lr=1.0, warmup_epochs=0)
    tx, step_fn = ensemble_step(model_cfg, step_cfg)
    k = len(params)
    state = stack([jax.tree.map(jnp.copy, p) for p in params])
    opt_state = jax.vmap(tx.init)(state)
    best = jax.tree.map(jnp.copy, state)
    best_metric, best_epochs = [0.0] * k, [-1] * k
    histories: list[list[dict[str, float]]] = [[] for _ in range(k)]
    start, step, seen = time.perf_counter(), 0, 0
    for epoch in range(cfg.epochs):
        losses = []
        for _ in range(steps_per_epoch):
            interrupts.check()
            hosts = [next(it) for it in iterators]
            batch = {n: np.stack([h[n] for h in hosts]) for n in ("image", "label", "mask")}
            lr = optim.reference_lr(step, base_lr=cfg.lr, steps_per_epoch=steps_per_epoch,
                                    epochs=cfg.epochs, warmup_epochs=cfg.warmup_epochs)
            state, opt_state, out = step_fn(state, opt_state, batch, jnp.float32(lr))
            losses.append(out["loss"])
            seen += int(np.sum(batch["mask"]))
            step += 1
        train_loss = np.mean(np.asarray(jax.device_get(losses)), axis=0)  # [K]
        for m in range(k):
            if not np.isfinite(train_loss[m]):
                raise TrainingDiverged(f"{desc}: member {m}'s training loss became "
                                       f"{train_loss[m]} in epoch {epoch}; lower "
                                       f"config.train.lr={cfg.lr:g}")
            val = validate(member(state, m))
            histories[m].append({"epoch": epoch, "step": step,
                                 "train_loss": float(train_loss[m]), "val_loss": val["loss"],
                                 "val_metric": val["metric"], "lr": lr})
            if val["metric"] > best_metric[m]:
                best_metric[m], best_epochs[m] = float(val["metric"]), epoch
                best = jax.tree.map(lambda b, s, m=m: b.at[m].set(s[m]), best, state)
        logging.info("%s epoch %d: train loss %s", desc, epoch,
                     " ".join(f"{x:.4f}" for x in train_loss))
    for m in range(k):  # no epoch beat 0 (train.fit keeps the last parameters then)
        if best_epochs[m] < 0:
            best = jax.tree.map(lambda b, s, m=m: b.at[m].set(s[m]), best, state)
            best_epochs[m] = cfg.epochs - 1
    seconds = time.perf_counter() - start
    return EnsembleResult(best, best_epochs, histories, seconds, seen / max(seconds, 1e-9))
