"""TensorBoard curves (``metric_writer``): what lands in the event files, read back here.

Event files are TFRecord files of ``Event`` protos; they are parsed here with the protobuf
classes tensorboardX ships (``tensorboardX.proto.event_pb2``), independently of the writer.
The training hooks are checked against ``metrics.jsonl`` (the source of truth) and against the
losses the train step returned.
"""

import dataclasses
import glob
import json
import logging
import math
import os
import struct
import sys
import types

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from absl import logging as absl_logging

from oneshui_jax import checkpoints, config_lib, metric_writer, optim
from oneshui_jax import train as train_lib
from oneshui_jax.errors import ConfigError
from oneshui_jax.models import vit
from oneshui_jax.study import reuse, validate
from oneshui_jax.study.context import dataset_folder
from oneshui_jax.unlearn import api
from oneshui_jax.unlearn.meta_unlearn import core as mu
from oneshui_jax.unlearn.meta_unlearn import training as meta_train

pytest.importorskip("tensorboardX")
from tensorboardX.proto import event_pb2  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "configs"))
import synthfaces as synthfaces_config  # noqa: E402

TINY = vit.ViTConfig.preset("vit_tiny_test", num_classes=3, depth=1, image_size=16)


def tiny_params():
    """Random parameters of TINY's shapes, drawn in numpy (no eager initialiser to compile)."""
    rng = np.random.default_rng(0)
    shapes = jax.eval_shape(lambda: vit.init_params(TINY, jax.random.key(0)))
    return jax.tree.map(lambda s: (0.02 * rng.standard_normal(s.shape)).astype(s.dtype), shapes)


def read_scalars(logdir: str, first_only: bool = False) -> dict[str, list[tuple[int, float]]]:
    """``{tag: [(step, value), ...]}`` of every scalar in the event files under ``logdir``, in
    the order written (files by name, i.e. by creation time); ``first_only``: the first file's
    only (the run that created the folder)."""
    out: dict[str, list[tuple[int, float]]] = {}
    paths = sorted(glob.glob(os.path.join(logdir, "**", "events.out.tfevents.*"), recursive=True))
    for path in paths[:1] if first_only else paths:
        with open(path, "rb") as f:
            data = f.read()
        pos = 0
        while pos < len(data):  # TFRecord: u64 length, u32 crc, payload, u32 crc
            (length,) = struct.unpack("<Q", data[pos:pos + 8])
            payload = data[pos + 12:pos + 12 + length]
            assert len(payload) == length, f"truncated record in {path}"
            pos += 12 + length + 4
            event = event_pb2.Event.FromString(payload)
            for value in event.summary.value:
                out.setdefault(value.tag, []).append((event.step, value.simple_value))
    return out


def event_files(logdir: str) -> list[str]:
    return glob.glob(os.path.join(logdir, "**", "events.out.tfevents.*"), recursive=True)


# ---------------------------------------------------------------------------------------------
# The writer


def test_writer_writes_finite_numbers_with_their_tags_and_steps(tmp_path):
    logdir = str(tmp_path / "run")
    with metric_writer.open_writer(logdir) as writer:
        assert isinstance(writer, metric_writer.MetricWriter)
        writer.scalars(0, {"a/x": 1.5, "a/y": np.float32(-2.0), "a/n": 7})
        assert event_files(logdir)  # opened at the first value
        writer.scalars(5, {"a/x": 2.5, "a/nan": float("nan"), "a/inf": math.inf,
                           "a/none": None, "a/text": "hello", "a/flag": True,
                           "a/list": [1.0, 2.0], "a/array0d": np.array(3.25),
                           "a/jax": jnp.float32(0.5)})
        writer.flush()
    writer.close()  # twice: harmless
    writer.scalars(9, {"a/x": 99.0})  # after close: nothing
    got = read_scalars(logdir)
    assert got == {"a/x": [(0, 1.5), (5, 2.5)], "a/y": [(0, -2.0)], "a/n": [(0, 7.0)],
                   "a/array0d": [(5, 3.25)], "a/jax": [(5, 0.5)]}


def test_scalar_value_accepts_finite_real_numbers_only():
    assert metric_writer.scalar_value(3) == 3.0
    assert metric_writer.scalar_value(np.int64(4)) == 4.0
    for bad in (None, "1.0", True, np.bool_(False), float("nan"), -math.inf, [1.0],
                np.ones(2), np.array(1 + 2j), {"a": 1}):
        assert metric_writer.scalar_value(bad) is None, bad


def test_a_writer_that_writes_nothing_leaves_no_folder(tmp_path):
    logdir = str(tmp_path / "run")
    with metric_writer.open_writer(logdir) as writer:
        writer.scalars(1, {"only/nan": float("nan"), "only/text": "x"})
        writer.flush()
    assert not os.path.exists(logdir)


