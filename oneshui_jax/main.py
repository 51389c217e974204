r"""The study: pretrain, retrain (the oracle), evaluation, results table.

    python -m oneshui_jax.main --config=configs/synthfaces.py
    python -m oneshui_jax.main --config=configs/synthfaces.py:N=50 --config.seed=1 \
        --config.train.epochs=5

Stages run in ``config.stages`` order. Each model is evaluated on the retain, forget, test and val
splits (SPEC.md 5.2); ToW compares it with the retrained model. Results go to
``<workdir>/results.json`` and the table is printed.
"""

from __future__ import annotations

import os
import time

import jax
import numpy as np
from absl import app, flags, logging
from ml_collections import config_flags

from oneshui_jax import metrics as metrics_lib
from oneshui_jax import splits as splits_lib
from oneshui_jax import train as train_lib
from oneshui_jax.data import datasets as datasets_lib
from oneshui_jax.data import pipeline
from oneshui_jax.errors import ConfigError, DataError
from oneshui_jax.models import vit

_CONFIG = config_flags.DEFINE_config_file(
    "config", "configs/synthfaces.py", "Study configuration (ml_collections file).",
    lock_config=True)

EVAL_SPLITS = ("retain", "forget", "test", "val")
TRAIN_DATA = {"pretrain": "train", "retrain": "retain"}  # which identities each stage fits


def model_config(config, num_classes: int) -> vit.ViTConfig:
    return vit.ViTConfig.preset(config.model.name, num_classes=num_classes,
                                image_size=config.data.image_size)


def train_config(config, task: str) -> train_lib.TrainConfig:
    t = config.train
    return train_lib.TrainConfig(task=task, epochs=t.epochs, batch_size=t.batch_size, lr=t.lr,
                                 weight_decay=t.weight_decay, momentum=t.momentum,
                                 warmup_epochs=t.warmup_epochs, compute_dtype=t.compute_dtype,
                                 optimizer=t.optimizer)


def evaluate_splits(eval_step, params, ds, images, config) -> dict:
    """Loss and metric on retain / forget / test / val, eval transform (SPEC.md 5.2)."""
    cfg = pipeline.PipelineConfig(image_size=config.data.image_size,
                                  batch_size=config.data.eval_batch_size,
                                  num_threads=config.data.num_threads)
    out = {}
    for split in EVAL_SPLITS:
        batches = pipeline.eval_batches(ds.source, images[split], cfg)
        result = train_lib.evaluate(eval_step, params, batches, ds.task)
        out[split] = {"metric": result["metric"], "loss": result["loss"]}
    return out


def run_stage(stage: str, config, ds, images, init_params) -> dict:
    """Trains one stage (pretrain or retrain) from ``init_params`` and evaluates it."""
    model_cfg = model_config(config, ds.num_classes)
    tcfg = train_config(config, ds.task)
    pcfg = pipeline.PipelineConfig(image_size=config.data.image_size,
                                   batch_size=tcfg.batch_size, seed=config.seed,
                                   crop_scale=tuple(config.data.crop_scale),
                                   num_threads=config.data.num_threads)
    train_idx = images[TRAIN_DATA[stage]]
    steps = pipeline.steps_per_epoch(len(train_idx), tcfg.batch_size)
    batches = pipeline.to_iterator(
        pipeline.train_dataset(ds.source, train_idx, pcfg, tcfg.epochs), pcfg)
    eval_step = train_lib.make_eval_step(model_cfg, ds.task, tcfg.compute_dtype)
    val_cfg = pipeline.PipelineConfig(image_size=config.data.image_size,
                                      batch_size=config.data.eval_batch_size,
                                      num_threads=config.data.num_threads)

    def validate(params):
        return train_lib.evaluate(eval_step, params,
                                  pipeline.eval_batches(ds.source, images["val"], val_cfg),
                                  ds.task)

    logging.info("%s: %d images of %d identities, %d steps/epoch", stage, len(train_idx),
                 len(set(ds.annotations.identities[train_idx].tolist())), steps)
    result = train_lib.fit(model_cfg, tcfg, init_params, batches, steps, validate, desc=stage,
                           progress=config.progress)
    record = {"method": stage, "best_epoch": result.best_epoch, "seconds": result.seconds,
              "history": result.history}
    record.update(evaluate_splits(eval_step, result.params, ds, images, config))
    return record


