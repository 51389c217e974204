"""Pretraining and retraining (the oracle) of the task model, SPEC.md section 4.

``pretrain`` fits all TRAIN identities except the held-out support images; ``retrain`` fits the
RETAIN identities only, from the same initial weights. Both use the reference's recipe: SGD with
momentum and weight decay on every parameter, per-step warmup then per-epoch cosine
(``optim.reference_lr``), BCE-with-logits (multi-label) or cross-entropy (classification), bf16
compute with float32 parameters, validation after every epoch, and the best-by-validation
parameters kept (strictly better, starting from 0).

The step functions are pure and jit-compiled once per shape: every array, the learning rate
included, is an argument.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import time
from collections.abc import Callable, Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging
from tqdm.auto import tqdm

from oneshui_jax import files, interrupts, metric_writer, optim, ranges, sharding
from oneshui_jax import metrics as metrics_lib
from oneshui_jax.errors import ConfigError, TrainingDiverged
from oneshui_jax.losses import masked_mean, per_example_loss
from oneshui_jax.models import vit

Batch = dict[str, Any]
Params = Any


AP_SCORES = ("reference", "float32")
"""``config.train.ap_scores``: the scores of the mAP (:func:`ap_score_dtype`)."""

HALF_DTYPES = ("bfloat16", "float16")
"""Compute dtypes narrower than float32: autocast's numerics and the reference's score rule."""


def _check_ap_scores(ap_scores: str) -> None:
    if ap_scores not in AP_SCORES:
        raise ConfigError(f"config.train.ap_scores must be one of {AP_SCORES}, got "
                          f"{ap_scores!r}")


def ap_score_dtype(compute_dtype: str, ap_scores: str = "reference") -> str | None:
    """The dtype the mAP's sigmoid scores are rounded to: the compute dtype when it is narrower
    than float32 and ``ap_scores == "reference"`` (the reference's ``torch.sigmoid`` of bf16
    logits, SPEC Q4), else None (float64 scores; with float32 compute the two agree)."""
    _check_ap_scores(ap_scores)
    if ap_scores == "reference" and compute_dtype in HALF_DTYPES:
        return compute_dtype
    return None


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Pretrain / retrain hyper-parameters (SPEC.md 4.2 table)."""

    task: str  # "multilabel" | "classification"
    epochs: int = 30
    batch_size: int = 32
    lr: float = 1e-3
    weight_decay: float = 1e-4
    momentum: float = 0.9
    warmup_epochs: int = 2
    compute_dtype: str = "bfloat16"
    optimizer: str = "sgd"  # the reference's; "adamw" for from-scratch demos
    attention: str = "xla"  # "cudnn": fused attention on GPUs (vit.ATTENTION_IMPLEMENTATIONS)
    # jax.checkpoint per transformer block in the train step: less memory, ~1/3 more compute,
    # the same numbers (bench/remat_memory.py). Evaluation never needs it.
    remat: bool = False
    # The validation mAP's scores (ap_score_dtype): "reference" rounds sigmoid to the compute
    # dtype as the reference's autocast does (bf16 ties, SPEC Q4); "float32" does not.
    ap_scores: str = "reference"

    RANGES = {  # config.train's numeric settings (ranges.check_ranges); lr 0 would learn nothing
        "epochs": ranges.COUNT, "batch_size": ranges.COUNT, "lr": ranges.LEARNING_RATE,
        "weight_decay": ranges.NON_NEGATIVE, "momentum": ranges.MOMENTUM,
        "warmup_epochs": ranges.COUNT_OR_ZERO,
    }

    @property
    def score_dtype(self) -> str | None:
        """What the validation mAP's scores are rounded to (:func:`ap_score_dtype`)."""
        return ap_score_dtype(self.compute_dtype, self.ap_scores)

    def __post_init__(self):
        if self.task not in ("multilabel", "classification"):
            raise ConfigError(f"task must be 'multilabel' or 'classification', got {self.task!r}")
        if self.optimizer not in optim.OPTIMIZERS:
            raise ConfigError(f"config.train.optimizer must be one of {optim.OPTIMIZERS}, "
                              f"got {self.optimizer!r}")
        if self.attention not in vit.ATTENTION_IMPLEMENTATIONS:
            raise ConfigError(f"config.train.attention must be one of "
                              f"{vit.ATTENTION_IMPLEMENTATIONS}, got {self.attention!r}")
        if not isinstance(self.remat, bool):
            raise ConfigError(f"config.train.remat must be True or False, got {self.remat!r}")
        ranges.check_ranges(self, "config.train")
        _check_ap_scores(self.ap_scores)
        try:
            jnp.dtype(self.compute_dtype)
        except TypeError:
            raise ConfigError(f"config.train.compute_dtype {self.compute_dtype!r} is not a "
                              "dtype (use 'float32' or 'bfloat16')") from None