def test_disabled_or_missing_tensorboardx_is_a_no_op_with_one_hint(tmp_path, monkeypatch,
                                                                   caplog):
    logdir = str(tmp_path / "run")
    writer = metric_writer.open_writer(logdir, enabled=False)
    assert type(writer) is metric_writer.NoOpWriter and not writer.enabled
    writer.scalars(1, {"x": 1.0})
    monkeypatch.setitem(sys.modules, "tensorboardX", None)  # import fails: not installed
    monkeypatch.setattr(metric_writer, "_hint_logged", False)
    verbosity = absl_logging.get_verbosity()  # an earlier test may have lowered absl's level
    absl_logging.set_verbosity(absl_logging.INFO)
    try:
        with caplog.at_level(logging.INFO):
            first = metric_writer.open_writer(logdir)
            second = metric_writer.open_writer(logdir)
    finally:
        absl_logging.set_verbosity(verbosity)
    assert type(first) is type(second) is metric_writer.NoOpWriter
    hints = [r.getMessage() for r in caplog.records if "tensorboardX" in r.getMessage()]
    assert len(hints) == 1 and "pip install -e .[tensorboard]" in hints[0], hints
    with first as w:
        w.scalars(1, {"x": 1.0})
        w.flush()
    assert not os.path.exists(logdir)


def test_only_the_primary_process_writes(tmp_path, monkeypatch):
    monkeypatch.setattr(jax, "process_index", lambda: 1)
    config = ml_collections.ConfigDict({"tensorboard": True, "workdir": str(tmp_path / "w")})
    rdir = checkpoints.run_dir(str(tmp_path / "ckpt"), "synthfaces", "vit_tiny_test",
                               "pretrain", 5, 0)
    writer = metric_writer.for_stage(config, rdir)
    assert type(writer) is metric_writer.NoOpWriter
    _fit(writer, tmp_path)
    assert not os.path.exists(tmp_path / "w")
    monkeypatch.setattr(jax, "process_index", lambda: 0)
    assert isinstance(metric_writer.for_stage(config, rdir), metric_writer.MetricWriter)


def test_stage_logdir_names_the_stage_run(tmp_path):
    config = ml_collections.ConfigDict({"tensorboard": True, "workdir": str(tmp_path / "w")})
    rdir = checkpoints.run_dir(str(tmp_path / "ckpt"), "mufac", "vit_small_demo", "retrain",
                               10, 2, 0)
    assert metric_writer.run_name(rdir) == "mufac/vit_small_demo/retrain_10_2_split0"
    assert metric_writer.stage_logdir(config, rdir) == os.path.join(
        str(tmp_path / "w"), "tensorboard", "mufac", "vit_small_demo", "retrain_10_2_split0")
    config.tensorboard = False
    assert type(metric_writer.for_stage(config, rdir)) is metric_writer.NoOpWriter
    assert type(metric_writer.for_stage(ml_collections.ConfigDict({"workdir": "w"}), rdir)) \
        is metric_writer.NoOpWriter  # no flag: nothing


# ---------------------------------------------------------------------------------------------
# train.fit


def _batches(n: int, batch_size: int = 2):
    rng = np.random.default_rng(0)
    fixed = [{"image": rng.uniform(-1, 1, (batch_size, 16, 16, 3)).astype(np.float32),
              "label": rng.integers(0, 3, batch_size), "mask": np.ones(batch_size, bool)}
             for _ in range(n)]

    class Cycle:
        i = 0

        def __next__(self):
            self.i += 1
            return fixed[(self.i - 1) % n]

    return Cycle()


EPOCHS, STEPS = 2, 12  # 24 steps: the bar (and the writer) see the loss at steps 10, 20, 24


def _fit(writer, tmp_path, monkeypatch=None):
    """A tiny fit (two epochs of 12 steps), its metrics.jsonl in ``tmp_path``; with
    ``monkeypatch``, the loss of every step is recorded: ``(result, {step: loss})``."""
    cfg = train_lib.TrainConfig(task="classification", compute_dtype="float32", epochs=EPOCHS,
                                batch_size=2, lr=0.05, warmup_epochs=1, momentum=0.0,
                                weight_decay=0.0)
    losses = {}
    if monkeypatch is not None:
        real = train_lib.train_step

        def recording_train_step(model_cfg, tcfg):
            tx, step = real(model_cfg, tcfg)

            def recorded(params, opt_state, batch, lr):
                params, opt_state, out = step(params, opt_state, batch, lr)
                losses[len(losses) + 1] = float(out["loss"])
                return params, opt_state, out

            return tx, recorded

        monkeypatch.setattr(train_lib, "train_step", recording_train_step)
    scores = iter([30.0, 60.0])
    result = train_lib.fit(TINY, cfg, tiny_params(), _batches(3), STEPS,
                           lambda p: {"loss": 0.25 + len(losses) / 100, "metric": next(scores)},
                           progress=False, metrics_log=str(tmp_path / "metrics.jsonl"),
                           writer=writer)
    return result, losses


