"""One skeleton for every stage of a study: pretrain, retrain and each unlearning method.

``run_stage`` does, for any stage::

    lock -> fingerprint -> reuse (equal fingerprint, parameters verified against their hash)
        | resume | start -> metadata ("training")
        -> body -> evaluate (retain / forget / test / val) -> save artifacts and parameters
        -> metadata ("done") -> clean up the resumable state

and ``train_stage`` (SPEC.md 4: pretrain fits all TRAIN identities, retrain the retain
identities only) and ``method_stage`` (a method of ``unlearn/registry.py``: ``prepare`` then
``unlearn`` on the study's request, each given what its ACCESS grants) give it their bodies.

A stage's run directory ``<checkpoint_dir>/<dataset>/<model>/<stage>_<N>_<seed>/`` holds
``params/``, ``metadata.json`` (config, splits, fingerprint, record, ...), ``metrics.jsonl``
(training stages; TensorBoard's view of it under ``<workdir>/tensorboard/``,
``metric_writer``), ``artifacts/`` (a method's prepared artifacts, e.g. MetaUnlearn's meta-loss)
and, while it runs, ``train_state/``; next to it, ``.<stage>_<N>_<seed>.lock`` and, while a
process holds that lock, ``.<stage>_<N>_<seed>.holder`` (``locks.py``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
import time
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from absl import logging

from oneshui_jax import checkpoints, locks, metric_writer, sharding
from oneshui_jax import train as train_lib
from oneshui_jax.data import pipeline
from oneshui_jax.errors import CheckpointError
from oneshui_jax.study import access, privacy, reuse
from oneshui_jax.study.context import (
    Context,
    evaluate_splits,
    initial_params,
    seeded_context,
    wants_loss_attack,
)
from oneshui_jax.study.validate import SECOND_ORACLE, TRAINING_STAGES
from oneshui_jax.unlearn import api, registry

TRAINING_ACCESS = {"pretrain": "none", "retrain": "oracle",
                   SECOND_ORACLE: "oracle"}  # the access column of these rows


@dataclasses.dataclass
class StageOutput:
    """What a stage body returns: parameters, record and metadata fields, artifacts."""

    params: Any
    record: dict[str, Any]
    metadata: dict[str, Any] = dataclasses.field(default_factory=dict)
    artifacts: dict[str, Any] | None = None


Body = Callable[[str, checkpoints.TrainCheckpointer], StageOutput]


def _metadata(ctx: Context, stage: str, **extra) -> dict:
    return {"config": ctx.config.to_dict(), "splits": ctx.splits.to_dict(), "stage": stage,
            "model_config": dataclasses.asdict(ctx.model_cfg), "data_audit": ctx.data_audit,
            **extra}


def _load_for_reuse(rdir: str, template: Any) -> Any:
    """The finished parameters of ``rdir``, checked against their recorded hash; a corrupt or
    unreadable checkpoint is one CheckpointError saying what to do, and is never used."""
    try:
        return checkpoints.load_params(rdir, template, verify=True)
    except CheckpointError as e:
        raise CheckpointError(
            f"the finished checkpoint {rdir} cannot be reused: {e}. Delete it (rm -r {rdir}) "
            "to run the stage again") from e


def run_stage(ctx: Context, stage: str, *, settings_name: str, settings: dict[str, Any],
              template: Any, parent_hash: str | None, body: Body, training: bool, access: str,
              extra_metadata: dict[str, Any] | None = None,
              evaluate: bool = True) -> tuple[dict, Any]:
    """Runs (or reuses, or resumes) one stage: ``(record, params)`` (module docstring).

    The run directory is locked (``locks.hold``) before the reuse decision: a second process on
    the same stage waits for the first (``config.wait_for_lock``, the default) and then reuses
    its result, or stops at once with ``LockBusy`` naming the holder.
    """
    rdir = ctx.run_dir(stage)
    lock = (locks.hold(rdir, wait=ctx.config.get("wait_for_lock", True), what=f"stage {stage}")
            if sharding.is_primary() else contextlib.nullcontext())  # multi-host: the primary's
    with lock:
        sharding.barrier(f"{rdir}: locked")
        augmented = training or access in (api.STATS, api.FULL)  # reads TRAIN images
        fp = reuse.fingerprint(ctx, stage, settings_name, settings, parent_hash, augmented)
        decision, stored = reuse.check(ctx, rdir, fp, settings_name, augmented)
        sharding.barrier(f"{rdir}: decided")  # every process decided before anything is written
        if decision == reuse.REUSE:
            logging.info("%s: reusing the finished checkpoint %s", stage, rdir)
            record = dict(stored["record"], reused=True)
            record.setdefault("access", access)  # checkpoints older than the access column
            record["splits_hash"] = fp["parts"]["splits"]  # equal fingerprints, equal splits
            params = _load_for_reuse(rdir, template)
            if evaluate and wants_loss_attack(ctx.config) and "loss_rf" not in (
                    record.get("mia") or {}):
                # finished before the attack ran with every evaluation: evaluate again (the
                # result depends on the parameters and the data only), without touching the
                # checkpoint
                record.update(evaluate_splits(ctx, params))
            return record, params
        if decision == reuse.RESUME:
            logging.info("%s: resuming the unfinished run in %s", stage, rdir)
        os.makedirs(rdir, exist_ok=True)
        metadata = _metadata(ctx, stage, fingerprint=fp, **(extra_metadata or {}))
        checkpoints.write_metadata(rdir, metadata, status="training")
        start = time.perf_counter()
        with checkpoints.TrainCheckpointer(
                rdir, every_s=ctx.config.get("checkpoint_every_s", 0.0)) as checkpointer:
            out = body(rdir, checkpointer)
        config = ctx.config
        record = {"method": stage, "dataset": config.dataset,
                  "num_identities": config.num_identities, "seed": config.seed,
                  # which split: the report pairs each method with the pretrain of its own split
                  "splits_hash": fp["parts"]["splits"],
                  "seconds": time.perf_counter() - start, **out.record}
        if evaluate:  # an ensemble's stacked parameters are evaluated member by member instead
            record.update(evaluate_splits(ctx, out.params))
        extra = dict(out.metadata)
        if out.artifacts:
            extra["artifacts_hash"] = checkpoints.save_tree(rdir, checkpoints.ARTIFACTS_DIR,
                                                            out.artifacts)
        checkpoints.save_params(rdir, out.params, {**metadata, **extra, "record": record},
                                overwrite=True)
        if sharding.is_primary():
            shutil.rmtree(os.path.join(rdir, checkpoints.TRAIN_STATE_DIR), ignore_errors=True)
        return record, out.params


# ---------------------------------------------------------------------------------------------
# Pretrain and retrain


def train_stage(ctx: Context, stage: str, init_params) -> tuple[dict, Any]:
    """Pretrain or retrain (SPEC.md 4) from ``init_params``: ``(record, params)``.

    ``retrain_2`` (``SECOND_ORACLE``) is retrain in the reference context
    (``privacy.reference_context``: the same split and data, ``seed + 1`` for the initial head,
    the data order and the augmentation), from that context's own initial parameters; it lives
    in that context's retrain run folder, which RMIA's reference models share."""
    if stage == SECOND_ORACLE:
        other = privacy.reference_context(ctx)
        record, params = train_stage(other, "retrain", initial_params(other))
        # the study's seed (the split it is paired on) and the seed its training drew from
        return {**record, "method": SECOND_ORACLE, "access": TRAINING_ACCESS[stage],
                "seed": ctx.config.seed, "training_seed": other.config.seed}, params
    return _train(ctx, stage, init_params, ctx.images[TRAINING_STAGES[stage]],
                  ctx.config.train.to_dict(), TRAINING_ACCESS[stage])


def calibration_stage(ctx: Context, init_params) -> tuple[dict, Any]:
    """The model RMIA's grid point is selected with (``privacy.CALIBRATION``): retrain without
    the held-out simulated request too (``privacy.held_out``), from ``init_params``. Not a row
    of the table; its record says what it was trained on."""
    identities, images = privacy.held_out(ctx)
    keep = np.setdiff1d(np.asarray(ctx.images["retain"]), images)
    record, params = _train(ctx, privacy.CALIBRATION, init_params, keep,
                            privacy.calibration_settings(ctx, identities), "calibration")
    return {**record, "held_out_identities": [int(i) for i in identities]}, params


def member_context(ctx: Context, k: int) -> Context:
    """The context of ensemble member ``k``: the study's split, training seed ``seed + k``
    (member 0 is the study's own seed, member 1 the reference context's: ``retrain_2``)."""
    return seeded_context(ctx, ctx.config.seed + k)


def ensemble_stage(ctx: Context, stage: str) -> tuple[dict, Any]:
    """``config.ensemble.size`` members of ``stage`` (pretrain or retrain) trained together
    (``oneshui_jax/ensemble.py``), member ``k`` exactly as the stage trained alone with
    training seed ``seed + k`` (:func:`member_context`: its initial head, data order and
    augmentation), stored as one stage ``<stage>_ensemble<K>`` of stacked parameters, reused
    and fingerprinted like any other. ``(record, stacked params)``; the record (not a row of
    the table) holds each member's best epoch and history."""
    from oneshui_jax import ensemble

    size = int(ctx.config.ensemble.size)
    members = [member_context(ctx, k) for k in range(size)]
    inits = [initial_params(m) for m in members]
    template = ensemble.stack(inits)
    tcfg, ds, config = ctx.train_config, ctx.dataset, ctx.config
    train_idx = ctx.images[TRAINING_STAGES[stage]]

    def body(rdir: str, checkpointer) -> StageOutput:
        steps = pipeline.steps_per_epoch(len(train_idx), tcfg.batch_size)
        iterators = []
        for m in members:
            pcfg = m.pipeline_config(tcfg.batch_size, crop_scale=tuple(config.data.crop_scale))
            iterators.append(pipeline.to_iterator(
                pipeline.train_dataset(ds.source, train_idx, pcfg, tcfg.epochs), pcfg))
        val_cfg = ctx.pipeline_config(config.data.eval_batch_size)

        def validate_fn(params):
            return train_lib.evaluate(
                ctx.eval_step, params,
                pipeline.eval_batches(ds.source, ctx.images["val"], val_cfg), ds.task,
                score_dtype=tcfg.score_dtype)

        logging.info("%s: %d members of %d images, %d steps/epoch -> %s", stage, size,
                     len(train_idx), steps, rdir)
        result = ensemble.fit(ctx.model_cfg, tcfg, inits, iterators, steps, validate_fn,
                              desc=f"{stage} ensemble")
        return StageOutput(result.params, {"access": "ensemble", "members": size,
                                           "training_seeds": [m.config.seed for m in members],
                                           "best_epochs": result.best_epochs,
                                           "images_per_s": result.images_per_s,
                                           "histories": result.histories})

    settings = {**config.train.to_dict(), "members": size}
    return run_stage(ctx, f"{stage}_ensemble{size}", settings_name="train", settings=settings,
                     template=template, parent_hash=checkpoints.params_hash(template),
                     body=body, training=True, access="ensemble", evaluate=False)