def make_train_step(model_cfg: vit.ViTConfig, cfg: TrainConfig,
                    tx: optax.GradientTransformation) -> Callable:
    """``step(params, opt_state, batch, lr) -> (params, opt_state, {"loss"})``, jit-compiled
    (with ``cfg.remat``, every transformer block is rematerialised in the backward pass)."""
    return jax.jit(train_step_fn(model_cfg, cfg, tx), donate_argnums=(0, 1))


def train_step_fn(model_cfg: vit.ViTConfig, cfg: TrainConfig,
                  tx: optax.GradientTransformation) -> Callable:
    """The pure step of :func:`make_train_step`, not compiled: ``ensemble.py`` maps it over
    the members of an ensemble before compiling it."""
    dtype = jnp.dtype(cfg.compute_dtype)

    def loss_fn(params, batch):
        logits, _ = vit.apply(model_cfg, params, batch["image"], dtype=dtype,
                              attention=cfg.attention, remat=cfg.remat)
        return masked_mean(per_example_loss(cfg.task, logits, batch["label"]), batch["mask"])

    def step(params, opt_state, batch, lr):
        loss, grads = jax.value_and_grad(loss_fn)(params, batch)
        updates, opt_state = tx.update(grads, opt_state, params)
        params = jax.tree.map(lambda p, u: p - lr * u.astype(p.dtype), params, updates)
        return params, opt_state, {"loss": loss}

    return step


@functools.lru_cache(maxsize=8)
def _cached_train_step(model_cfg: vit.ViTConfig, step_cfg: TrainConfig):
    tx = optim.make(step_cfg.optimizer, step_cfg.weight_decay, step_cfg.momentum)
    return tx, make_train_step(model_cfg, step_cfg, tx)


def train_step(model_cfg: vit.ViTConfig, cfg: TrainConfig):
    """``(tx, step)`` for ``cfg``, compiled once per process for the settings the step depends on
    (task, dtype, attention, remat, optimiser): pretrain and retrain share one compilation."""
    step_cfg = dataclasses.replace(cfg, epochs=1, batch_size=1, lr=1.0, warmup_epochs=0)
    return _cached_train_step(model_cfg, step_cfg)


@functools.lru_cache(maxsize=8)
def make_eval_step(model_cfg: vit.ViTConfig, task: str, compute_dtype: str,
                   attention: str = "xla") -> Callable:
    """``step(params, images, labels) -> (logits, per-example losses)``, jit-compiled; built once
    per model, task and numerics (a study's every evaluation and attack shares it)."""
    dtype = jnp.dtype(compute_dtype)

    def step(params, images, labels):
        logits, _ = vit.apply(model_cfg, params, images, dtype=dtype, attention=attention)
        return logits, per_example_loss(task, logits, labels)

    return jax.jit(step)


def evaluate(eval_step: Callable, params: Params, batches: Iterator[Batch],
             task: str, *, desc: str | None = None, total: int | None = None,
             process_rows: bool = False, score_dtype: str | None = None) -> dict[str, Any]:
    """Loss and task metric of one split (SPEC.md 5.1 ``engine.evaluate``).

    ``loss`` is the unweighted mean of per-batch mean losses (the reference's semantics, Q28), so
    it depends on the batch size (the reference evaluates at 32); ``metric`` is computed once
    over the whole split (a multi-label mAP on scores rounded to ``score_dtype``:
    :func:`ap_score_dtype`); ``losses`` are per-example losses, ``logits`` and ``labels`` those
    of the split's images in order. With
    ``desc``, a progress bar (``total`` batches) shows images/s and ETA.

    Batches are split over the mesh (``sharding``); ``process_rows``: each process's batches hold
    its own rows of the global batches, and only the per-example outputs are gathered.
    """
    logits, labels, losses, batch_means = [], [], [], []
    bar = tqdm(batches, desc=desc, total=total, unit="batch", leave=False, dynamic_ncols=True,
               disable=desc is None or not sharding.is_primary())
    for batch in bar:
        interrupts.check()
        placed = sharding.shard_batch({"image": batch["image"], "label": batch["label"]},
                                      process_rows=process_rows)
        out_logits, out_losses = sharding.to_host(
            eval_step(params, placed["image"], placed["label"]))
        mask = sharding.gather_rows(batch["mask"], process_rows)
        logits.append(out_logits[mask])
        labels.append(sharding.gather_rows(batch["label"], process_rows)[mask])
        losses.append(out_losses[mask])
        batch_means.append(float(out_losses[mask].mean()))
    logits_all, labels_all = np.concatenate(logits), np.concatenate(labels)
    return {
        "loss": float(np.mean(batch_means)),
        "metric": metrics_lib.task_metric(task, logits_all, labels_all, score_dtype),
        "losses": np.concatenate(losses),
        "logits": logits_all,
        "labels": labels_all,
    }