def test_fit_writes_step_and_epoch_scalars_equal_to_metrics_jsonl(tmp_path, monkeypatch):
    logdir = str(tmp_path / "tb")
    with metric_writer.MetricWriter(logdir) as writer:
        result, losses = _fit(writer, tmp_path, monkeypatch)
    got = read_scalars(logdir)
    with open(tmp_path / "metrics.jsonl") as f:
        records = [json.loads(line) for line in f]
    assert [r["step"] for r in records] == [12, 24] and records == result.history
    steps = [10, 20, 24]
    assert [s for s, _ in got["train/loss"]] == steps
    np.testing.assert_allclose([v for _, v in got["train/loss"]], [losses[s] for s in steps],
                               rtol=1e-6)
    want_lr = [optim.reference_lr(s - 1, base_lr=0.05, steps_per_epoch=STEPS, epochs=EPOCHS,
                                  warmup_epochs=1) for s in steps]
    assert [s for s, _ in got["train/lr"]] == steps
    np.testing.assert_allclose([v for _, v in got["train/lr"]], want_lr, rtol=1e-6)
    for key in ("train_loss", "val_loss", "val_metric", "lr", "images_per_s"):
        tag = f"epoch/{key}"
        assert [s for s, _ in got[tag]] == [r["step"] for r in records], tag
        np.testing.assert_allclose([v for _, v in got[tag]], [r[key] for r in records],
                                   rtol=1e-6, err_msg=tag)
    assert "epoch/epoch" not in got and "epoch/step" not in got
    assert set(got) == {"train/loss", "train/lr"} | {
        f"epoch/{k}" for k in ("train_loss", "val_loss", "val_metric", "lr", "images_per_s")}


# ---------------------------------------------------------------------------------------------
# MetaUnlearn's meta-training


def test_meta_training_writes_per_request_and_per_epoch_scalars(tmp_path, monkeypatch):
    """The meta-step is replaced by one that returns scripted losses (the loop's hooks are under
    test, not the meta-gradient; the meta-loss is not initialised): 3 requests per epoch, 2
    epochs."""
    model = api.Model(TINY, "classification", "float32", "xla")
    cfg = api.make_config("meta_unlearn", mu, {"epochs": 2, "validation_requests": 0,
                                               "step_control": "none", "hidden_size": 8,
                                               "num_identities_simulation": 2},
                          task="classification")
    ml_cfg = mu.meta_loss_config(model, cfg, 6)
    outer = iter(np.linspace(1.0, 0.5, 6))

    def fake_meta_step(*args, **kwargs):
        def step(theta, phi, opt_state, lr, support, forget, val, retain, rng):
            loss = next(outer)
            return phi, opt_state, {"loss": jnp.float32(loss),
                                    "meta_loss": jnp.float32(-loss)}, theta
        return step

    monkeypatch.setattr(mu, "meta_step", fake_meta_step)
    monkeypatch.setattr(meta_train.meta_loss, "init_params",  # phi is not used here
                        lambda ml_cfg, key: {"w": np.zeros(2, np.float32)})
    monkeypatch.setattr(meta_train, "_request_data", lambda *a: (None, None, None, None))
    logdir = str(tmp_path / "tb")
    data = types.SimpleNamespace(
        seed=0, checkpointer=None, progress=False, train_identities=tuple(range(6)),
        holdout_identities=tuple(range(6)),
        simulated_requests=lambda n, rng, identities=None: [
            types.SimpleNamespace(name=f"r{i}", forget=[0, 1]) for i in range(3)],
        writer=metric_writer.MetricWriter(logdir))
    with data.writer:
        result = meta_train.meta_train(model, {}, data, cfg, ml_cfg, jax.random.key(0))
    got = read_scalars(logdir)
    want = np.linspace(1.0, 0.5, 6)
    assert [s for s, _ in got["meta_train/outer_loss"]] == [1, 2, 3, 4, 5, 6]
    np.testing.assert_allclose([v for _, v in got["meta_train/outer_loss"]], want, rtol=1e-6)
    np.testing.assert_allclose([v for _, v in got["meta_train/meta_loss"]], -want, rtol=1e-6)
    assert [s for s, _ in got["meta_epoch/outer_loss"]] == [3, 6]
    np.testing.assert_allclose([v for _, v in got["meta_epoch/outer_loss"]],
                               [h["outer_loss"] for h in result.history], rtol=1e-6)
    np.testing.assert_allclose([v for _, v in got["meta_epoch/lr"]],
                               [h["lr"] for h in result.history], rtol=1e-6)


