"""Meta-training MetaUnlearn on simulated requests (SPEC.md 6.4): the method's ``prepare``.

``prepare`` meta-trains the meta-loss (``meta_train``) before any request, while the training
data is still there, and returns its artifacts (``phi``, the identity of each embedding row, the
request-time step factor) and the record of the run.

``meta_train`` walks the simulated requests of every epoch (``TrainData.simulated_requests`` drawn
``simulated_draws_per_epoch`` times from a ``random.Random(seed)``, the second draw used, as the
reference does) and takes one meta-step per request on the batches of
``unlearn.simulated.request_batches``: support images (eval transform), the request's forget
images shuffled into batches of ``batch_size``, each paired with one validation batch from a
shuffled pass over VAL (and, for ``use_retain`` or ``loss_type="scrub"``, one retain batch). The
meta-loss, its optimiser state and the position (epoch, request) are checkpointed through
``data.checkpointer``, so a killed run resumes where it stopped. ``data.writer``
(``metric_writer``) gets ``meta_train/outer_loss`` and ``meta_train/meta_loss`` per request and
each epoch's record as ``meta_epoch/<key>``, at the number of requests done.

With ``validation_requests`` > 0, ``validation_identities`` first sets aside that many simulated
requests' worth of TRAIN identities outside the real request (``TrainData.holdout_identities``);
meta-training draws its requests from the others. After every epoch (and once before the first)
``diagnostics`` measures the learned step on these held-out requests; the history records it.
``step_control`` line_search / normalize then picks the request-time factor of the step on them.
``requests_per_update`` > 1 averages that many requests' meta-gradients per update of φ.

Every request's outer batches are padded to the largest ``K`` of the stage (all epochs' requests
and the held-out ones, known before the first step), so the meta-step, the diagnostics and the
line search compile once per stage; padded batches are skipped (``core.meta_gradient``), so the
result is the unpadded one.
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

from oneshui_jax import interrupts, metric_writer, sharding
from oneshui_jax.errors import check_finite
from oneshui_jax.models import meta_loss
from oneshui_jax.unlearn import api
from oneshui_jax.unlearn.meta_unlearn import core as mu
from oneshui_jax.unlearn.meta_unlearn import diagnostics as meta_diagnostics

CHECKPOINT_EVERY = 50  # meta-steps between saves of the meta-training state


@dataclasses.dataclass
class MetaTrainResult:
    phi: Any
    phi_retain: Any | None
    history: list[dict]
    seconds: float
    step_scale: float = 1.0  # the request-time factor of the step (line search; 1: none)
    line_search: list[dict] | None = None  # [{"scale", "outer_loss"}] on the held-out requests
    # The held-out identities and requests (counts) and the diagnostics before meta-training.
    validation: dict | None = None


MAX_HELD_OUT = 0.25  # at most this share of the TRAIN identities outside the request


def validation_identities(data: api.TrainData, cfg: mu.Config) -> tuple[int, ...]:
    """The TRAIN identities held out of meta-training: ``validation_requests x
    num_identities_simulation`` of ``data.holdout_identities`` (never a person of the real
    request), at most ``MAX_HELD_OUT`` of them (a warning says when fewer are held out), drawn
    with ``data.seed``, in the TRAIN order. Empty when ``validation_requests`` is 0.
    """
    wanted = cfg.validation_requests * cfg.num_identities_simulation
    pool = sorted(data.holdout_identities)
    count = min(wanted, int(MAX_HELD_OUT * len(pool)))
    if wanted and count < wanted:
        logging.warning("meta_unlearn: %d of the %d identities validation_requests=%d asks for "
                        "are held out (at most %d%% of the %d TRAIN identities outside the "
                        "request)", count, wanted, cfg.validation_requests,
                        round(100 * MAX_HELD_OUT), len(pool))
    if count == 0:
        return ()
    rng = np.random.default_rng([data.seed, 0x5E1EC7])
    chosen = set(rng.choice(np.asarray(pool), size=count, replace=False).tolist())
    return tuple(i for i in data.train_identities if i in chosen)


def _validation_requests(data, cfg, identities):
    """The held-out requests (deterministic in ``data.seed``)."""
    size = min(cfg.num_identities_simulation, len(identities))
    return data.simulated_requests(size, random.Random(data.seed + 7919), identities=identities)


def _validation_batches(data, cfg, rows, requests, num_batches):
    """The held-out requests' batches, made once."""
    return [_request_data(data, r, cfg, rows, np.random.default_rng([data.seed, 7919, i]),
                          num_batches) for i, r in enumerate(requests)]


