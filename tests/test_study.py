"""End to end: the study on the small SynthFaces variant, training, resume, reuse, errors."""

import dataclasses
import glob
import json
import os
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from oneshui_jax import checkpoints, metrics, optim, study
from oneshui_jax import losses as losses_lib
from oneshui_jax import train as train_lib
from oneshui_jax.data import pipeline
from oneshui_jax.errors import CheckpointError, ConfigError, DataError
from oneshui_jax.models import vit
from oneshui_jax.study import access
from oneshui_jax.unlearn import api, registry, support_ascent

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def tfds_dir(synthfaces_tfds):
    return synthfaces_tfds


@pytest.fixture(scope="module")
def finished_study(small_study):
    return small_study.config, small_study.records


@pytest.mark.slow
def test_study_runs_end_to_end(finished_study):
    config, records = finished_study
    assert [r["method"] for r in records] == ["pretrain", "retrain", "meta_unlearn",
                                              "support_ascent"]
    assert [r["access"] for r in records] == ["none", "oracle", "stats", "stats"]
    for r in records:
        for split in metrics.EVAL_SPLITS:
            assert 0.0 < r[split]["metric"] <= 100.0 and np.isfinite(r[split]["loss"])
    assert [len(r["history"]) for r in records[:2]] == [3, 3]
    assert records[2]["prepare"]["meta_history"][0]["requests"] > 0
    assert records[2]["unlearn"]["seconds"] > 0 and records[3]["prepare"]["alpha"] >= 0
    assert records[1]["tow"] == pytest.approx(100.0)  # the oracle against itself
    assert records[0]["tow"] < 100.0
    saved = json.load(open(os.path.join(config.workdir, "results.json")))
    assert saved["results"][0]["forget"] == records[0]["forget"]
    assert saved["splits"]["forget"] == 5
    assert [r["access"] for r in saved["results"]] == ["none", "oracle", "stats", "stats"]
    assert "| access |" in open(os.path.join(config.workdir, "results.md")).read()
    for name in ("results.md", "results.csv", "methods.png", "training_curves.png"):
        assert os.path.getsize(os.path.join(config.workdir, name)) > 0
    rdir = checkpoints.run_dir(config.checkpoint_dir, "synthfaces_small", "vit_small_demo",
                               "pretrain", 5, 0)
    lines = open(os.path.join(rdir, "metrics.jsonl")).read().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == [0, 1, 2]
    assert checkpoints.read_metadata(rdir)["record"]["forget"] == records[0]["forget"]
    # MetaUnlearn's run holds the trained meta-loss and points at the model it started from.
    mdir = rdir.replace("pretrain_5_0", "meta_unlearn_5_0")
    meta = checkpoints.read_metadata(mdir)
    assert meta["base_run_dir"] == os.path.abspath(rdir)
    assert meta["method"] == "meta_unlearn" and meta["access"] == "stats"
    assert meta["method_config"]["meta_lr"] == config.meta_unlearn.meta_lr
    artifacts = checkpoints.load_tree(mdir, "artifacts", expected_hash=meta["artifacts_hash"])
    assert set(artifacts) == {"phi", "train_identities", "step_scale"}
    assert not os.path.exists(os.path.join(mdir, checkpoints.TRAIN_STATE_DIR))


def test_pretrain_fits_the_forget_identities_better_than_the_oracle(finished_study):
    """Pretrain trained on the forget identities, retrain did not: on their images pretrain has
    the lower loss and the higher mAP, by more than on the test identities neither saw (so the
    gap is about the people, not about the two models)."""
    _, records = finished_study
    pretrain, retrain = records[0], records[1]
    assert pretrain["forget"]["loss"] < retrain["forget"]["loss"]
    assert pretrain["forget"]["metric"] > retrain["forget"]["metric"]
    forget_gap = pretrain["forget"]["metric"] - retrain["forget"]["metric"]
    test_gap = pretrain["test"]["metric"] - retrain["test"]["metric"]
    assert forget_gap > test_gap + 0.5


def _request_and_artifacts(config, stage):
    ctx = study.prepare(config)
    mdir = ctx.run_dir(stage)
    meta = checkpoints.read_metadata(mdir)
    artifacts = checkpoints.load_tree(mdir, "artifacts", expected_hash=meta["artifacts_hash"])
    return ctx, meta, artifacts, access.study_request(ctx)


