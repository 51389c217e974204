"""How much the mAP's scores matter (SPEC Q4): every finished stage of a study, scored with the
reference's bf16-rounded sigmoid and with float scores, on the same logits.

    python bench/ap_scores.py --config=configs/synthfaces.py [--config.x=y ...] \
        [--out bench_out/ap_scores.json]

Reads the study's finished stages from ``config.checkpoint_dir`` (run the study first; nothing is
trained), evaluates each on retain / forget / test / val (eval transform, ``config.train``'s
compute dtype) and prints one table: mAP with float scores, with scores rounded to bfloat16 (what
the reference's ``torch.sigmoid`` of bf16 logits gives, ``config.train.ap_scores="reference"``
under bf16 compute), and their difference, per stage and split. Writes the same as JSON.
"""

from __future__ import annotations

import json
import os
import sys

import numpy as np
from absl import app, flags
from ml_collections import config_flags

from oneshui_jax import checkpoints, files, metrics, study
from oneshui_jax import train as train_lib
from oneshui_jax.data import pipeline

_CONFIG = config_flags.DEFINE_config_file("config", "configs/synthfaces.py", "the study's config")
_OUT = flags.DEFINE_string("out", "bench_out/ap_scores.json", "where the JSON goes")


def split_logits(ctx, params) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """``{split: (logits, labels)}`` of every evaluation split (``train.evaluate``)."""
    t = ctx.config.train
    step = train_lib.make_eval_step(ctx.model_cfg, ctx.dataset.task, t.compute_dtype,
                                    t.attention)
    cfg = ctx.pipeline_config(ctx.config.data.eval_batch_size)
    out = {}
    for split in metrics.EVAL_SPLITS:
        result = train_lib.evaluate(
            step, params, pipeline.eval_batches(ctx.dataset.source, ctx.images[split], cfg),
            ctx.dataset.task)
        out[split] = (result["logits"], result["labels"])
    return out


def main(argv) -> None:
    del argv
    config = _CONFIG.value
    ctx = study.prepare(config)
    if ctx.dataset.task != "multilabel":
        sys.exit(f"error: {config.dataset} is a classification task: its metric is accuracy, "
                 "which takes no scores")
    rows = []
    for stage in config.stages:
        run_dir = ctx.run_dir(stage)
        if not checkpoints.is_finished(run_dir):
            print(f"{stage}: no finished run at {run_dir}, skipped")
            continue
        params = checkpoints.load_params(run_dir)
        for split, (logits, labels) in split_logits(ctx, params).items():
            plain = metrics.mean_average_precision(logits, labels)
            rounded = metrics.mean_average_precision(logits, labels, "bfloat16")
            ties = 1.0 - len(np.unique(metrics.sigmoid_scores(logits, "bfloat16"))) / logits.size
            rows.append({"stage": stage, "split": split, "images": len(labels),
                         "map_float": plain, "map_bf16_scores": rounded,
                         "difference": rounded - plain, "tied_share": ties})
    print("| stage | split | images | mAP, float scores | mAP, bf16 scores | difference |")
    print("|---|---|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['stage']} | {r['split']} | {r['images']} | {r['map_float']:.3f} | "
              f"{r['map_bf16_scores']:.3f} | {r['difference']:+.3f} |")
    os.makedirs(os.path.dirname(os.path.abspath(_OUT.value)), exist_ok=True)
    with files.atomic_open(_OUT.value, "w") as f:
        json.dump({"dataset": config.dataset, "compute_dtype": config.train.compute_dtype,
                   "rows": rows}, f, indent=1)
    print(f"wrote {_OUT.value}")


if __name__ == "__main__":
    app.run(main)