def request_stream(data: api.TrainData, cfg: mu.Config, identities) -> list[list]:
    """Every epoch's simulated requests: ``simulated_draws_per_epoch`` draws from
    ``random.Random(seed)`` per epoch, the last one used (the reference's stream)."""
    py_rng, stream = random.Random(data.seed), []
    for _ in range(cfg.epochs):
        for _ in range(cfg.simulated_draws_per_epoch):
            requests = data.simulated_requests(cfg.num_identities_simulation, py_rng,
                                               identities=identities)
        stream.append(requests)
    return stream


def outer_batches(requests, batch_size: int) -> int:
    """The largest number of outer batches among ``requests`` (at least 1)."""
    from oneshui_jax.unlearn import simulated  # the input pipeline: see _request_data

    return max([simulated.outer_batches(len(r.forget), batch_size) for r in requests] + [1])


def diagnose(diag_fn, theta, phi, batches) -> dict[str, float]:
    """``meta_diagnostics.summarize`` of the learned step (factor 1) on the held-out batches."""
    raw = [jax.device_get(diag_fn(theta, phi, s, f, v, r, jnp.float32(1.0)))
           for s, f, v, r in batches]
    return meta_diagnostics.summarize(raw)


def line_search(losses_fn, theta, phi, batches, scales) -> tuple[float, list[dict]]:
    """The factor of ``scales`` with the lowest mean outer objective on the held-out batches."""
    grid = jnp.asarray(scales, jnp.float32)
    totals = np.zeros(len(scales))
    for s, f, v, r in batches:
        totals += np.asarray(losses_fn(theta, phi, s, f, v, r, grid), np.float64)
    mean = totals / max(len(batches), 1)
    best = float(scales[meta_diagnostics.choose_scale(scales, mean)])
    return best, [{"scale": float(a), "outer_loss": float(m)}
                  for a, m in zip(scales, mean, strict=True)]


def _request_data(data: api.TrainData, request, cfg: mu.Config, rows,
                  rng: np.random.Generator, num_batches: int | None = None):
    """Support, forget, val (and retain) batches of one simulated request, split over the mesh
    (``sharding``): the outer batches [K, B, ...] along B, the support along its rows.

    ``unlearn.simulated`` loads the input pipeline (grain): it is imported when meta-training
    runs, not with the method, whose request path (serving, the GPU benchmarks) does without it
    (as ``support_ascent.prepare`` does)."""
    from oneshui_jax.unlearn import simulated

    support, forget, val, retain = simulated.request_batches(
        data, request, batch_size=cfg.batch_size, support_size=cfg.num_identities_simulation,
        rows=rows, rng=rng, retain=cfg.use_retain or cfg.loss_type == "scrub",
        retain_train_aug=cfg.use_train_aug, num_batches=num_batches)
    outer = sharding.shard_batch((forget, val, retain), axis=1)
    return (sharding.shard_batch(support), *outer)


def _kept(checkpointer, saved: tuple[int, int] | None) -> str:
    """What a diverged meta-training kept: its last save (epoch, request, folder), if any."""
    if checkpointer is None or saved is None:
        return "nothing of this stage was saved"
    where = getattr(checkpointer, "directory", None)
    return (f"the last good state was kept: the save at epoch {saved[0]}, request {saved[1]}"
            f"{f' in {where}' if where else ''}")