@pytest.mark.slow
def test_stored_methods_are_their_step_on_the_study_request(finished_study):
    """Each method's saved parameters are exactly its ``unlearn`` applied to the pretrained
    parameters and the study's request (recomputed here), and MetaUnlearn with ``meta_lr = 0``
    returns the pretrained parameters bit for bit."""
    config, _ = finished_study
    for stage in ("meta_unlearn", "support_ascent"):
        ctx, meta, artifacts, request = _request_and_artifacts(config, stage)
        pretrained = checkpoints.load_params(ctx.run_dir("pretrain"))
        module = registry.method(stage)
        cfg = api.config_from_record(stage, module, meta["method_config"])
        again, _ = module.unlearn(ctx.model, pretrained, artifacts, request, cfg,
                                  jax.random.key(config.seed))
        stored = checkpoints.load_params(ctx.run_dir(stage))
        assert checkpoints.params_hash(again) == checkpoints.params_hash(stored)
        assert checkpoints.params_hash(stored) != checkpoints.params_hash(pretrained)
        if stage == "meta_unlearn":  # the reference's step (the config's is normalised)
            reference = dataclasses.replace(cfg, meta_lr=0.0, step_control="none",
                                            task_ascent=0.0)
            still, _ = module.unlearn(ctx.model, pretrained, artifacts, request, reference,
                                      jax.random.key(0))
            assert checkpoints.params_hash(still) == checkpoints.params_hash(pretrained)


def test_support_ascent_raises_the_forget_loss(finished_study):
    """The method's claim on the study's request: one ascent step on the portraits raises the
    task loss on the forget identities' other images, more the larger the step."""
    config, records = finished_study
    ctx, meta, _, request = _request_and_artifacts(config, "support_ascent")
    pretrained = checkpoints.load_params(ctx.run_dir("pretrain"))
    cfg = api.config_from_record("support_ascent", support_ascent, meta["method_config"])
    forget_losses = []
    for alpha in (0.0, 0.03, 0.3):
        params, _ = support_ascent.unlearn(ctx.model, pretrained, {"alpha": alpha}, request,
                                           cfg, jax.random.key(0))
        forget_losses.append(study.evaluate_splits(ctx, params)["forget"]["loss"])
    assert forget_losses[0] == pytest.approx(records[0]["forget"]["loss"], rel=1e-6)
    assert forget_losses[0] < forget_losses[1] < forget_losses[2]


@pytest.mark.slow
def test_finished_stages_are_reused(small_study):
    """Run again, every stage is reused: nothing trains, the parameters reloaded from disk hash
    to those the first run computed in memory, and evaluating them again gives the first run's
    metrics on every split."""
    config, records = small_study.config, small_study.records
    again = study.run(config)
    assert all(r.get("reused") for r in again)
    assert [r["access"] for r in again] == [r["access"] for r in records]
    ctx = study.prepare(config)
    stages = {}
    record, stages["pretrain"] = study.train_stage(ctx, "pretrain", study.initial_params(ctx))
    assert record["reused"]
    _, stages["retrain"] = study.train_stage(ctx, "retrain", study.initial_params(ctx))
    for name in ("meta_unlearn", "support_ascent"):
        _, stages[name] = study.method_stage(ctx, name, stages["pretrain"],
                                             ctx.run_dir("pretrain"))
    for first, (name, params) in zip(records, stages.items(), strict=True):
        assert first["method"] == name
        assert checkpoints.params_hash(params) == small_study.first_hashes[name]
        evaluated = study.evaluate_splits(ctx, params)
        for split in metrics.EVAL_SPLITS:
            assert evaluated[split]["metric"] == pytest.approx(first[split]["metric"], abs=1e-9)
            assert evaluated[split]["loss"] == pytest.approx(first[split]["loss"], abs=1e-9)