def format_table(records: list[dict], metric_name: str) -> str:
    head = (f"| model | retain {metric_name} | forget {metric_name} | test {metric_name} | "
            "ToW | seconds |")
    lines = [head, "|---|---:|---:|---:|---:|---:|"]
    for r in records:
        tow = "" if r.get("tow") is None else f"{r['tow']:.2f}"
        lines.append(f"| {r['method']} | {r['retain']['metric']:.2f} | "
                     f"{r['forget']['metric']:.2f} | {r['test']['metric']:.2f} | {tow} | "
                     f"{r['seconds']:.0f} |")
    return "\n".join(lines)


def run(config) -> list[dict]:
    """Runs the study described by ``config``; returns one record per model."""
    unknown = set(config.stages) - set(TRAIN_DATA)
    if unknown:
        raise ConfigError(f"config.stages has unknown stages {sorted(unknown)}; "
                          f"available: {sorted(TRAIN_DATA)}")
    start = time.perf_counter()
    ds = datasets_lib.load(config.dataset, config.data)
    splits = splits_lib.make_splits(ds.annotations, config.num_identities, config.seed)
    images = splits_lib.split_images(ds.annotations, splits)
    logging.info("splits: identities train/val/test %d/%d/%d, forget %d (%d images)",
                 len(splits.train), len(splits.val), len(splits.test), len(splits.forget),
                 len(images["forget"]))
    model_cfg = model_config(config, ds.num_classes)
    init = vit.init_params(model_cfg, jax.random.key(config.seed))
    records = []
    for stage in config.stages:
        record = run_stage(stage, config, ds, images, init)
        record.update(dataset=config.dataset, num_identities=config.num_identities,
                      seed=config.seed)
        records.append(record)
    retrain = next((r for r in records if r["method"] == "retrain"), None)
    for r in records:
        if retrain is None:
            r["tow"] = None
            continue
        r["tow"] = metrics_lib.tow({s: r[s]["metric"] for s in EVAL_SPLITS},
                                   {s: retrain[s]["metric"] for s in EVAL_SPLITS})
    os.makedirs(config.workdir, exist_ok=True)
    out = {"config": config.to_dict(), "splits": {k: len(v) for k, v in splits.to_dict().items()},
           "results": records, "seconds": time.perf_counter() - start}
    splits_lib.save_json(out, os.path.join(config.workdir, "results.json"))
    return records


def parse_flags(argv: list[str]) -> list[str]:
    """absl flag parsing; an unknown config field is one clear line, not a traceback."""
    try:
        return flags.FLAGS(argv)
    except (AttributeError, KeyError) as e:
        words = str(e).replace("\\n", " ").replace("\\", "").replace("'", "").split()
        field, hint = (words[0], " ".join(words[1:])) if words else ("?", "")
        raise SystemExit(f"error: unknown config field {field!r}. {hint}".rstrip()) from None


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    config = _CONFIG.value
    try:
        records = run(config)
    except (ConfigError, DataError) as e:
        raise app.UsageError(str(e)) from None
    metric = "mAP" if records and config.dataset != "mufac" else "acc"
    print(f"\n{config.dataset}, N={config.num_identities}, seed {config.seed} "
          f"({jax.devices()[0].platform.upper()}):")
    print(format_table(records, metric))
    gap = {r["method"]: r["forget"]["metric"] for r in records}
    if {"pretrain", "retrain"} <= set(gap):
        print(f"forget {metric}: pretrain {gap['pretrain']:.2f} vs retrain {gap['retrain']:.2f} "
              f"(gap {gap['pretrain'] - gap['retrain']:+.2f})")
    print(f"results: {os.path.join(config.workdir, 'results.json')}")


if __name__ == "__main__":
    np.set_printoptions(precision=4)
    app.run(main, flags_parser=parse_flags)