def meta_train(model: api.Model, theta, data: api.TrainData, cfg: mu.Config,
               ml_cfg: meta_loss.MetaLossConfig, rng: jax.Array,
               checkpoint_every: int = CHECKPOINT_EVERY) -> MetaTrainResult:
    """Meta-trains the forget (and optional retain) meta-loss on ``theta``; resumable.

    With ``data.checkpointer`` the state is saved every ``checkpoint_every`` requests and at the
    end of every epoch; a run that finds a saved state continues from it with the same result.
    ``rng`` draws the meta-loss initialisation and dropout; ``data.seed`` the request stream.
    """
    seed, checkpointer, progress = data.seed, data.checkpointer, data.progress
    writer = getattr(data, "writer", None) or metric_writer.NoOpWriter()
    rows = mu.identity_rows(list(data.train_identities))
    tx = mu.optimizer(cfg)
    key = rng
    phi = meta_loss.init_params(ml_cfg, jax.random.fold_in(key, 1))
    arrays = {"phi": phi, "opt_state": tx.init(phi)}
    if cfg.use_retain:
        phi_r = meta_loss.init_params(ml_cfg, jax.random.fold_in(key, 2))
        arrays.update(phi_retain=phi_r, opt_state_retain=tx.init(phi_r))
    state = {"epoch": 0, "request": 0, "history": []}
    arrays = sharding.replicate(arrays)
    restored = checkpointer.restore(arrays) if checkpointer is not None else None
    saved = None  # (epoch, request) of the last save, for the message if the loss diverges
    if restored is not None:
        arrays, state = restored
        saved = (state["epoch"], state["request"])
        logging.info("meta_unlearn: resuming at epoch %d, request %d", state["epoch"],
                     state["request"])
    theta = sharding.replicate(theta)
    step = mu.meta_step(model.vit, ml_cfg, cfg)
    k = cfg.requests_per_update
    if k > 1:  # the meta-gradient and the update apart, to average k requests per update
        grad_step, update = mu.meta_grad(model.vit, ml_cfg, cfg), mu.meta_update(cfg)
    retain_step = (mu.meta_step(model.vit, ml_cfg, mu.retain_config(cfg), mu.retain_batch_loss)
                   if cfg.use_retain else None)
    held_out = validation_identities(data, cfg)
    held_set = set(held_out)
    train_pool = ([i for i in data.train_identities if i not in held_set]
                  if held_out else None)  # None: every TRAIN identity, the reference's stream
    stream = request_stream(data, cfg, train_pool)
    held_requests = _validation_requests(data, cfg, held_out) if held_out else []
    num_batches = outer_batches([r for rs in stream for r in rs] + held_requests,
                                cfg.batch_size)  # one K for the stage: one compilation
    validation = _validation_batches(data, cfg, rows, held_requests, num_batches)
    diag_fn, losses_fn = meta_diagnostics.jitted(model.vit, ml_cfg, cfg)
    if validation and "initial" not in state:
        state["initial"] = diagnose(diag_fn, theta, arrays["phi"], validation)
    start = time.perf_counter()
    for epoch, requests in enumerate(stream):
        if epoch < state["epoch"]:
            continue
        lr = jnp.float32(cfg.lr_at(epoch))
        first = state["request"] if epoch == state["epoch"] else 0
        bar = tqdm(total=len(requests), initial=first, desc=f"meta_unlearn epoch {epoch}",
                   unit="request", disable=not progress, dynamic_ncols=True, leave=False)
        losses, pending = [], []
        for i in range(first, len(requests)):
            interrupts.check()
            data_rng = np.random.default_rng([seed, epoch, i])
            support, forget, val, retain = _request_data(data, requests[i], cfg, rows, data_rng,
                                                         num_batches)
            step_rng = jax.random.fold_in(jax.random.fold_in(key, 1000 + epoch), i)
            if k == 1:
                arrays["phi"], arrays["opt_state"], stats, theta_u = step(
                    theta, arrays["phi"], arrays["opt_state"], lr, support, forget, val, retain,
                    step_rng)
            else:  # average k meta-gradients, then one update (the last group may be smaller)
                grad_phi, stats, theta_u = grad_step(theta, arrays["phi"], support, forget, val,
                                                     retain, step_rng)
                pending.append(grad_phi)
                if len(pending) == k or i + 1 == len(requests):
                    mean = jax.tree.map(lambda *g: sum(g) / len(g), *pending)
                    arrays["phi"], arrays["opt_state"] = update(arrays["phi"],
                                                                arrays["opt_state"], mean, lr)
                    pending = []
            if retain_step is not None:
                arrays["phi_retain"], arrays["opt_state_retain"], _, _ = retain_step(
                    theta_u, arrays["phi_retain"], arrays["opt_state_retain"], lr, support,
                    forget, val, retain, jax.random.fold_in(step_rng, 1))
            losses.append(float(stats["loss"]))
            meta_loss_now = float(stats["meta_loss"])  # fetched for the bar anyway
            writer.scalars(epoch * len(requests) + i + 1,
                           {"meta_train/outer_loss": losses[-1],
                            "meta_train/meta_loss": meta_loss_now})
            check_finite({"outer loss": losses[-1]}, where="meta_unlearn",
                         when=f"epoch {epoch} (epochs 0-{len(stream) - 1}), request {i}",
                         kept=_kept(checkpointer, saved),
                         advice=f"Lower config.meta_unlearn.lr ({cfg.lr:g}) or meta_lr "
                                f"({cfg.meta_lr:g})")
            bar.update(1)
            bar.set_postfix(loss=f"{np.mean(losses[-20:]):.4f}",
                            meta_loss=f"{meta_loss_now:.4f}")
            if pending:  # mid-group: a resume restarts at the group's first request
                continue
            state.update(epoch=epoch, request=i + 1)
            if checkpointer is not None and (i + 1) % checkpoint_every == 0:
                checkpointer.save(epoch * 1_000_000 + i + 1, arrays, state)
                saved = (epoch, i + 1)
        bar.close()
        record = {"epoch": epoch, "outer_loss": float(np.mean(losses)) if losses else None,
                  "lr": float(lr), "requests": len(requests)}
        if validation:
            record.update(diagnose(diag_fn, theta, arrays["phi"], validation))
        state["history"].append(record)
        writer.scalars((epoch + 1) * len(requests),
                       metric_writer.prefixed("meta_epoch", record, exclude=("epoch",)))
        writer.flush()
        logging.info("meta_unlearn epoch %d: outer loss %s over %d requests%s", epoch,
                     record["outer_loss"], len(requests), _diagnostics_text(record))
        state.update(epoch=epoch + 1, request=0)
        if checkpointer is not None:
            checkpointer.save((epoch + 1) * 1_000_000, arrays, state)
            saved = (epoch + 1, 0)
    scale, searched = 1.0, None
    if cfg.step_control != "none":
        scale, searched = line_search(losses_fn, theta, arrays["phi"], validation,
                                      cfg.step_scales)
        logging.info("meta_unlearn: line search on %d held-out requests picked the factor %g "
                     "(%s)", len(validation), scale,
                     ", ".join(f"{r['scale']:g}: {r['outer_loss']:.5f}" for r in searched))
    held = ({"identities": len(held_out), "requests": len(validation),
             "initial": state.get("initial")} if held_out else None)
    return MetaTrainResult(arrays["phi"], arrays.get("phi_retain"), state["history"],
                           time.perf_counter() - start, scale, searched, held)