def test_loss_attack_runs_with_every_evaluation_and_on_reuse(finished_study):
    """config.mia.loss_rf: each evaluation carries the reference's loss attack on its own
    per-sample losses; a stage finished without it gets it on reuse, its checkpoint untouched."""
    from oneshui_jax.mia import loss_attack

    config, _ = finished_study
    config = config.copy_and_resolve_references()
    config.mia.loss_rf = True
    ctx = study.prepare(config)
    rdir = ctx.run_dir("pretrain")
    stored = checkpoints.read_metadata(rdir)
    assert "mia" not in stored["record"]  # the shared study ran without it
    record, params = study.train_stage(ctx, "pretrain", study.initial_params(ctx))
    assert record["reused"] and checkpoints.read_metadata(rdir) == stored
    # the attack on losses computed here, independently of the study's evaluation
    t = config.train
    step = train_lib.make_eval_step(ctx.model_cfg, ctx.dataset.task, t.compute_dtype,
                                    t.attention)
    cfg = ctx.pipeline_config(config.data.eval_batch_size)
    losses = {split: train_lib.evaluate(step, params, pipeline.eval_batches(
        ctx.dataset.source, ctx.images[split], cfg), ctx.dataset.task)["losses"]
              for split in metrics.EVAL_SPLITS}
    direct = loss_attack.attack(losses["retain"], losses["val"], losses["forget"],
                                losses["test"])
    got = record["mia"]["loss_rf"]
    assert (got["auc"], got["acc"]) == (pytest.approx(direct["auc"]),
                                        pytest.approx(direct["acc"]))
    assert (got["n_estimators"], got["criterion"]) == (direct["n_estimators"],
                                                      direct["criterion"])
    if direct["fpr"] is not None:
        assert len(got["roc"]["fpr"]) == len(got["roc"]["tpr"]) == 201
        assert np.interp(1.0, got["roc"]["fpr"], got["roc"]["tpr"]) == pytest.approx(1.0)
    config.mia.loss_rf = False
    assert "mia" not in study.evaluate_splits(dataclasses.replace(ctx, config=config), params)


def test_split_seed_fixes_the_split_apart_from_the_other_randomness(finished_study):
    """config.split_seed (RMIA's reference models): the split of that seed, the run folder and
    fingerprint say so; unset, nothing changes (old folders and fingerprints stay valid)."""
    from oneshui_jax.study import reuse

    config, _ = finished_study
    base = study.prepare(config)
    assert config.split_seed is None and base.run_dir("ssd").endswith("ssd_5_0")
    plain = reuse.fingerprint(base, "ssd", "ssd", {}, None, False)
    assert "split_seed" not in plain["parts"]
    other = config.copy_and_resolve_references()
    other.seed, other.split_seed = 1, 0
    ctx = study.prepare(other)
    assert ctx.splits.to_dict() == base.splits.to_dict()  # the split of seed 0
    assert ctx.run_dir("ssd").endswith("ssd_5_1_split0")
    assert ctx.pipeline_config(8).seed == 1  # every other draw follows config.seed
    moved = reuse.fingerprint(ctx, "ssd", "ssd", {}, None, False)
    assert moved["parts"]["split_seed"] == 0 and moved["hash"] != plain["hash"]
    other.seed = 0  # equal seeds: the plain name and fingerprint
    same = study.prepare(other)
    assert same.run_dir("ssd") == base.run_dir("ssd")
    assert reuse.fingerprint(same, "ssd", "ssd", {}, None, False)["hash"] == plain["hash"]
    for bad in (-1, True):
        wrong = config.copy_and_resolve_references()
        wrong.split_seed = bad
        with pytest.raises(ConfigError, match="config.split_seed must be"):
            study.validate_config(wrong)


def test_checkpoint_of_another_split_is_refused(finished_study, tmp_path):
    config, _ = finished_study
    other = config.copy_and_resolve_references()
    other.seed = 1  # other split, but point at the seed-0 run directory
    other.workdir = str(tmp_path)
    ctx = study.prepare(other)
    ctx.run_dir = lambda stage: checkpoints.run_dir(
        config.checkpoint_dir, "synthfaces_small", "vit_small_demo", stage, 5, 0)
    with pytest.raises(CheckpointError, match="splits differ"):
        study.train_stage(ctx, "pretrain", None)