def test_train_data_has_a_no_op_writer_by_default():
    fields = {f.name: f for f in dataclasses.fields(api.TrainData)}
    assert type(fields["writer"].default_factory()) is metric_writer.NoOpWriter


# ---------------------------------------------------------------------------------------------
# The config flag: on by default, validated, not part of any fingerprint


def test_the_flag_is_on_in_every_config_and_validated():
    synth = synthfaces_config.get_config("N=5,size=small")
    real = config_lib.real_data_config("mufac", "all", 10)
    assert synth.tensorboard is True and real.tensorboard is True
    validate.validate_config(synth)
    synth.tensorboard = False
    validate.validate_config(synth)
    del synth["tensorboard"]
    synth.tensorboard = "yes"
    with pytest.raises(ConfigError, match="config.tensorboard must be True .* got 'yes'"):
        validate.validate_config(synth)


def test_the_flag_does_not_change_stage_fingerprints():
    config = synthfaces_config.get_config("N=5,size=small")
    splits = types.SimpleNamespace(to_dict=lambda: {"train": [1, 2], "forget": [1]})

    def fingerprints(cfg):
        ctx = types.SimpleNamespace(config=cfg, dataset=types.SimpleNamespace(fingerprint="fp"),
                                    splits=splits, model_cfg=TINY)
        return [reuse.fingerprint(ctx, "pretrain", "train", cfg.train.to_dict(), "p", True),
                reuse.fingerprint(ctx, "ssd", "ssd", cfg.ssd.to_dict(), "p", False)]

    on = fingerprints(config)
    off_config = config.copy_and_resolve_references()
    off_config.tensorboard = False
    off = fingerprints(off_config)
    assert [f["hash"] for f in on] == [f["hash"] for f in off]
    legacy = {"config": off_config.to_dict()}
    assert reuse.legacy_parts(legacy, "train", True) == reuse.legacy_parts(
        {"config": config.to_dict()}, "train", True)
    seeded = config.copy_and_resolve_references()
    seeded.seed = 1  # the same fingerprints see a setting that matters
    assert all(a["hash"] != b["hash"] for a, b in zip(on, fingerprints(seeded), strict=True))


# ---------------------------------------------------------------------------------------------
# A study: one TensorBoard run per training stage, under <workdir>/tensorboard


@pytest.mark.slow
def test_the_study_writes_one_run_per_training_stage(small_study):
    """The shared small study (tensorboard on, as in the SynthFaces config): pretrain, retrain and
    MetaUnlearn's meta-training each have their run, named after the stage's run directory,
    holding the numbers of ``metrics.jsonl`` and of the record; support_ascent writes none. Other
    tests may write later runs of the same stages into the shared workdir, so only each run's
    first event file (the shared study's own) is compared."""
    config, records = small_study.config, small_study.records
    assert config.tensorboard is True
    root = os.path.join(config.workdir, "tensorboard")
    runs = sorted({os.path.relpath(os.path.dirname(p), root) for p in event_files(root)})
    names = {s: metric_writer.run_name(small_study.run_dir(s))
             for s in ("pretrain", "retrain", "meta_unlearn")}
    assert runs == sorted(names.values())
    assert names["pretrain"] == f"{dataset_folder(config)}/{config.model.name}/pretrain_5_0"
    for stage in ("pretrain", "retrain"):
        got = read_scalars(os.path.join(root, names[stage]), first_only=True)
        with open(os.path.join(small_study.run_dir(stage), "metrics.jsonl")) as f:
            history = [json.loads(line) for line in f]
        assert [s for s, _ in got["epoch/val_metric"]] == [h["step"] for h in history], stage
        np.testing.assert_allclose([v for _, v in got["epoch/val_metric"]],
                                   [h["val_metric"] for h in history], rtol=1e-6)
        np.testing.assert_allclose([v for _, v in got["epoch/train_loss"]],
                                   [h["train_loss"] for h in history], rtol=1e-6)
        assert got["train/loss"] and got["train/lr"]
    meta = next(r for r in records if r["method"] == "meta_unlearn")["prepare"]["meta_history"]
    got = read_scalars(os.path.join(root, names["meta_unlearn"]), first_only=True)
    np.testing.assert_allclose([v for _, v in got["meta_epoch/outer_loss"]],
                               [h["outer_loss"] for h in meta], rtol=1e-6)
    assert len(got["meta_train/outer_loss"]) == sum(h["requests"] for h in meta)