def _diagnostics_text(record: dict) -> str:
    if "reduction_learned" not in record:
        return ""
    return (f"; held-out requests: the learned step removes "
            f"{100 * record['reduction_learned']:.1f}% of the outer objective (ascent of the "
            f"same length {100 * record['reduction_ascent']:.1f}%), relative step "
            f"{record['relative_step']:.2e}, {100 * record['dead_share']:.0f}% of portraits "
            f"give no step")


# ---------------------------------------------------------------------------------------------
# The method (unlearn/api.py), before the request: meta-training as ``prepare``


def prepare(model: api.Model, params: mu.Params, data: api.TrainData, cfg: mu.Config,
            rng: jax.Array) -> tuple[api.Artifacts, dict[str, Any]]:
    """Meta-trains the meta-loss on simulated requests of the TRAIN identities (SPEC.md 6.4).

    Artifacts: ``phi`` (and ``phi_retain`` with ``use_retain``), and ``train_identities`` (the
    identity id of each embedding row). Resumable through ``data.checkpointer``.
    """
    ml_cfg = mu.meta_loss_config(model, cfg, len(data.train_identities))
    result = meta_train(model, params, data, cfg, ml_cfg, rng)
    artifacts = {"phi": result.phi,
                 "train_identities": np.asarray(data.train_identities, np.int32),
                 "step_scale": np.asarray(result.step_scale, np.float32)}
    if result.phi_retain is not None:
        artifacts["phi_retain"] = result.phi_retain
    info = {"meta_history": result.history, "meta_train_seconds": result.seconds,
            "step_scale": result.step_scale}
    if result.line_search is not None:
        info["line_search"] = result.line_search
    if result.validation is not None:
        info["validation"] = result.validation
    return artifacts, info