def test_config_errors_before_any_work(finished_study):
    config, _ = finished_study
    bad = config.copy_and_resolve_references()
    bad.stages = ("pretrain", "meta_unlearn_typo")
    with pytest.raises(ConfigError, match="meta_unlearn_typo"):
        study.run(bad)
    bad = config.copy_and_resolve_references()
    bad.train.optimizer = "adam"
    with pytest.raises(ConfigError, match="optimizer"):
        study.run(bad)
    for block, key, value in (("meta_unlearn", "loss_type", "bogus"),
                              ("support_ascent", "alphas", (-1.0,)),
                              ("meta_unlearn", "batch_size", 0)):
        bad = config.copy_and_resolve_references()
        bad[block][key] = value
        bad.checkpoint_dir = "/nonexistent/never/written"
        with pytest.raises(ConfigError, match=f"config.{block}.{key}"):
            study.run(bad)
        assert not os.path.exists(bad.checkpoint_dir)
    bad = config.copy_and_resolve_references()
    bad.checkpoint_every_s = -1.0
    with pytest.raises(ConfigError, match="config.checkpoint_every_s must be"):
        study.run(bad)
    bad = config.copy_and_resolve_references()
    bad.dataset = "mufac"
    with pytest.raises(DataError, match="mufac"):
        study.run(bad)


