"""The study's privacy evaluation (study/privacy.py): RMIA with reference models the study builds
itself, and the attack on people."""

import json
import os
import shutil

import numpy as np
import pytest

from oneshui_jax import checkpoints, study
from oneshui_jax import train as train_lib
from oneshui_jax.data import pipeline
from oneshui_jax.errors import CheckpointError, ConfigError
from oneshui_jax.mia import rmia
from oneshui_jax.study import plan, privacy
from oneshui_jax.study.context import dataset_folder


def _augmented_losses(ctx, params, passes, batch_size, held_out=None):
    """``{"z", "forget", "val"}`` -> [passes, n] losses under the training augmentation, written
    out here (not through the module): pass k of ``pipeline.augmented_pass`` over every image of
    train ∪ val (the forget images are train images) in index order."""
    t = ctx.config.train
    step = train_lib.make_eval_step(ctx.model_cfg, ctx.dataset.task, t.compute_dtype,
                                    t.attention)
    cfg = pipeline.PipelineConfig(image_size=ctx.config.data.image_size, batch_size=batch_size,
                                  seed=ctx.config.seed,
                                  crop_scale=tuple(ctx.config.data.crop_scale))
    images = np.unique(np.concatenate([ctx.images["train"], ctx.images["val"]]))
    losses = np.stack([train_lib.evaluate(step, params, pipeline.to_iterator(
        pipeline.augmented_pass(ctx.dataset.source, images, cfg, k), cfg),
        ctx.dataset.task)["losses"] for k in range(passes)])
    z = np.concatenate([ctx.images["train"], ctx.images["val"]])
    at = {"z": z, "forget": ctx.images["forget"], "val": ctx.images["val"]}
    if held_out is not None:
        at["held_out"] = held_out
    return {k: losses[:, np.searchsorted(images, v)] for k, v in at.items()}


