"""The 1-SHUI study: data, splits, pretrain, retrain (the oracle), unlearning methods, report.

This is ``main.py:main`` of the reference (SPEC.md sections 4, 5 and 10) as library functions:
``run(config)`` makes the reference-exact split, runs or reuses every stage in ``config.stages``
(``study.stages``: one skeleton for all of them, reuse and resume keyed by ``study.reuse``'s
fingerprint), evaluates each model on retain / forget / test / val (eval transform), computes ToW
against the retrained model and writes ``results.{json,md,csv}`` and plots to the workdir.

Every stage lives in ``<checkpoint_dir>/<dataset>/<model>/<stage>_<N>_<seed>/``. Unlike the
reference, pretrain and retrain start from the same initial parameters drawn from the seed
(SynthFaces trains from scratch). Methods start from the pretrained model and receive what their
ACCESS grants (``study.access``).

Modules: ``context`` (config, dataset, split, evaluation), ``validate`` (every setting checked
before any data is read), ``access`` (what a method call receives), ``reuse`` (fingerprints),
``stages`` (the skeleton and its bodies), ``privacy`` (RMIA and the attack on people;
``config.mia.rmia``), ``plan`` (what a study would do, decided without running it). Layers, lowest
first: ``validate`` < ``context`` < ``access``, ``reuse`` < ``privacy`` < ``stages`` < this
module, which alone builds the RMIA reference models (``attack_models``).

A study's call path: ``main`` -> ``run`` -> ``train_stage`` / ``method_stage`` -> ``run_stage``
-> the stage's body (``train.fit``, or a method's ``prepare`` and ``unlearn``).
"""

from __future__ import annotations

import time

from absl import logging

from oneshui_jax import interrupts, metrics, report, sharding
from oneshui_jax.study import person_test, privacy
from oneshui_jax.study.context import Context, Status, evaluate_splits, initial_params, prepare
from oneshui_jax.study.stages import calibration_stage, method_stage, run_stage, train_stage
from oneshui_jax.study.validate import SECOND_ORACLE, TRAINING_STAGES, validate_config

__all__ = ["TRAINING_STAGES", "Context", "Status", "add_tow", "attack_models", "evaluate_splits",
           "initial_params", "method_stage", "prepare", "run", "run_stage", "train_stage",
           "validate_config"]


def add_tow(records: list[dict]) -> None:
    """ToW of every record against the retrained model's retain / forget / test metrics."""
    retrain = next((r for r in records if r["method"] == "retrain"), None)
    for r in records:
        r["tow"] = None if retrain is None else metrics.tow(
            {s: r[s]["metric"] for s in metrics.EVAL_SPLITS},
            {s: retrain[s]["metric"] for s in metrics.EVAL_SPLITS})


def run(config, status: Status | None = None) -> list[dict]:
    """Runs the study described by ``config``; returns one record per model. ``status`` (a
    :class:`Status`) tells, while it runs, where the study is."""
    start = time.perf_counter()
    status = status or Status()
    ctx = prepare(config, status)
    status.where = "while loading the initial model, before the first stage"
    init = initial_params(ctx)
    records, trained = [], {}
    for stage in config.stages:
        interrupts.check()
        if stage in TRAINING_STAGES:
            status.where = f"in stage {stage}"
            record, trained[stage] = train_stage(ctx, stage, init)
        else:
            if "pretrain" not in trained:  # methods start from the pretrained model
                status.where = "in stage pretrain"
                _, trained["pretrain"] = train_stage(ctx, "pretrain", init)
            status.where = f"in stage {stage}"
            record, params = method_stage(ctx, stage, trained["pretrain"],
                                          ctx.run_dir("pretrain"))
            if privacy.wants_rmia(config):  # kept for the attacks after the stages
                trained[stage] = params
        records.append(record)
    if person_test.wants_person_test(config):  # ensembles of pretrain and retrain
        status.where = "in the ensembles of the per-person test, after the stages"
        person_test.run(ctx, records)
    if privacy.wants_rmia(config):  # RMIA attacks every model after the stages
        status.where = "in the privacy attacks, after the stages"
        attack_models(ctx, records, trained)
    add_tow(records)
    if not sharding.is_primary():  # multi-host: the primary process writes the report
        return records
    status.where = "while writing the report, after the stages"
    report.write_report(config.workdir, records, config=config.to_dict(), extra={
        "splits": {k: len(v) for k, v in ctx.splits.to_dict().items()},
        "data_audit": ctx.data_audit,
        "data_fingerprint": ctx.dataset.fingerprint,  # report.load_records compares it
        "seconds": time.perf_counter() - start})
    return records


def attack_models(ctx: Context, records: list[dict], trained: dict) -> None:
    """RMIA and the attack on people (``study.privacy``) for every record but retrain's, each
    against its reference model: for pretrain the retrained model; for a method M, M applied
    to the retrained model in the reference context (``privacy.reference_context``: the same
    split, ``seed + 1``), an ordinary method stage built (or reused) here. With
    ``config.mia.rmia_held_out``, the grid point of the held-out selection is chosen first, on
    the calibration model (``stages.calibration_stage``, built or reused here)."""
    if "retrain" not in trained:
        raise ValueError("config.mia.rmia needs the retrained model: add 'retrain' to "
                         "config.stages")
    evaluation = privacy.Evaluation(ctx)
    ref_ctx = privacy.reference_context(ctx)
    retrain_dir = ctx.run_dir("retrain")
    if privacy.wants_held_out(ctx.config):
        ctx.status.where = "in the calibration model of RMIA's held-out selection"
        _, calibration = calibration_stage(ctx, initial_params(ctx))
        chosen = evaluation.calibrate(trained["retrain"], retrain_dir, calibration,
                                      ctx.run_dir(privacy.CALIBRATION))
        logging.info("mia: the held-out request selects (gamma, a) = (%s, %s): TPR %.2f%% at 1%% "
                     "FPR on %d of its images", chosen["gamma"], chosen["a"],
                     chosen["tpr_at_1pct"], chosen["members"])
    for record in records:
        name = record["method"]
        if name in ("retrain", SECOND_ORACLE):  # oracles: never trained on the forget set
            continue
        logging.info("mia: RMIA for %s (%d passes)", name, evaluation.passes.count)
        if name == "pretrain":
            ref_params, ref_dir = trained["retrain"], retrain_dir
        else:
            _, ref_params = method_stage(ref_ctx, name, trained["retrain"], retrain_dir)
            ref_dir = ref_ctx.run_dir(name)
        evaluation.attack(record, trained[name], ref_params, ref_dir)
