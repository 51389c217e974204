"""The per-person likelihood-ratio test of a study (``mia/ulira.py``) on ensembles of models.

With ``config.ensemble.size = K`` (K >= 3) the study trains K members of pretrain and K of
retrain together (``stages.ensemble_stage``: training seeds ``seed .. seed + K - 1``, the same
split) and asks, for every forget person, whether the models that trained on them (pretrain
members) can be told apart from the models that did not (retrain members), by each person's
logit-scaled confidence of the true labels on their images (eval transform). The result goes to
the pretrain row as ``mia.ulira``: an attack that cannot tell pretrain from retrain cannot vouch
for any method. Applying each method to every pretrain member (its own row) is the next step of
this test.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from absl import logging

from oneshui_jax.data import pipeline
from oneshui_jax.mia import ulira
from oneshui_jax.study.context import Context
from oneshui_jax.study.stages import ensemble_stage


def wants_person_test(config) -> bool:
    """``config.ensemble.size`` > 0 (absent: no)."""
    return int((config.get("ensemble") or {}).get("size", 0)) > 0


def statistics(ctx: Context, stacked: Any) -> np.ndarray:
    """``[K, P]``: each member's statistic for each forget person (``ctx.splits.forget`` in
    order), over the person's forget images (their support images are not among them)."""
    from oneshui_jax import ensemble

    images = np.asarray(ctx.images["forget"])
    owners = np.asarray(ctx.dataset.annotations.identities)[images]
    cfg = ctx.pipeline_config(ctx.config.data.eval_batch_size)
    size = int(ctx.config.ensemble.size)
    out = np.empty((size, len(ctx.splits.forget)))
    for k in range(size):
        params = ensemble.member(stacked, k)
        logits, labels = [], []
        for batch in pipeline.eval_batches(ctx.dataset.source, images, cfg):
            mask = np.asarray(batch["mask"])
            z, _ = ctx.eval_step(params, batch["image"], batch["label"])
            logits.append(np.asarray(z)[mask])
            labels.append(np.asarray(batch["label"])[mask])
        per_image = ulira.confidence(np.concatenate(logits), np.concatenate(labels),
                                     ctx.dataset.task)
        out[k] = ulira.person_statistic(per_image, owners, ctx.splits.forget)
    return out


def run(ctx: Context, records: list[dict]) -> dict[str, Any]:
    """Trains (or reuses) both ensembles, runs the test and adds it to the pretrain record
    (``mia.ulira``; also returned)."""
    _, pretrained = ensemble_stage(ctx, "pretrain")
    _, retrained = ensemble_stage(ctx, "retrain")
    result = ulira.test(statistics(ctx, pretrained), statistics(ctx, retrained),
                        people=ctx.splits.forget, seed=int(ctx.config.seed))
    logging.info("per-person test, pretrain vs retrain (%d members each): AUC %.1f%% [%.1f, "
                 "%.1f], %.0f%% of the forget people told apart at 5%% FPR",
                 int(ctx.config.ensemble.size), result["auc"], *result["auc_interval"],
                 result["told_apart"])
    for record in records:
        if record["method"] == "pretrain":
            record.setdefault("mia", {})["ulira"] = result
    return result
