"""Meta-training MetaUnlearn on simulated requests, and its study stage (SPEC.md 6.4-6.5).

``meta_train`` walks the simulated requests of every epoch (``splits.simulated_requests`` drawn
``simulated_draws_per_epoch`` times from a ``random.Random(seed)``, the second draw used, as the
reference does) and takes one meta-step per request: support images (eval transform), the
request's forget images shuffled into batches of ``batch_size``, each paired with one validation
batch from a shuffled pass over VAL (and, for ``use_retain`` or ``loss_type="scrub"``, one
retain batch). The meta-loss, its optimiser state and the position (epoch, request) are
checkpointed, so a killed run resumes where it stopped.

``run_stage`` is the study's ``meta_unlearn`` method: meta-train on the pretrained model, then
unlearn the real request from its support images alone and evaluate.
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

from oneshui_jax import splits as splits_lib
from oneshui_jax.data import pipeline
from oneshui_jax.models import meta_loss
from oneshui_jax.unlearn import meta_unlearn as mu

CHECKPOINT_EVERY = 50  # meta-steps between saves of the meta-training state


def load_batches(source, indices: np.ndarray, pcfg: pipeline.PipelineConfig,
                 rows: dict[int, int] | None = None, train: bool = False,
                 num_batches: int | None = None) -> dict[str, jax.Array]:
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


def support_batch(source, indices, image_size: int, rows: dict[int, int],
                  size: int | None = None) -> dict[str, jax.Array]:
    """The support images as one batch (eval transform), padded to ``size`` if given."""
    pcfg = pipeline.PipelineConfig(image_size=image_size,
                                   batch_size=max(size or len(indices), len(indices)))
    return jax.tree.map(lambda x: x[0], load_batches(source, np.asarray(indices), pcfg, rows))


@dataclasses.dataclass
class MetaTrainResult:
    phi: Any
    phi_retain: Any | None
    history: list[dict]
    seconds: float


def _request_data(ctx, request, cfg: mu.MetaUnlearnConfig, rows, rng: np.random.Generator):
    """Support, forget, val (and retain) batches of one simulated request."""
    source, size = ctx.dataset.source, ctx.config.data.image_size
    pcfg = pipeline.PipelineConfig(image_size=size, batch_size=cfg.batch_size,
                                   seed=int(rng.integers(2**31)))
    support = support_batch(source, request.support, size, rows,
                            size=cfg.num_identities_simulation)
    forget = load_batches(source, rng.permutation(np.asarray(request.forget)), pcfg)
    num = forget["mask"].shape[0]
    val = load_batches(source, rng.permutation(ctx.images["val"]), pcfg, num_batches=num)
    retain = None
    if cfg.use_retain or cfg.loss_type == "scrub":
        retain_idx = splits_lib.retain_images(ctx.dataset.annotations, ctx.splits, request)
        retain = load_batches(source, rng.permutation(retain_idx), pcfg,
                              train=ctx.config.meta_unlearn.use_train_aug, num_batches=num)
    return support, forget, val, retain


def meta_train(ctx, theta, cfg: mu.MetaUnlearnConfig, ml_cfg: meta_loss.MetaLossConfig,
               checkpointer=None, progress: bool = True,
               checkpoint_every: int = CHECKPOINT_EVERY) -> MetaTrainResult:
    """Meta-trains the forget (and optional retain) meta-loss on ``theta``; resumable.

    With a ``checkpointer`` the state is saved every ``checkpoint_every`` requests and at the end
    of every epoch; a run that finds a saved state continues from it with the same result.
    """
    seed = ctx.config.seed
    rows = mu.identity_rows(ctx.splits.train)
    tx = mu.optimizer(cfg)
    key = jax.random.key(seed)
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
    step = mu.make_meta_step(ctx.model_cfg, ml_cfg, cfg, tx)
    retain_step = (mu.make_meta_step(ctx.model_cfg, ml_cfg, cfg, tx, mu.retain_batch_loss)
                   if cfg.use_retain else None)
    py_rng = random.Random(seed)
    start = time.perf_counter()
    for epoch in range(cfg.epochs):
        for _ in range(cfg.simulated_draws_per_epoch):  # replayed on resume: same stream
            requests = splits_lib.simulated_requests(ctx.dataset.annotations, ctx.splits,
                                                     cfg.num_identities_simulation, py_rng)
        if epoch < state["epoch"]:
            continue
        lr = jnp.float32(cfg.lr_at(epoch))
        first = state["request"] if epoch == state["epoch"] else 0
        bar = tqdm(total=len(requests), initial=first, desc=f"meta_unlearn epoch {epoch}",
                   unit="request", disable=not progress, dynamic_ncols=True, leave=False)
        losses = []
        for i in range(first, len(requests)):
            data_rng = np.random.default_rng([seed, epoch, i])
            support, forget, val, retain = _request_data(ctx, requests[i], cfg, rows, data_rng)
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


def configs_from(ctx) -> tuple[mu.MetaUnlearnConfig, meta_loss.MetaLossConfig]:
    """MetaUnlearn and meta-loss configs from the study config's ``meta_unlearn`` block."""
    c = ctx.config.meta_unlearn
    cfg = mu.MetaUnlearnConfig(
        task=ctx.dataset.task, epochs=c.epochs, lr=c.lr, weight_decay=c.weight_decay,
        meta_lr=c.meta_lr, batch_size=c.batch_size,
        num_identities_simulation=c.num_identities_simulation, forget_epochs=c.forget_epochs,
        forget_loss=c.forget_loss, loss_type=c.loss_type, use_accs=c.use_accs,
        use_retain=c.use_retain, compute_dtype=c.compute_dtype,
        simulated_draws_per_epoch=c.simulated_draws_per_epoch)
    ml_cfg = meta_loss.MetaLossConfig.for_vit(
        ctx.model_cfg, num_identities=len(ctx.splits.train), task=ctx.dataset.task,
        hidden_size=c.hidden_size, num_layers=c.num_layers, dropout=c.dropout,
        use_feats=c.use_feats, use_ids=c.use_ids, use_targets=c.use_targets)
    return cfg, ml_cfg


