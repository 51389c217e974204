"""The privacy evaluation of a study: RMIA with one reference model and the attack on people
(SPEC.md 5.5; ``config.mia.rmia``).

The reference builds its reference ("shadow") models by hand: it copies the retrained checkpoint
under another name and runs the method again with ``--seed 1``. Here the study does it itself,
after its stages, for every target in ``config.stages`` but ``retrain``:

* target ``pretrain``: the reference model is the retrained model of the same split;
* target method M: the reference model is M applied to the retrained model, with the split of
  this study (``config.split_seed``, default ``config.seed``) and every other draw from
  ``config.seed + 1``. It is an ordinary method stage in its own run folder
  (``<M>_<N>_<seed+1>_split<seed>``), so it is reused, resumed and fingerprinted like any other.

Signals: ``config.mia.passes`` (the reference: 8) passes with the training augmentation
(``pipeline.augmented_pass``: in order, batch ``config.mia.batch_size``, per-pass seeds) over the
train images (every TRAIN identity, the forget identities included), the forget images and the
validation images, per-sample losses of the target and of its reference model; z = train ∪ val.
``oneshui_jax.mia.rmia.score_grid`` scores them with the reference's formula and
``rmia.best`` keeps its (γ, a). The scores of that point then feed ``mia.per_person``: forget
identities (members) against validation identities (non-members), by each person's mean and max.

``config.mia.rmia_variant = "canonical"`` (a named option; the default ``"reference"`` is what the
paper reports, Q5) runs canonical offline RMIA (``rmia.score_grid_canonical``) on the
probability of each image's true label, read off the same losses: ``exp(-loss)`` for a class
(cross-entropy), ``exp(-C · loss)`` for C independent labels (the joint Bernoulli likelihood of
the label vector; the loss is the mean BCE over labels).

Each target's record gains ``mia.rmia`` (``auc`` and ``tpr_at_1e-4`` in %, ``gamma``, ``a``,
the whole ``grid``, ``roc``) and ``mia.per_person`` (``mean`` / ``max``: ``auc`` and TPR at 1% and
10% FPR in %, ``roc``), and ``mia.reference_run_dir``.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
from absl import logging

from oneshui_jax import train as train_lib
from oneshui_jax.data import pipeline
from oneshui_jax.study.context import Context

SIGNAL_SPLITS = ("train", "forget", "val")
VARIANTS = ("reference", "canonical")


def probabilities(losses: np.ndarray, task: str, num_classes: int) -> np.ndarray:
    """The probability of the true label(s) from per-sample losses (module docstring)."""
    scale = num_classes if task == "multilabel" else 1
    return np.exp(-scale * np.asarray(losses, np.float64))


def wants_rmia(config) -> bool:
    """``config.mia.rmia`` (absent: False)."""
    return bool((config.get("mia") or {}).get("rmia", False))


def reference_context(ctx: Context) -> Context:
    """The context of a target's reference model: the same data and split, ``seed + 1`` for
    every other draw (``config.split_seed`` keeps the split)."""
    from oneshui_jax.study.context import split_seed

    config = ctx.config.copy_and_resolve_references()
    config.split_seed = split_seed(ctx.config)
    config.seed = ctx.config.seed + 1
    return dataclasses.replace(ctx, config=config)


def signals(ctx: Context, params, passes: int, batch_size: int) -> dict[str, np.ndarray]:
    """``{split: [passes, n]}`` per-sample losses of ``params`` on ``SIGNAL_SPLITS`` under the
    training augmentation, pass ``k`` seeded by ``[config.seed, k]`` (the same crops for the
    target and its reference model)."""
    t = ctx.config.train
    step = train_lib.make_eval_step(ctx.model_cfg, ctx.dataset.task, t.compute_dtype,
                                    t.attention)
    cfg = ctx.pipeline_config(batch_size, crop_scale=tuple(ctx.config.data.crop_scale))
    out = {}
    for split in SIGNAL_SPLITS:
        rows = []
        for k in range(passes):
            batches = pipeline.to_iterator(
                pipeline.augmented_pass(ctx.dataset.source, ctx.images[split], cfg, k), cfg)
            rows.append(train_lib.evaluate(step, params, batches, ctx.dataset.task)["losses"])
        out[split] = np.stack(rows)
    return out


def attack(ctx: Context, target: dict[str, np.ndarray],
           reference: dict[str, np.ndarray], variant: str = "reference") -> dict[str, Any]:
    """``{"rmia": ..., "per_person": ...}`` from the loss signals of a target and its reference
    (module docstring), in %."""
    from oneshui_jax.mia import per_person, rmia, roc

    if variant == "canonical":
        convert = lambda x: probabilities(x, ctx.dataset.task, ctx.dataset.num_classes)
        target = {k: convert(v) for k, v in target.items()}
        reference = {k: convert(v) for k, v in reference.items()}
    z_in = np.concatenate([target["train"], target["val"]], axis=1)
    z_avg = np.concatenate([reference["train"], reference["val"]], axis=1)
    score = rmia.score_grid_canonical if variant == "canonical" else rmia.score_grid
    grid = score(z_in, z_avg, target["forget"], reference["forget"], target["val"],
                 reference["val"])
    best = rmia.best(grid) or grid[0]  # no TPR above 0: the first point (the reference's start)
    entry = {"variant": variant,
             "auc": 100.0 * best["auc"], "tpr_at_1e-4": 100.0 * best[rmia.TPR_KEY],
             "gamma": best["gamma"], "a": best["a"], "selected": rmia.best(grid) is not None,
             "grid": [{"gamma": g["gamma"], "a": g["a"], "auc": 100.0 * g["auc"],
                       "tpr_at_1e-4": 100.0 * g[rmia.TPR_KEY]} for g in grid],
             "roc": roc.compact(best["fpr"], best["tpr"])}
    ids = ctx.dataset.annotations.identities
    images = np.concatenate([ctx.images["forget"], ctx.images["val"]])
    people = per_person.attack(best["scores"], ids[images], ctx.splits.forget, ctx.splits.val)
    persons = {}
    for how in ("mean", "max"):
        p = people[how]
        persons[how] = {"auc": 100.0 * p["auc"],
                        "tpr_at_fpr_1pct": 100.0 * p["tpr_at_fpr_1pct"],
                        "tpr_at_fpr_10pct": 100.0 * p["tpr_at_fpr_10pct"],
                        "roc": {"fpr": list(map(float, p["fpr"])),
                                "tpr": list(map(float, p["tpr"]))}}
    persons["members"], persons["nonmembers"] = people["n_members"], people["n_nonmembers"]
    return {"rmia": entry, "per_person": persons}


def run(ctx: Context, records: list[dict], trained: dict[str, Any]) -> None:
    """Adds ``mia.rmia`` and ``mia.per_person`` to every record but retrain's (module
    docstring), building or reusing each target's reference model."""
    from oneshui_jax.study.stages import method_stage

    mia = ctx.config.mia
    passes, batch_size = int(mia.get("passes", 8)), int(mia.get("batch_size", 32))
    if "retrain" not in trained:
        raise ValueError("config.mia.rmia needs the retrained model: add 'retrain' to "
                         "config.stages")
    ref_ctx = reference_context(ctx)
    retrain_dir = ctx.run_dir("retrain")
    retrain_signals = None
    for record in records:
        name = record["method"]
        if name == "retrain":
            continue
        logging.info("mia: RMIA for %s (%d passes)", name, passes)
        if name == "pretrain":
            ref_dir = retrain_dir
            if retrain_signals is None:
                retrain_signals = signals(ctx, trained["retrain"], passes, batch_size)
            reference = retrain_signals
        else:
            _, ref_params = method_stage(ref_ctx, name, trained["retrain"], retrain_dir)
            ref_dir = ref_ctx.run_dir(name)
            reference = signals(ctx, ref_params, passes, batch_size)
        target = signals(ctx, trained[name], passes, batch_size)
        record.setdefault("mia", {}).update(
            attack(ctx, target, reference, mia.get("rmia_variant", "reference")))
        record["mia"]["reference_run_dir"] = ref_dir
