"""Meta-training MetaUnlearn on simulated requests (SPEC.md 6.4), the body of its ``prepare``.

``meta_train`` walks the simulated requests of every epoch (``TrainData.simulated_requests`` drawn
``simulated_draws_per_epoch`` times from a ``random.Random(seed)``, the second draw used, as the
reference does) and takes one meta-step per request on the batches of
``unlearn.simulated.request_batches``: support images (eval transform), the request's forget
images shuffled into batches of ``batch_size``, each paired with one validation batch from a
shuffled pass over VAL (and, for ``use_retain`` or ``loss_type="scrub"``, one retain batch). The
meta-loss, its optimiser state and the position (epoch, request) are checkpointed through
``data.checkpointer``, so a killed run resumes where it stopped.
"""

from __future__ import annotations

import dataclasses
import random
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from tqdm.auto import tqdm

from oneshui_jax.models import meta_loss
from oneshui_jax.unlearn import api, simulated
from oneshui_jax.unlearn import meta_unlearn as mu

CHECKPOINT_EVERY = 50  # meta-steps between saves of the meta-training state


@dataclasses.dataclass
class MetaTrainResult:
    phi: Any
    phi_retain: Any | None
    history: list[dict]
    seconds: float


def _request_data(data: api.TrainData, request, cfg: mu.Config, rows,
                  rng: np.random.Generator):
    """Support, forget, val (and retain) batches of one simulated request."""
    return simulated.request_batches(
        data, request, batch_size=cfg.batch_size, support_size=cfg.num_identities_simulation,
        rows=rows, rng=rng, retain=cfg.use_retain or cfg.loss_type == "scrub",
        retain_train_aug=cfg.use_train_aug)


def meta_train(model: api.Model, theta, data: api.TrainData, cfg: mu.Config,
               ml_cfg: meta_loss.MetaLossConfig, rng: jax.Array,
               checkpoint_every: int = CHECKPOINT_EVERY) -> MetaTrainResult:
    """Meta-trains the forget (and optional retain) meta-loss on ``theta``; resumable.

    With ``data.checkpointer`` the state is saved every ``checkpoint_every`` requests and at the
    end of every epoch; a run that finds a saved state continues from it with the same result.
    ``rng`` draws the meta-loss initialisation and dropout; ``data.seed`` the request stream.
    """
    seed, checkpointer, progress = data.seed, data.checkpointer, data.progress
    rows = mu.identity_rows(list(data.train_identities))
    tx = mu.optimizer(cfg)
    key = rng
    phi = meta_loss.init_params(ml_cfg, jax.random.fold_in(key, 1))
    arrays = {"phi": phi, "opt_state": tx.init(phi)}
    if cfg.use_retain:
        phi_r = meta_loss.init_params(ml_cfg, jax.random.fold_in(key, 2))
        arrays.update(phi_retain=phi_r, opt_state_retain=tx.init(phi_r))
    state = {"epoch": 0, "request": 0, "history": []}
    restored = checkpointer.restore(arrays) if checkpointer is not None else None
    if restored is not None:
        arrays, state = restored
        logging.info("meta_unlearn: resuming at epoch %d, request %d", state["epoch"],
                     state["request"])
    step = mu.meta_step(model.vit, ml_cfg, cfg)
    retain_step = (mu.meta_step(model.vit, ml_cfg, cfg, mu.retain_batch_loss)
                   if cfg.use_retain else None)
    py_rng = random.Random(seed)
    start = time.perf_counter()
    for epoch in range(cfg.epochs):
        for _ in range(cfg.simulated_draws_per_epoch):  # replayed on resume: same stream
            requests = data.simulated_requests(cfg.num_identities_simulation, py_rng)
        if epoch < state["epoch"]:
            continue
        lr = jnp.float32(cfg.lr_at(epoch))
        first = state["request"] if epoch == state["epoch"] else 0
        bar = tqdm(total=len(requests), initial=first, desc=f"meta_unlearn epoch {epoch}",
                   unit="request", disable=not progress, dynamic_ncols=True, leave=False)
        losses = []
        for i in range(first, len(requests)):
            data_rng = np.random.default_rng([seed, epoch, i])
            support, forget, val, retain = _request_data(data, requests[i], cfg, rows, data_rng)
            step_rng = jax.random.fold_in(jax.random.fold_in(key, 1000 + epoch), i)
            arrays["phi"], arrays["opt_state"], stats, theta_u = step(
                theta, arrays["phi"], arrays["opt_state"], lr, support, forget, val, retain,
                step_rng)
            if retain_step is not None:
                arrays["phi_retain"], arrays["opt_state_retain"], _, _ = retain_step(
                    theta_u, arrays["phi_retain"], arrays["opt_state_retain"], lr, support,
                    forget, val, retain, jax.random.fold_in(step_rng, 1))
            losses.append(float(stats["loss"]))
            if not np.isfinite(losses[-1]):
                raise FloatingPointError(
                    f"meta_unlearn: the outer loss became {losses[-1]} (epoch {epoch}, request "
                    f"{i}); lower config.meta_unlearn.lr or meta_lr.")
            bar.update(1)
            bar.set_postfix(loss=f"{np.mean(losses[-20:]):.4f}",
                            meta_loss=f"{float(stats['meta_loss']):.4f}")
            state.update(epoch=epoch, request=i + 1)
            if checkpointer is not None and (i + 1) % checkpoint_every == 0:
                checkpointer.save(epoch * 1_000_000 + i + 1, arrays, state)
        bar.close()
        record = {"epoch": epoch, "outer_loss": float(np.mean(losses)) if losses else None,
                  "lr": float(lr), "requests": len(requests)}
        state["history"].append(record)
        logging.info("meta_unlearn epoch %d: outer loss %s over %d requests", epoch,
                     record["outer_loss"], len(requests))
        state.update(epoch=epoch + 1, request=0)
        if checkpointer is not None:
            checkpointer.save((epoch + 1) * 1_000_000, arrays, state)
    return MetaTrainResult(arrays["phi"], arrays.get("phi_retain"), state["history"],
                           time.perf_counter() - start)
