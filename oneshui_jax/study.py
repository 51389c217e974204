"""The 1-SHUI study: data, splits, pretrain, retrain (the oracle), evaluation, report.

This is ``main.py:main`` of the reference (SPEC.md sections 4, 5 and 10) as library functions:
``run(config)`` makes the reference-exact split, trains or reuses every stage in
``config.stages``, evaluates each model on retain / forget / test / val (eval transform), computes
ToW against the retrained model and writes ``results.{json,md,csv}`` and plots to the workdir.

Every stage lives in ``<checkpoint_dir>/<dataset>/<model>/<stage>_<N>_<seed>/``. A finished stage
is reused (after checking that its dataset, model and splits match the request); an unfinished one
resumes from its last epoch. Unlike the reference, both stages start from the same initial
parameters drawn from the seed (SynthFaces trains from scratch).
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import time
from typing import Any

import jax
from absl import logging

from oneshui_jax import checkpoints, hparams, report
from oneshui_jax import metrics as metrics_lib
from oneshui_jax import splits as splits_lib
from oneshui_jax import train as train_lib
from oneshui_jax.data import audit as audit_lib
from oneshui_jax.data import datasets as datasets_lib
from oneshui_jax.data import pipeline
from oneshui_jax.errors import CheckpointError, ConfigError
from oneshui_jax.models import vit
from oneshui_jax.unlearn.registry import METHODS

EVAL_SPLITS = ("retain", "forget", "test", "val")
TRAINING_STAGES = {"pretrain": "train", "retrain": "retain"}  # stage -> identities it fits


@dataclasses.dataclass
class Context:
    """Everything the stages share: config, data, split and image indices, model config."""

    config: Any
    dataset: datasets_lib.Dataset
    splits: splits_lib.Splits
    images: dict[str, Any]
    model_cfg: vit.ViTConfig
    data_audit: dict[str, Any] | None = None  # real datasets: data.audit summary of this split

    def run_dir(self, stage: str) -> str:
        c = self.config
        return checkpoints.run_dir(os.path.expanduser(c.checkpoint_dir), c.dataset,
                                   c.model.name, stage, c.num_identities, c.seed)

    def pipeline_config(self, batch_size: int, **kw) -> pipeline.PipelineConfig:
        return pipeline.PipelineConfig(image_size=self.config.data.image_size,
                                       batch_size=batch_size, seed=self.config.seed,
                                       num_threads=self.config.data.num_threads, **kw)


def model_config(config, num_classes: int) -> vit.ViTConfig:
    return vit.ViTConfig.preset(config.model.name, num_classes=num_classes,
                                image_size=config.data.image_size)


def train_config(config, task: str) -> train_lib.TrainConfig:
    t = config.train
    return train_lib.TrainConfig(task=task, epochs=t.epochs, batch_size=t.batch_size, lr=t.lr,
                                 weight_decay=t.weight_decay, momentum=t.momentum,
                                 warmup_epochs=t.warmup_epochs, compute_dtype=t.compute_dtype,
                                 optimizer=t.optimizer, attention=t.attention)


def validate_config(config) -> None:
    """Rejects what would fail later, before any work starts."""
    unknown = [s for s in config.stages if s not in TRAINING_STAGES and s not in METHODS]
    planned = [s for s in unknown if s in hparams.METHODS]
    if planned:
        raise ConfigError(f"config.stages: {planned} carry the reference's hyper-parameters "
                          f"(config.{planned[0]}) but are not implemented yet; available "
                          f"methods: {sorted(METHODS)}")
    if unknown:
        raise ConfigError(f"config.stages has unknown stages {unknown}; available: "
                          f"{sorted(TRAINING_STAGES) + sorted(METHODS)}")
    if config.num_identities < 1:
        raise ConfigError(f"config.num_identities must be >= 1, got {config.num_identities}")
    if config.train.epochs < 1 or config.train.batch_size < 1:
        raise ConfigError("config.train.epochs and config.train.batch_size must be >= 1")
    try:
        vit.ViTConfig.preset(config.model.name, image_size=config.data.image_size)
    except ValueError as e:
        raise ConfigError(f"config.model: {e}") from None
    train_config(config, "multilabel")  # validates optimizer and dtype


def evaluate_splits(ctx: Context, eval_step, params) -> dict[str, dict[str, float]]:
    """Loss and metric on retain / forget / test / val, eval transform (SPEC.md 5.2)."""
    cfg = ctx.pipeline_config(ctx.config.data.eval_batch_size)
    out = {}
    for split in EVAL_SPLITS:
        batches = pipeline.eval_batches(ctx.dataset.source, ctx.images[split], cfg)
        result = train_lib.evaluate(
            eval_step, params, batches, ctx.dataset.task,
            desc=f"eval {split}" if ctx.config.progress else None,
            total=pipeline.steps_per_epoch(len(ctx.images[split]), cfg.batch_size))
        out[split] = {"metric": result["metric"], "loss": result["loss"]}
    return out


def _metadata(ctx: Context, stage: str, record: dict | None = None, **extra) -> dict:
    return {"config": ctx.config.to_dict(), "splits": ctx.splits.to_dict(), "stage": stage,
            "model_config": dataclasses.asdict(ctx.model_cfg), "record": record,
            "data_audit": ctx.data_audit, **extra}


TRAINING_DATA_KEYS = {"crop_scale": None, "dedup": "none"}
"""config.data fields a checkpoint must agree on to be reused, with the value to assume when an
older checkpoint does not record one (the image size is in the model config, the dataset and
split are checked separately)."""


def _plain(value):
    """Tuples and lists compare equal (metadata JSON turns tuples into lists)."""
    return list(value) if isinstance(value, tuple | list) else value


def _reuse(ctx: Context, stage: str, template) -> tuple[dict, Any] | None:
    """The finished checkpoint of ``stage``, if any, after checking it fits the request."""
    rdir = ctx.run_dir(stage)
    if not checkpoints.is_finished(rdir):
        return None
    metadata = checkpoints.read_metadata(rdir)
    checkpoints.check_compatible(metadata, dataset=ctx.config.dataset,
                                 model=ctx.config.model.name, splits=ctx.splits.to_dict())
    if metadata.get("model_config") != dataclasses.asdict(ctx.model_cfg):
        raise CheckpointError(
            f"checkpoint {rdir} holds a model {metadata.get('model_config')} but the request is "
            f"{dataclasses.asdict(ctx.model_cfg)}")
    block = "train" if stage in TRAINING_STAGES else stage
    stored_config = metadata.get("config") or {}
    if stored_config.get(block) is not None and block in ctx.config:
        stored = {f"{block}.{k}": _plain(v) for k, v in stored_config[block].items()}
        wanted = {f"{block}.{k}": _plain(v) for k, v in ctx.config[block].to_dict().items()}
        stored_data, wanted_data = stored_config.get("data") or {}, ctx.config.data.to_dict()
        for key, absent in TRAINING_DATA_KEYS.items():  # data settings that shape training
            if key in stored_data or key in wanted_data:
                stored[f"data.{key}"] = _plain(stored_data.get(key, absent))
                wanted[f"data.{key}"] = _plain(wanted_data.get(key, absent))
        changed = sorted(k for k in set(stored) | set(wanted) if stored.get(k) != wanted.get(k))
        if changed:
            details = ", ".join(f"{k}: {stored.get(k)!r} -> {wanted.get(k)!r}" for k in changed)
            raise CheckpointError(
                f"checkpoint {rdir} was made with other settings ({details}); delete it or "
                "point config.checkpoint_dir elsewhere to run the stage again")
    logging.info("%s: reusing the finished checkpoint %s", stage, rdir)
    return dict(metadata["record"], reused=True), checkpoints.load_params(rdir, template)


def train_stage(ctx: Context, stage: str, init_params) -> tuple[dict, Any]:
    """Pretrain or retrain (SPEC.md 4), reusing or resuming its checkpoint: (record, params)."""
    reused = _reuse(ctx, stage, init_params)
    if reused is not None:
        return reused
    config, ds = ctx.config, ctx.dataset
    tcfg = train_config(config, ds.task)
    train_idx = ctx.images[TRAINING_STAGES[stage]]
    steps = pipeline.steps_per_epoch(len(train_idx), tcfg.batch_size)
    pcfg = ctx.pipeline_config(tcfg.batch_size, crop_scale=tuple(config.data.crop_scale))
    batches = pipeline.to_iterator(
        pipeline.train_dataset(ds.source, train_idx, pcfg, tcfg.epochs), pcfg)
    eval_step = train_lib.make_eval_step(ctx.model_cfg, ds.task, tcfg.compute_dtype,
                                         tcfg.attention)
    val_cfg = ctx.pipeline_config(config.data.eval_batch_size)

    def validate(params):
        return train_lib.evaluate(
            eval_step, params, pipeline.eval_batches(ds.source, ctx.images["val"], val_cfg),
            ds.task)

    rdir = ctx.run_dir(stage)
    os.makedirs(rdir, exist_ok=True)
    checkpoints.write_metadata(rdir, _metadata(ctx, stage), status="training")
    logging.info("%s: %d images of %d identities, %d steps/epoch -> %s", stage, len(train_idx),
                 len(getattr(ctx.splits, TRAINING_STAGES[stage])), steps, rdir)
    with checkpoints.TrainCheckpointer(rdir) as checkpointer:
        result = train_lib.fit(ctx.model_cfg, tcfg, init_params, batches, steps, validate,
                               desc=stage, progress=config.progress, checkpointer=checkpointer,
                               metrics_log=os.path.join(rdir, "metrics.jsonl"))
    record = {"method": stage, "dataset": config.dataset,
              "num_identities": config.num_identities, "seed": config.seed,
              "best_epoch": result.best_epoch, "seconds": result.seconds,
              "history": result.history}
    record.update(evaluate_splits(ctx, eval_step, result.params))
    checkpoints.save_params(rdir, result.params, _metadata(ctx, stage, record), overwrite=True)
    shutil.rmtree(os.path.join(rdir, checkpoints.TRAIN_STATE_DIR), ignore_errors=True)
    return record, result.params


def method_stage(ctx: Context, name: str, base_params, base_dir: str) -> tuple[dict, Any]:
    """Runs unlearning method ``name`` on the pretrained model, or reuses its checkpoint."""
    reused = _reuse(ctx, name, base_params)
    if reused is not None:
        return reused
    config = ctx.config
    rdir = ctx.run_dir(name)
    os.makedirs(rdir, exist_ok=True)
    base = {"base_run_dir": os.path.abspath(base_dir),
            "base_params_hash": checkpoints.read_metadata(base_dir).get("params_hash")}
    checkpoints.write_metadata(rdir, _metadata(ctx, name, **base), status="training")
    start = time.perf_counter()
    params, info = METHODS[name](ctx, base_params, rdir)
    record = {"method": name, "dataset": config.dataset, "num_identities": config.num_identities,
              "seed": config.seed, "seconds": time.perf_counter() - start, **info["record"]}
    eval_step = train_lib.make_eval_step(ctx.model_cfg, ctx.dataset.task,
                                         config.train.compute_dtype, config.train.attention)
    record.update(evaluate_splits(ctx, eval_step, params))
    checkpoints.save_params(rdir, params, _metadata(ctx, name, record, **base, **info["metadata"]),
                            overwrite=True)
    shutil.rmtree(os.path.join(rdir, checkpoints.TRAIN_STATE_DIR), ignore_errors=True)
    return record, params


def prepare(config) -> Context:
    """Validates the config, opens the dataset and makes the reference-exact split."""
    validate_config(config)
    ds = datasets_lib.load(config.dataset, config.data, progress=config.progress)
    if ds.merged_identities:
        logging.warning("config.data.dedup=merge: %d identities merged into others because they "
                        "share byte-identical images (a deviation from the reference)",
                        ds.merged_identities)
    splits = splits_lib.make_splits(ds.annotations, config.num_identities, config.seed)
    images = splits_lib.split_images(ds.annotations, splits)
    logging.info("splits: identities train/val/test %d/%d/%d, forget %d (%d images)",
                 len(splits.train), len(splits.val), len(splits.test), len(splits.forget),
                 len(images["forget"]))
    data_audit = None
    if ds.audit is not None:
        roles = {r: images[r] for r in ("forget", "support", "retain", "val", "test")}
        data_audit = {**ds.audit.summary(roles), "dedup": config.data.get("dedup", "none"),
                      "merged_identities": ds.merged_identities}
        for line in audit_lib.format_summary(data_audit, data_audit["dedup"]).splitlines():
            logging.info("%s", line)
    return Context(config, ds, splits, images, model_config(config, ds.num_classes), data_audit)


def initial_params(ctx: Context):
    """Where pretrain and retrain start: ``config.model.init`` (ImageNet weights, as the reference
    does) or, when it is empty, a fresh initialisation from the seed (SynthFaces)."""
    key = jax.random.key(ctx.config.seed)
    if not ctx.config.model.get("init"):
        return vit.init_params(ctx.model_cfg, key)
    from oneshui_jax.models import pretrained

    report: list[str] = []
    params = pretrained.load_pretrained(os.path.expanduser(ctx.config.model.init),
                                        ctx.model_cfg, rng=key, report=report)
    for line in report:
        logging.info("model.init: %s", line)
    return params


def add_tow(records: list[dict]) -> None:
    """ToW of every record against the retrained model's retain / forget / test metrics."""
    retrain = next((r for r in records if r["method"] == "retrain"), None)
    for r in records:
        r["tow"] = None if retrain is None else metrics_lib.tow(
            {s: r[s]["metric"] for s in EVAL_SPLITS},
            {s: retrain[s]["metric"] for s in EVAL_SPLITS})


def run(config) -> list[dict]:
    """Runs the study described by ``config``; returns one record per model."""
    start = time.perf_counter()
    ctx = prepare(config)
    init = initial_params(ctx)
    records, trained = [], {}
    for stage in config.stages:
        if stage in TRAINING_STAGES:
            record, trained[stage] = train_stage(ctx, stage, init)
        else:
            if "pretrain" not in trained:  # methods start from the pretrained model
                _, trained["pretrain"] = train_stage(ctx, "pretrain", init)
            record, _ = method_stage(ctx, stage, trained["pretrain"], ctx.run_dir("pretrain"))
        records.append(record)
    add_tow(records)
    report.write_report(config.workdir, records, config=config.to_dict(), extra={
        "splits": {k: len(v) for k, v in ctx.splits.to_dict().items()},
        "data_audit": ctx.data_audit,
        "seconds": time.perf_counter() - start})
    return records