def _train(ctx: Context, stage: str, init_params, train_idx, settings: dict[str, Any],
           access_level: str) -> tuple[dict, Any]:
    """One training stage's body on the images ``train_idx`` (``settings``: its fingerprint's
    ``train`` part)."""
    config, ds = ctx.config, ctx.dataset
    tcfg = ctx.train_config

    def body(rdir: str, checkpointer) -> StageOutput:
        steps = pipeline.steps_per_epoch(len(train_idx), tcfg.batch_size)
        pcfg = ctx.process_pipeline_config(tcfg.batch_size,
                                           crop_scale=tuple(config.data.crop_scale))
        batches = pipeline.to_iterator(
            pipeline.train_dataset(ds.source, train_idx, pcfg, tcfg.epochs), pcfg)
        eval_step = ctx.eval_step
        val_cfg = ctx.process_pipeline_config(config.data.eval_batch_size)

        def validate_fn(params):
            return train_lib.evaluate(
                eval_step, params, pipeline.eval_batches(ds.source, ctx.images["val"], val_cfg),
                ds.task, process_rows=val_cfg.shard_by_process,
                score_dtype=tcfg.score_dtype)

        identities = np.unique(np.asarray(ds.annotations.identities)[np.asarray(train_idx)])
        logging.info("%s: %d images of %d identities, %d steps/epoch -> %s", stage,
                     len(train_idx), len(identities), steps, rdir)
        with metric_writer.for_stage(config, rdir) as writer:
            result = train_lib.fit(ctx.model_cfg, tcfg, init_params, batches, steps, validate_fn,
                                   desc=stage, progress=config.progress, checkpointer=checkpointer,
                                   metrics_log=os.path.join(rdir, "metrics.jsonl"), writer=writer,
                                   process_rows=pcfg.shard_by_process)
        return StageOutput(result.params, {"access": access_level,
                                           "best_epoch": result.best_epoch,
                                           "seconds": result.seconds,
                                           "history": result.history})

    return run_stage(ctx, stage, settings_name="train", settings=settings,
                     template=init_params, parent_hash=checkpoints.params_hash(init_params),
                     body=body, training=True, access=access_level)