def test_cli_rejects_config_typo_without_traceback():
    result = subprocess.run(
        [sys.executable, "-m", "oneshui_jax.main", "--config=configs/synthfaces.py",
         "--config.train.epoch=3"], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 2, result.stderr
    assert result.stderr == ("error: unknown config field 'epoch'. "
                             'Did you mean "epochs" instead of "epoch"?\n'), result.stderr
    assert result.stdout == ""


def _tiny_setup(n=24, epochs=3):
    cfg = vit.ViTConfig.preset("vit_tiny_test", num_classes=3)
    tcfg = train_lib.TrainConfig(task="classification", compute_dtype="float32", epochs=epochs,
                                 batch_size=8, lr=3e-3, optimizer="adamw", warmup_epochs=1)
    rng = np.random.default_rng(0)
    source = [{"image": rng.integers(0, 256, (32, 32, 3), dtype=np.uint8),
               "label": int(rng.integers(0, 3)), "identity": i} for i in range(n)]
    pcfg = pipeline.PipelineConfig(image_size=32, batch_size=8, crop_scale=(0.5, 1.0))
    eval_step = train_lib.make_eval_step(cfg, "classification", "float32")

    def batches():
        return pipeline.to_iterator(pipeline.train_dataset(source, np.arange(n), pcfg, epochs),
                                    pcfg)

    def validate(params):
        return train_lib.evaluate(eval_step, params,
                                  pipeline.eval_batches(source, np.arange(n), pcfg),
                                  "classification")
    return cfg, tcfg, vit.init_params(cfg, jax.random.key(0)), batches, validate


def test_fit_resumes_after_interruption_with_identical_result(tmp_path):
    cfg, tcfg, init, batches, validate = _tiny_setup()
    steps = 3
    straight = train_lib.fit(cfg, tcfg, init, batches(), steps, validate, progress=False)

    calls = []

    def dies_in_second_epoch(params):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt  # killed after epoch 0 was checkpointed
        return validate(params)

    with checkpoints.TrainCheckpointer(str(tmp_path)) as ckpt, pytest.raises(KeyboardInterrupt):
        train_lib.fit(cfg, tcfg, init, batches(), steps, dies_in_second_epoch, progress=False,
                      checkpointer=ckpt)
    with checkpoints.TrainCheckpointer(str(tmp_path)) as ckpt:
        assert ckpt.latest_step() == steps
        resumed = train_lib.fit(cfg, tcfg, init, batches(), steps, validate, progress=False,
                                checkpointer=ckpt)
    assert resumed.resumed_from_epoch == 1
    assert [h["epoch"] for h in resumed.history] == [0, 1, 2]
    assert resumed.best_epoch == straight.best_epoch
    assert checkpoints.params_hash(resumed.params) == checkpoints.params_hash(straight.params)


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
    cfg, tcfg, init, batches, validate = _tiny_setup()
    calls = []

    def poison_after_first_epoch(params):
        calls.append(1)
        return validate(params)

    class Poisoned:
        """Feeds NaN images from the second epoch on."""

        def __init__(self, it):
            self.it, self.n = it, 0

        def __next__(self):
            batch = next(self.it)
            self.n += 1
            if self.n > 3:
                batch = {**batch, "image": np.full_like(batch["image"], np.nan)}
            return batch

        def get_state(self):
            return self.it.get_state()

        def set_state(self, state):
            self.it.set_state(state)

    with checkpoints.TrainCheckpointer(str(tmp_path)) as ckpt:
        with pytest.raises(train_lib.TrainingDiverged, match="last good checkpoint"):
            train_lib.fit(cfg, tcfg, init, Poisoned(batches()), 3, poison_after_first_epoch,
                          progress=False, checkpointer=ckpt)
        assert ckpt.latest_step() == 3  # epoch 0 is on disk, the NaN epoch is not
        arrays, state = ckpt.restore({"params": init, "opt_state": optim.make(
            "adamw", tcfg.weight_decay).init(init), "best_params": init})
        assert state["epoch"] == 1
        assert all(np.isfinite(x).all() for x in jax.tree.leaves(arrays["params"]))


@pytest.mark.slow
def test_killed_cli_run_resumes_only_with_the_same_settings(tfds_dir, tmp_path):
    """SIGKILL a training run after its first checkpoint. Restarted with other settings it is
    refused with the differences (never resumed, nothing reported); with the same settings it
    resumes and finishes."""
    config_args = ["--config=configs/synthfaces.py:runlocal=True",
                   f"--config.data.tfds_dir={tfds_dir}", f"--config.workdir={tmp_path}/work",
                   f"--config.checkpoint_dir={tmp_path}/ckpt", "--config.train.epochs=4",
                   "--config.stages=('pretrain',)", "--config.checkpoint_every_s=0"]
    cmd = [sys.executable, "-m", "oneshui_jax.main", *config_args]
    rdir = checkpoints.run_dir(f"{tmp_path}/ckpt", "synthfaces_small", "vit_small_demo",
                               "pretrain", 5, 0)
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    log = os.path.join(rdir, "metrics.jsonl")
    state_dir = os.path.join(rdir, checkpoints.TRAIN_STATE_DIR)

    def committed_steps():  # orbax renames a step's folder to its number once it is complete
        if not os.path.isdir(state_dir):
            return []
        return [name for name in os.listdir(state_dir) if name.isdigit()]

    deadline = time.time() + 180
    while time.time() < deadline and proc.poll() is None and not committed_steps():
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    epochs_before = len(open(log).read().splitlines())
    assert epochs_before < 4, "the run finished before it could be killed"
    # Two changed settings at once (a training setting and the augmentation): both listed.
    refused = subprocess.run([*cmd, "--config.train.epochs=5",
                              "--config.data.crop_scale=(1.0, 1.0)"],
                             cwd=REPO, capture_output=True, text=True)
    assert refused.returncode == 2, refused.stderr[-2000:]
    error = refused.stderr.strip().splitlines()[-1]
    assert error.startswith("error: ") and "train.epochs: 4 -> 5" in error, error
    assert "data.crop_scale: [0.35, 1.0] -> [1.0, 1.0]" in error, error
    assert "not resumed" in error and f"rm -r {rdir}" in error
    assert "Traceback" not in refused.stderr
    assert checkpoints.read_metadata(rdir)["status"] == "training"
    assert len(open(log).read().splitlines()) == epochs_before  # nothing trained
    assert not os.path.exists(f"{tmp_path}/work/results.json")  # nothing reported
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "resuming after epoch" in done.stderr
    epochs = [json.loads(line)["epoch"] for line in open(log).read().splitlines()]
    assert epochs[-1] == 3 and sorted(set(epochs)) == [0, 1, 2, 3]
    assert checkpoints.is_finished(rdir)


def test_train_step_compiles_once_and_learns():
    cfg = vit.ViTConfig.preset("vit_tiny_test", num_classes=3)
    tcfg = train_lib.TrainConfig(task="classification", compute_dtype="float32")
    tx = optim.make("adamw", 0.0)
    params = vit.init_params(cfg, jax.random.key(0))
    opt_state = tx.init(params)
    step = train_lib.make_train_step(cfg, tcfg, tx)
    rng = np.random.default_rng(0)
    batch = {"image": jnp.asarray(rng.uniform(-1, 1, (8, 32, 32, 3)), jnp.float32),
             "label": jnp.asarray(rng.integers(0, 3, 8)), "mask": jnp.ones(8, bool)}
    losses = []
    for lr in (1e-3, 2e-3, 3e-3, 3e-3, 3e-3, 3e-3):
        params, opt_state, out = step(params, opt_state, batch, jnp.float32(lr))
        losses.append(float(out["loss"]))
    assert step._cache_size() == 1  # a new learning rate does not retrace
    assert losses[-1] < losses[0]


def test_masked_examples_do_not_count():
    logits = jnp.array([[2.0, -1.0], [0.5, 0.5], [9.0, 9.0]])
    labels = jnp.array([[1, 0], [0, 1], [0, 0]])
    per = losses_lib.per_example_loss("multilabel", logits, labels)
    mask = jnp.array([True, True, False])
    assert float(losses_lib.masked_mean(per, mask)) == pytest.approx(float(per[:2].mean()))


def test_inspect_reads_every_checkpoint_of_the_study(finished_study, capsys):
    from oneshui_jax.cli import inspect as inspect_cli

    config, records = finished_study
    for r in records:
        rdir = checkpoints.run_dir(config.checkpoint_dir, "synthfaces_small", "vit_small_demo",
                                   r["method"], 5, 0)
        inspect_cli.main([rdir])
        out = capsys.readouterr().out
        assert "blocks.0.attn.qkv.kernel" in out and r["method"] in out


def test_checkpoint_with_other_hyperparameters_is_refused(finished_study, tmp_path):
    config, _ = finished_study
    other = config.copy_and_resolve_references()
    other.workdir = str(tmp_path)
    other.meta_unlearn.meta_lr = 0.5
    with pytest.raises(CheckpointError,
                       match=rf"meta_unlearn.meta_lr: {config.meta_unlearn.meta_lr} -> 0.5"):
        study.run(other)
    other = config.copy_and_resolve_references()
    other.workdir = str(tmp_path)
    other.data.crop_scale = (1.0, 1.0)  # the augmentation shapes what pretrain learned
    with pytest.raises(CheckpointError, match=r"data.crop_scale: \[0.35, 1.0\] -> \[1.0, 1.0\]"):
        study.run(other)


def test_an_older_checkpoint_without_dedup_is_reused_as_dedup_none(finished_study, tmp_path):
    import shutil

    config, records = finished_study
    old = config.copy_and_resolve_references()
    old.checkpoint_dir = str(tmp_path / "ckpt")
    old.workdir = str(tmp_path / "work")
    shutil.copytree(config.checkpoint_dir, old.checkpoint_dir)
    for path in glob.glob(os.path.join(old.checkpoint_dir, "*", "*", "*", "metadata.json")):
        metadata = json.load(open(path))
        metadata["config"]["data"].pop("dedup")  # written before data.dedup existed
        metadata.pop("fingerprint")  # ... and before fingerprints
        with open(path, "w") as f:
            json.dump(metadata, f)
    again = study.run(old)
    assert all(r.get("reused") for r in again)
    assert [r["forget"] for r in again] == [r["forget"] for r in records]


def test_runs_made_before_the_package_was_reorganised_are_reused(small_study):
    """Every stage of the shared study has the fingerprint that the code before the package
    was reorganised (commit a7edf3c) gave the same config, so its checkpoints are reused: all
    parts but ``parent`` (the hash of the parameters a stage starts from, which depends on the
    machine's arithmetic) are pinned in ``tests/fixtures/small_study_fingerprints.json``."""
    path = os.path.join(os.path.dirname(__file__), "fixtures", "small_study_fingerprints.json")
    with open(path, encoding="utf-8") as f:
        pinned = json.load(f)["stages"]
    assert sorted(pinned) == sorted(small_study.config.stages)
    for stage in small_study.config.stages:
        metadata = checkpoints.read_metadata(small_study.run_dir(stage))
        parts = {k: v for k, v in metadata["fingerprint"]["parts"].items() if k != "parent"}
        assert parts == pinned[stage], stage