@dataclasses.dataclass
class FitResult:
    params: Params  # best-by-validation parameters
    best_epoch: int
    history: list[dict[str, float]]
    seconds: float  # training time of this process (a resumed run counts from the resume)
    resumed_from_epoch: int = 0


def _diverged(desc: str, loss: float, epoch: int, cfg: TrainConfig, saved_epoch: int | None,
              checkpointer) -> TrainingDiverged:
    """The error for a non-finite mean training loss in ``epoch``: the last save (the epoch it
    holds, where it is) when one exists, else that nothing was saved."""
    if saved_epoch is None:
        kept = "nothing was saved"
    else:
        where = getattr(checkpointer, "directory", None)
        kept = (f"the last good checkpoint was kept: the last save at epoch {saved_epoch}"
                f"{f' in {where}' if where else ''}")
    return TrainingDiverged(
        f"{desc}: the training loss became {loss} in epoch {epoch} (epochs 0-{cfg.epochs - 1}); "
        f"training stopped and {kept}. Lower the learning rate (config.train.lr={cfg.lr:g}) or "
        "check the data")


def _copy(tree):
    return jax.tree.map(jnp.copy, tree)


def _append_jsonl(path: str | None, record: dict) -> None:
    if path and sharding.is_primary():
        with files.naming(path), open(path, "a") as f:
            f.write(json.dumps(record) + "\n")


def _drop_epochs_from(path: str | None, epoch: int) -> None:
    """Drops the lines of epochs ``>= epoch`` from the metrics log ``path`` (rewritten
    atomically), so that a resumed (or restarted) run logs each epoch once. Lines that are not
    JSON records of an epoch (e.g. the half-written last line of a killed run) are dropped too.
    """
    if not path or not os.path.exists(path) or not sharding.is_primary():
        return
    kept = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if isinstance(record, dict) and isinstance(record.get("epoch"), int) \
                    and record["epoch"] < epoch and line.endswith("\n"):
                kept.append(line)
    with files.atomic_open(path) as f:
        f.writelines(kept)