def run_stage(ctx, base_params, run_dir: str) -> tuple[Any, dict]:
    """The study's ``meta_unlearn`` method: meta-train, then unlearn the real request.

    Saves the trained meta-loss to ``run_dir/meta_loss`` (``meta_loss_retain`` with
    ``use_retain``); returns the unlearned parameters and what goes into the record / metadata.
    """
    from oneshui_jax import checkpoints

    cfg, ml_cfg = configs_from(ctx)
    with checkpoints.TrainCheckpointer(run_dir) as checkpointer:
        result = meta_train(ctx, base_params, cfg, ml_cfg, checkpointer,
                            progress=ctx.config.progress)
    hashes = {"meta_loss": checkpoints.save_tree(run_dir, "meta_loss", result.phi)}
    if result.phi_retain is not None:
        hashes["meta_loss_retain"] = checkpoints.save_tree(run_dir, "meta_loss_retain",
                                                           result.phi_retain)
    rows = mu.identity_rows(ctx.splits.train)
    support = support_batch(ctx.dataset.source, ctx.splits.support, ctx.config.data.image_size,
                            rows)
    step = mu.make_unlearn_step(ctx.model_cfg, ml_cfg, cfg.meta_lr)
    jax.block_until_ready(mu.unlearn(step, base_params, result.phi, support, cfg.forget_epochs,
                                     result.phi_retain))  # compile
    start = time.perf_counter()
    params = jax.block_until_ready(mu.unlearn(step, base_params, result.phi, support,
                                              cfg.forget_epochs, result.phi_retain))
    unlearn_seconds = time.perf_counter() - start
    record = {"meta_train_seconds": result.seconds, "unlearn_seconds": unlearn_seconds,
              "meta_history": result.history}
    metadata = {"meta_unlearn": dataclasses.asdict(cfg), "meta_loss": dataclasses.asdict(ml_cfg),
                "meta_loss_hashes": hashes}
    return params, {"record": record, "metadata": metadata}
