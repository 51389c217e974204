"""The study's privacy evaluation (study/privacy.py): RMIA with reference models the study builds
itself, and the attack on people."""

import os
import shutil

import numpy as np
import pytest

from oneshui_jax import checkpoints, study
from oneshui_jax import train as train_lib
from oneshui_jax.data import pipeline
from oneshui_jax.errors import ConfigError
from oneshui_jax.mia import rmia
from oneshui_jax.study import privacy


def _augmented_losses(ctx, params, split, passes, batch_size):
    """Per-sample losses under the training augmentation, written out here (not through the
    module): pass k of ``pipeline.augmented_pass``."""
    t = ctx.config.train
    step = train_lib.make_eval_step(ctx.model_cfg, ctx.dataset.task, t.compute_dtype,
                                    t.attention)
    cfg = pipeline.PipelineConfig(image_size=ctx.config.data.image_size, batch_size=batch_size,
                                  seed=ctx.config.seed,
                                  crop_scale=tuple(ctx.config.data.crop_scale))
    return np.stack([train_lib.evaluate(step, params, pipeline.to_iterator(
        pipeline.augmented_pass(ctx.dataset.source, ctx.images[split], cfg, k), cfg),
        ctx.dataset.task)["losses"] for k in range(passes)])


def test_rmia_builds_its_reference_models_and_attacks_models_and_people(small_study, tmp_path):
    config = small_study.config.copy_and_resolve_references()
    root = tmp_path / "ckpt"
    for stage in ("pretrain", "retrain"):  # the shared study's models, copied (never written)
        src = small_study.run_dir(stage)
        shutil.copytree(src, root / os.path.relpath(src, config.checkpoint_dir))
    config.checkpoint_dir, config.workdir = str(root), str(tmp_path / "work")
    config.stages = ("pretrain", "retrain", "lipschitz")
    config.mia.rmia, config.mia.passes, config.mia.batch_size = True, 2, 256
    records = study.run(config)
    by_method = {r["method"]: r for r in records}
    assert "mia" not in by_method["retrain"]
    ctx = study.prepare(config)
    # pretrain's reference is the retrained model; lipschitz's is lipschitz applied to the
    # retrained model with seed 1 on the split of seed 0, in its own run folder
    ref_dir = checkpoints.run_dir(str(root), "synthfaces", config.model.name, "lipschitz", 5, 1,
                                  split_seed=0)
    assert by_method["pretrain"]["mia"]["reference_run_dir"] == ctx.run_dir("retrain")
    assert by_method["lipschitz"]["mia"]["reference_run_dir"] == ref_dir
    meta = checkpoints.read_metadata(ref_dir)
    assert checkpoints.is_finished(ref_dir)
    assert (meta["config"]["seed"], meta["config"]["split_seed"]) == (1, 0)
    assert meta["base_params_hash"] == checkpoints.read_metadata(
        ctx.run_dir("retrain"))["params_hash"]
    assert meta["splits"] == ctx.splits.to_dict()
    # pretrain's RMIA equals the grid computed here from losses computed here
    params = {s: checkpoints.load_params(ctx.run_dir(s), study.initial_params(ctx))
              for s in ("pretrain", "retrain")}
    sig = {s: {split: _augmented_losses(ctx, params[s], split, 2, 256)
               for split in ("train", "forget", "val")} for s in params}
    z = {s: np.concatenate([sig[s]["train"], sig[s]["val"]], axis=1) for s in sig}
    grid = rmia.score_grid(z["pretrain"], z["retrain"], sig["pretrain"]["forget"],
                           sig["retrain"]["forget"], sig["pretrain"]["val"],
                           sig["retrain"]["val"])
    chosen = rmia.best(grid) or grid[0]
    got = by_method["pretrain"]["mia"]["rmia"]
    assert got["auc"] == pytest.approx(100 * chosen["auc"])
    assert got["tpr_at_1e-4"] == pytest.approx(100 * chosen[rmia.TPR_KEY])
    assert (got["gamma"], got["a"]) == (chosen["gamma"], chosen["a"])
    assert [(g["gamma"], g["a"]) for g in got["grid"]] == [(g["gamma"], g["a"]) for g in grid]
    # the attack on people: the forget identities against the validation identities
    people = by_method["lipschitz"]["mia"]["per_person"]
    assert (people["members"], people["nonmembers"]) == (5, len(ctx.splits.val))
    for how in ("mean", "max"):
        assert 0.0 <= people[how]["auc"] <= 100.0
        assert people[how]["tpr_at_fpr_1pct"] <= people[how]["tpr_at_fpr_10pct"]
    # the report: the attack columns and roc.png
    md = (tmp_path / "work" / "results.md").read_text()
    assert "RMIA AUC" in md and "person AUC" in md and "[roc.png](roc.png)" in md
    assert (tmp_path / "work" / "roc.png").stat().st_size > 0


def test_canonical_variant_scores_true_label_probabilities(small_study):
    """rmia_variant="canonical": canonical RMIA on exp(-C·loss) (multi-label) / exp(-loss)."""
    rng = np.random.default_rng(0)
    ctx = study.prepare(small_study.config)
    sig = lambda: {s: rng.gamma(2.0, 0.2, (3, len(ctx.images[s])))
                   for s in ("train", "forget", "val")}
    target, reference = sig(), sig()
    got = privacy.attack(ctx, target, reference, "canonical")["rmia"]
    c = ctx.dataset.num_classes
    assert ctx.dataset.task == "multilabel" and got["variant"] == "canonical"
    p = {name: {s: np.exp(-c * v) for s, v in d.items()}
         for name, d in (("in", target), ("ref", reference))}
    grid = rmia.score_grid_canonical(
        np.concatenate([p["in"]["train"], p["in"]["val"]], 1),
        np.concatenate([p["ref"]["train"], p["ref"]["val"]], 1),
        p["in"]["forget"], p["ref"]["forget"], p["in"]["val"], p["ref"]["val"])
    chosen = rmia.best(grid) or grid[0]
    assert got["auc"] == pytest.approx(100 * chosen["auc"])
    assert privacy.probabilities(np.array([0.5]), "classification", 8) == pytest.approx(
        np.exp(-0.5))
    ref = privacy.attack(ctx, target, reference)["rmia"]
    assert ref["variant"] == "reference" and [g["auc"] for g in ref["grid"]] != [
        g["auc"] for g in got["grid"]]


def test_rmia_settings_are_checked_before_any_work(small_study):
    config = small_study.config.copy_and_resolve_references()
    config.mia.rmia = True
    config.stages = ("pretrain", "lipschitz")
    with pytest.raises(ConfigError, match="config.mia.rmia needs the retrained model"):
        study.validate_config(config)
    config.stages = ("pretrain", "retrain")
    config.mia.passes = 0
    with pytest.raises(ConfigError, match="config.mia.passes must be an int >= 1"):
        study.validate_config(config)
    config.mia.passes = 2
    config.mia.rmia_variant = "lira"
    with pytest.raises(ConfigError, match="config.mia.rmia_variant"):
        study.validate_config(config)
    assert privacy.wants_rmia(config) and not privacy.wants_rmia(small_study.config)