def fit(model_cfg: vit.ViTConfig, cfg: TrainConfig, params: Params,
        train_batches, steps_per_epoch: int,
        validate: Callable[[Params], dict[str, Any]], *, desc: str = "train",
        progress: bool = True, checkpointer=None, metrics_log: str | None = None,
        writer: metric_writer.NoOpWriter | None = None,
        process_rows: bool = False) -> FitResult:
    """Runs ``cfg.epochs`` epochs over ``train_batches`` and keeps the best-by-validation params.

    ``train_batches`` is a grain iterator over all epochs. With a ``checkpointer``
    (``checkpoints.TrainCheckpointer``) the training state (parameters, optimiser state, best
    parameters, epoch, history and the iterator position) is saved after every epoch, and a run
    that finds a saved state resumes from it: the result equals an uninterrupted run. One JSON line
    per epoch goes to ``metrics_log`` (on a resume, the lines of the epochs that run again are
    dropped first, so it holds each epoch once). A non-finite mean loss of an epoch raises
    ``TrainingDiverged`` (naming the epoch and the last save, if any) before the epoch is saved,
    so the last good state stays on disk. A ``writer``
    (``metric_writer``) gets ``train/loss`` and ``train/lr`` every 10 steps and each epoch's
    record as ``epoch/<key>``, at the global step.

    Parameters and optimiser state are replicated over the mesh and every batch is split over it
    (``sharding``); ``process_rows``: each process's iterator yields its own rows of the global
    batches (``PipelineConfig.shard_by_process``).
    """
    writer = writer if writer is not None else metric_writer.NoOpWriter()
    tx, step_fn = train_step(model_cfg, cfg)
    sharding.check_batch_size(cfg.batch_size, "config.train.batch_size")
    params = _copy(sharding.replicate(params))  # the step donates its inputs; keep the caller's
    arrays = {"params": params, "opt_state": tx.init(params), "best_params": _copy(params)}
    meta = {"epoch": 0, "step": 0, "best_metric": 0.0, "best_epoch": -1, "history": []}
    restored = checkpointer.restore(arrays) if checkpointer is not None else None
    if restored is not None:
        arrays, meta = restored
        train_batches.set_state(meta["iterator"])
        logging.info("%s: resuming after epoch %d (step %d)", desc, meta["epoch"] - 1,
                     meta["step"])
    resumed_from = meta["epoch"]
    saved_epoch = resumed_from - 1 if restored is not None else None  # the save on disk
    _drop_epochs_from(metrics_log, resumed_from)  # epochs after the last save run again
    params, opt_state = arrays["params"], arrays["opt_state"]
    start = time.perf_counter()
    total = cfg.epochs * steps_per_epoch
    bar = tqdm(total=total, initial=meta["step"], desc=desc, unit="step",
               disable=not progress or not sharding.is_primary(), dynamic_ncols=True)
    step = meta["step"]
    for epoch in range(meta["epoch"], cfg.epochs):
        losses, seen, epoch_start = [], 0, time.perf_counter()
        for _ in range(steps_per_epoch):
            interrupts.check()
            host = next(train_batches)
            batch = sharding.shard_batch(host, process_rows=process_rows)
            lr = optim.reference_lr(step, base_lr=cfg.lr, steps_per_epoch=steps_per_epoch,
                                    epochs=cfg.epochs, warmup_epochs=cfg.warmup_epochs)
            params, opt_state, out = step_fn(params, opt_state, batch, jnp.float32(lr))
            losses.append(out["loss"])
            seen += int(np.sum(host["mask"])) * (jax.process_count() if process_rows else 1)
            step += 1
            bar.update(1)
            if step % 10 == 0 or step == total:
                rate = seen / max(time.perf_counter() - epoch_start, 1e-9)
                loss_now = float(out["loss"])  # the one sync per 10 steps: bar and writer
                bar.set_postfix(epoch=epoch, loss=f"{loss_now:.4f}", img_s=f"{rate:.0f}")
                writer.scalars(step, {"train/loss": loss_now, "train/lr": lr})
        train_loss = float(np.mean(sharding.to_host(losses)))
        if not np.isfinite(train_loss):  # before the epoch is saved: the last save stays good
            bar.close()
            raise _diverged(desc, train_loss, epoch, cfg, saved_epoch, checkpointer)
        val = validate(params)
        record = {"epoch": epoch, "step": step, "train_loss": train_loss,
                  "val_loss": val["loss"], "val_metric": val["metric"], "lr": lr,
                  "images_per_s": seen / max(time.perf_counter() - epoch_start, 1e-9)}
        meta["history"].append(record)
        _append_jsonl(metrics_log, record)
        writer.scalars(step, metric_writer.prefixed("epoch", record, exclude=("epoch", "step")))
        writer.flush()
        logging.info("%s epoch %d: train loss %.4f, val loss %.4f, val metric %.2f", desc,
                     epoch, train_loss, val["loss"], val["metric"])
        if val["metric"] > meta["best_metric"]:
            meta["best_metric"], meta["best_epoch"] = float(val["metric"]), epoch
            arrays["best_params"] = _copy(params)
        arrays["params"], arrays["opt_state"] = params, opt_state
        meta.update(epoch=epoch + 1, step=step)
        if checkpointer is not None and checkpointer.save(
                step, arrays, {**meta, "iterator": train_batches.get_state()}):
            saved_epoch = epoch
    bar.close()
    best_params, best_epoch = arrays["best_params"], meta["best_epoch"]
    if best_epoch < 0:  # the reference would crash (Q17); keep the last parameters instead
        best_params, best_epoch = params, cfg.epochs - 1
    return FitResult(best_params, best_epoch, meta["history"], time.perf_counter() - start,
                     resumed_from)