# ---------------------------------------------------------------------------------------------
# Unlearning methods


def method_stage(ctx: Context, name: str, base_params, base_dir: str) -> tuple[dict, Any]:
    """Method ``name`` on the pretrained model (``base_dir``): ``(record, params)``.

    ``prepare`` gets ``access.prepare_data`` (nothing for ``support`` methods), ``unlearn`` the
    study's request and, for ``full`` methods only, ``access.full_data``.
    """
    method, module = registry.resolve(ctx.config, name)  # a method, or a variant of one
    cfg = ctx.method_config(name)
    model = ctx.model
    rng = jax.random.key(ctx.config.seed)
    base_hash = checkpoints.read_metadata(base_dir).get("params_hash")

    def body(rdir: str, checkpointer) -> StageOutput:
        artifacts, prepared = {}, {}
        if hasattr(module, "prepare"):
            start = time.perf_counter()
            data = access.prepare_data(ctx, module.ACCESS, checkpointer)
            with metric_writer.for_stage(ctx.config, rdir) as writer:
                if data is not None:  # meta-training's curves (TrainData.writer)
                    data = dataclasses.replace(data, writer=writer)
                artifacts, prepared = module.prepare(model, base_params, data, cfg, rng)
            prepared = {**prepared, "seconds": time.perf_counter() - start}
        # Servable methods run twice, so the one-shot cost is timed after compilation.
        params, info, first_call_s, seconds = api.timed_unlearn(
            module, model, base_params, artifacts, access.study_request(ctx), cfg, rng,
            data=access.unlearn_data(ctx, module.ACCESS), warm_up=module.ACCESS in api.SERVABLE)
        unlearned = {**info, "seconds": seconds, "first_call_seconds": first_call_s}
        record = {"access": module.ACCESS, "prepare": prepared, "unlearn": unlearned}
        return StageOutput(params, record, {"method_config": api.config_record(cfg)},
                           artifacts)

    extra = {"base_run_dir": os.path.abspath(base_dir), "base_params_hash": base_hash,
             "method": method, "access": module.ACCESS}
    if method != name:
        extra["variant"] = name
    return run_stage(ctx, name, settings_name=name, settings=api.config_record(cfg),
                     template=base_params, parent_hash=base_hash, body=body, training=False,
                     access=module.ACCESS, extra_metadata=extra)