@pytest.mark.slow
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
    ref_dir = checkpoints.run_dir(str(root), dataset_folder(config), config.model.name,
                                  "lipschitz", 5, 1, split_seed=0)
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
    sig = {s: _augmented_losses(ctx, params[s], 2, 256) for s in params}
    grid = rmia.score_grid(sig["pretrain"]["z"], sig["retrain"]["z"], sig["pretrain"]["forget"],
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
    assert got["tpr_at_1pct"] == pytest.approx(
        100 * np.interp(0.01, chosen["fpr"], chosen["tpr"]))
    # the fixed point: config.mia.rmia_point of the same grid, whatever the labels say
    fixed = rmia.at_point(grid, *config.mia.rmia_point)
    assert by_method["pretrain"]["mia"]["rmia_fixed"]["auc"] == pytest.approx(100 * fixed["auc"])
    # the held-out selection: a calibration model trained without N other TRAIN people, the
    # point chosen on them with the retrained model as target, then read off every target's grid
    identities, images = privacy.held_out(ctx)
    assert len(identities) == 5 and not set(identities) & set(ctx.splits.forget)
    assert set(identities) <= set(ctx.splits.train) and len(images) > 0
    calibration_dir = ctx.run_dir(privacy.CALIBRATION)
    calibration_meta = checkpoints.read_metadata(calibration_dir)
    assert calibration_meta["fingerprint"]["parts"]["train"]["held_out_identities"] == list(
        identities)
    held = by_method["pretrain"]["mia"]["rmia_held_out"]
    calibration = checkpoints.load_params(calibration_dir, study.initial_params(ctx))
    cal = _augmented_losses(ctx, calibration, 2, 256, held_out=images)
    ret = _augmented_losses(ctx, params["retrain"], 2, 256, held_out=images)
    # The selection reads the z, held-out and val rows only: no forget row is even given.
    only = ("z", "held_out", "val")
    selected = privacy.select_on_held_out(ctx, {k: ret[k] for k in only},
                                          {k: cal[k] for k in only})
    assert held["selected_on"] == pytest.approx(selected)
    assert (held["gamma"], held["a"]) == (selected["gamma"], selected["a"])
    at = rmia.at_point(grid, selected["gamma"], selected["a"])
    assert held["auc"] == pytest.approx(100 * at["auc"])
    assert held["tpr_at_1pct"] == pytest.approx(100 * at["tpr_at_1pct"])
    assert "RMIA AUC, held-out selection" in md and "RMIA AUC, fixed point" in md
    done, reason, plans = plan.check(config)  # the sweep's skip knows the calibration model
    assert done, reason
    assert (privacy.CALIBRATION, calibration_dir, "reuse") in [
        (p.stage, p.run_dir, p.decision) for p in plans]

    # a rerun reuses the reference model and every model's cached signals: no forward pass
    stamp = os.path.getmtime(os.path.join(ref_dir, checkpoints.METADATA_FILE))
    for rdir in (ctx.run_dir("pretrain"), ctx.run_dir("retrain"), ctx.run_dir("lipschitz"),
                 ref_dir, calibration_dir):
        assert len(os.listdir(os.path.join(rdir, privacy.CACHE_DIR))) == 1
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(train_lib, "make_eval_step", _no_signals)
        again = {r["method"]: r for r in study.run(config)}
    assert os.path.getmtime(os.path.join(ref_dir, checkpoints.METADATA_FILE)) == stamp
    assert again["lipschitz"]["mia"]["rmia"] == by_method["lipschitz"]["mia"]["rmia"]

    # a reference model made on another split is refused, not used
    meta = json.loads(open(os.path.join(ref_dir, checkpoints.METADATA_FILE)).read())
    meta["splits"]["forget"] = meta["splits"]["forget"][::-1]
    with open(os.path.join(ref_dir, checkpoints.METADATA_FILE), "w") as f:
        json.dump(meta, f)
    with pytest.raises(CheckpointError, match="splits differ"):
        study.run(config)


def _no_signals(*args, **kwargs):
    raise AssertionError("signals were computed again instead of read from the cache")


def test_canonical_variant_scores_true_label_probabilities(small_study):
    """rmia_variant="canonical": canonical RMIA on exp(-C·loss) (multi-label) / exp(-loss)."""
    rng = np.random.default_rng(0)
    ctx = study.prepare(small_study.config)
    sizes = {"z": len(ctx.images["train"]) + len(ctx.images["val"]),
             "forget": len(ctx.images["forget"]), "val": len(ctx.images["val"])}
    sig = lambda: {s: rng.gamma(2.0, 0.2, (3, n)) for s, n in sizes.items()}
    target, reference = sig(), sig()
    got = privacy.attack(ctx, target, reference, "canonical")["rmia"]
    c = ctx.dataset.num_classes
    assert ctx.dataset.task == "multilabel" and got["variant"] == "canonical"
    p = {name: {s: np.exp(-c * v) for s, v in d.items()}
         for name, d in (("in", target), ("ref", reference))}
    grid = rmia.score_grid_canonical(
        p["in"]["z"], p["ref"]["z"], p["in"]["forget"], p["ref"]["forget"], p["in"]["val"],
        p["ref"]["val"])
    np.testing.assert_allclose([g["auc"] for g in got["grid"]], [100 * g["auc"] for g in grid])
    chosen = rmia.best(grid)  # random signals: possibly no point with a TPR above 0
    assert got["selected"] == (chosen is not None)
    assert got["auc"] == pytest.approx(100 * chosen["auc"] if chosen else 0.0)
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
    config.mia.rmia_variant = "reference"
    config.mia.subsample = "sometimes"
    with pytest.raises(ConfigError, match="config.mia.subsample is 'sometimes'"):
        study.validate_config(config)
    config.mia.subsample, config.mia.subsample_val = "once", 0
    with pytest.raises(ConfigError, match="config.mia.subsample_val must be an int >= 1"):
        study.validate_config(config)
    assert privacy.wants_rmia(config) and not privacy.wants_rmia(small_study.config)


def _plan_ctx(small_study, subsample, n_z=40, n_val=9, passes=3):
    config = small_study.config.copy_and_resolve_references()
    config.mia.passes, config.mia.subsample = passes, subsample
    config.mia.subsample_z, config.mia.subsample_val = n_z, n_val
    return study.prepare(config)


def test_plan_subsamples_z_and_val_per_pass_or_once(small_study):
    """Q6: "per_pass" draws other z / val images in every pass, "once" the same in all."""
    ctx = _plan_ctx(small_study, "none")
    rows = privacy.plan(ctx)
    z = np.concatenate([ctx.images["train"], ctx.images["val"]])
    for name, want in (("z", z), ("forget", ctx.images["forget"]), ("val", ctx.images["val"])):
        assert rows[name].shape == (3, len(want))
        assert (rows[name] == want).all()
    for mode in ("per_pass", "once"):
        rows = privacy.plan(_plan_ctx(small_study, mode))
        assert rows["z"].shape == (3, 40) and rows["val"].shape == (3, 9)
        assert (rows["forget"] == ctx.images["forget"]).all()  # never subsampled
        for name, pool in (("z", z), ("val", ctx.images["val"])):
            assert np.isin(rows[name], pool).all()
            assert all(len(set(row)) == row.size for row in rows[name])  # no repeats in a pass
            same = all((row == rows[name][0]).all() for row in rows[name])
            assert same == (mode == "once")
        assert (privacy.plan(_plan_ctx(small_study, mode))["val"] == rows["val"]).all()  # seeded
    # more than there is keeps everything, as torch.randperm(n)[:k] does
    rows = privacy.plan(_plan_ctx(small_study, "once", n_z=10**6, n_val=10**6))
    assert sorted(rows["val"][0]) == sorted(ctx.images["val"])
    assert rows["z"].shape[1] == len(z)


@pytest.mark.slow
def test_signals_are_the_losses_of_each_image_and_cached(small_study, tmp_path):
    ctx = _plan_ctx(small_study, "per_pass", passes=2)
    rows = privacy.plan(ctx)
    params = checkpoints.load_params(small_study.run_dir("pretrain"), study.initial_params(ctx))
    run_dir = tmp_path / "run"  # the model's folder: only its metadata (params_hash) is read
    run_dir.mkdir()
    shutil.copy(os.path.join(small_study.run_dir("pretrain"), checkpoints.METADATA_FILE),
                run_dir / checkpoints.METADATA_FILE)
    got = privacy.signals(ctx, params, privacy.Passes(ctx, rows, 64), str(run_dir))
    # every image once per pass: pass k scores the images row k names, in index order, with the
    # crops of pass k; an image in two rows of a pass gets one loss
    t = ctx.config.train
    step = train_lib.make_eval_step(ctx.model_cfg, ctx.dataset.task, t.compute_dtype,
                                    t.attention)
    cfg = pipeline.PipelineConfig(image_size=ctx.config.data.image_size, batch_size=256,
                                  seed=ctx.config.seed,
                                  crop_scale=tuple(ctx.config.data.crop_scale))
    shared = 0
    for k in range(2):
        images = sorted(set(rows["z"][k]) | set(rows["forget"][k]) | set(rows["val"][k]))
        losses = dict(zip(images, train_lib.evaluate(step, params, pipeline.to_iterator(
            pipeline.augmented_pass(ctx.dataset.source, np.array(images), cfg, k), cfg),
            ctx.dataset.task)["losses"], strict=True))
        for name in rows:
            want = [losses[i] for i in rows[name][k]]
            np.testing.assert_allclose(got[name][k], want, rtol=1e-5, atol=1e-6)
        shared += len(set(rows["z"][k]) & set(rows["val"][k]))
    assert shared > 0  # the case of one image in two rows was exercised
    # without subsampling: the losses of every image of train ∪ val (computed here another way)
    plain = _plan_ctx(small_study, "none", passes=2)
    full = privacy.signals(plain, params, privacy.Passes(plain, privacy.plan(plain), 256))
    want = _augmented_losses(plain, params, 2, 256)
    for name in want:
        np.testing.assert_allclose(full[name], want[name], rtol=1e-5, atol=1e-6)
    # the passes' images shared between models: kept in memory within the budget, same losses
    for budget, kept in ((1000, 2), (0.001, 0)):
        shared_passes = privacy.Passes(ctx, rows, 64, budget_mb=budget)
        for _ in range(2):  # a second model reads the kept batches
            again = privacy.signals(ctx, params, shared_passes)
            for name in rows:
                np.testing.assert_array_equal(again[name], got[name])
        assert len(shared_passes._kept) == kept
    # per_pass rows: the attack on people is left out, with the reason
    out = privacy.attack(ctx, got, {k: v * 1.1 for k, v in got.items()}, rows=rows)
    assert "per_pass" in out["per_person"]["skipped"] and "auc" in out["rmia"]
    # cached: the second call computes nothing; other parameters are computed again
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(train_lib, "make_eval_step", _no_signals)
        cached = privacy.signals(ctx, params, privacy.Passes(ctx, rows, 64), str(run_dir))
        for name in rows:
            np.testing.assert_array_equal(cached[name], got[name])
        meta = json.loads((run_dir / checkpoints.METADATA_FILE).read_text())
        meta["params_hash"] = "0" * 64
        (run_dir / checkpoints.METADATA_FILE).write_text(json.dumps(meta))
        with pytest.raises(AssertionError, match="computed again"):
            privacy.signals(ctx, params, privacy.Passes(ctx, rows, 64), str(run_dir))


def test_rmia_without_any_point_above_zero_tpr_reports_the_reference_zeros():
    """When no (γ, a) has TPR > 0 at 1e-4 FPR the reference reports AUC 0 and TPR 0 (its
    starting values): so does the study, with no curve, no TPR@1% and no attack on people,
    though the grid's points have AUCs well above 0. Planted: one val image scores as the most
    member-like of all, every forget image beats every other val image."""
    n_forget, n_val, n_z, passes = 20, 50, 300, 3
    ones = lambda n: np.ones((passes, n))
    forget_in = np.full((passes, n_forget), 0.5)
    val_in = np.full((passes, n_val), 2.0)
    val_in[:, 0] = 1e-3  # the one most member-like image is a non-member
    z = np.broadcast_to(np.linspace(0.01, 3.0, n_z), (passes, n_z))  # some z below 0.5 / 8
    target = {"z": z, "forget": forget_in, "val": val_in}
    reference = {"z": ones(n_z), "forget": ones(n_forget), "val": ones(n_val)}
    rows = {"forget": np.zeros((passes, n_forget), int), "val": np.zeros((passes, n_val), int)}
    out = privacy.attack(None, target, reference, rows=rows)
    got = out["rmia"]
    assert rmia.best(rmia.score_grid(target["z"], reference["z"], forget_in,
                                     reference["forget"], val_in, reference["val"])) is None
    assert (got["auc"], got["tpr_at_1e-4"], got["selected"]) == (0.0, 0.0, False)
    assert got["roc"] is None and got["tpr_at_1pct"] is None and got["gamma"] is None
    assert max(g["auc"] for g in got["grid"]) > 90.0
    assert "selects none" in out["per_person"]["skipped"]
