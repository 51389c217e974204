"""Meta-training on simulated requests of the small SynthFaces variant: data, resume."""

import dataclasses
import os
import sys

import jax
import numpy as np
import pytest

from oneshui_jax import checkpoints, study
from oneshui_jax.models import meta_loss, vit
from oneshui_jax.study import access
from oneshui_jax.unlearn.meta_unlearn import core as mu
from oneshui_jax.unlearn.meta_unlearn import training as meta_train

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "configs"))
import synthfaces as synthfaces_config  # noqa: E402


@pytest.fixture(scope="module")
def ctx(tmp_path_factory, synthfaces_tfds):
    config = synthfaces_config.get_config("N=5,size=small")
    root = str(tmp_path_factory.mktemp("meta"))
    config.data.tfds_dir = synthfaces_tfds
    config.checkpoint_dir = os.path.join(root, "ckpt")
    config.data.num_threads = 0
    config.progress = False
    config.meta_unlearn.epochs = 2
    config.meta_unlearn.num_identities_simulation = 30  # 4 requests per epoch: fast
    config.meta_unlearn.batch_size = 256  # one outer batch per request: one compilation
    config.meta_unlearn.hidden_size = 32
    config.meta_unlearn.validation_requests = 0  # the reference's request stream and step
    config.meta_unlearn.step_control = "none"
    config.meta_unlearn.task_ascent = 0.0
    ctx = study.prepare(config)
    # A tiny ViT: these tests are about the meta-training loop, not the model.
    tiny = vit.ViTConfig.preset("vit_tiny_test", num_classes=ctx.model_cfg.num_classes)
    return dataclasses.replace(ctx, model_cfg=tiny)


def configs(ctx):
    cfg = ctx.method_config("meta_unlearn")
    return cfg, mu.meta_loss_config(ctx.model, cfg, len(ctx.splits.train))


def test_request_batches_follow_the_reference_layout(ctx):
    import random

    from oneshui_jax import splits as splits_lib
    cfg, _ = configs(ctx)
    data = access.train_data(ctx)
    request = data.simulated_requests(30, random.Random(0))[0]
    # the same requests as the reference's draw over the whole annotation table
    assert request == splits_lib.simulated_requests(ctx.dataset.annotations, ctx.splits, 30,
                                                    random.Random(0))[0]
    rows = mu.identity_rows(ctx.splits.train)
    support, forget, val, retain = meta_train._request_data(data, request, cfg, rows,
                                                            np.random.default_rng(0))
    assert support["image"].shape[0] == 30 and bool(support["mask"].all())
    expected_rows = [rows[int(ctx.dataset.annotations.identities[i])] for i in request.support]
    assert support["row"].tolist() == expected_rows
    k = -(-len(request.forget) // cfg.batch_size)
    assert k == 1
    assert forget["image"].shape[:2] == (k, cfg.batch_size)
    assert int(forget["mask"].sum()) == len(request.forget)
    assert val["image"].shape[:2] == (k, cfg.batch_size) and retain is None


@pytest.mark.slow
def test_meta_training_resumes_with_identical_result(ctx, tmp_path, monkeypatch):
    cfg, ml_cfg = configs(ctx)
    theta = vit.init_params(ctx.model_cfg, jax.random.key(0))
    key = jax.random.key(ctx.config.seed)
    straight = meta_train.meta_train(ctx.model, theta, access.train_data(ctx), cfg, ml_cfg, key)
    assert [h["epoch"] for h in straight.history] == [0, 1]

    real_make = mu.meta_step
    calls = []

    def dying_make(*args, **kwargs):
        step = real_make(*args, **kwargs)

        def wrapped(*a):
            calls.append(1)
            if len(calls) == 7:  # epoch 1, request 3 (saved after request 2)
                raise KeyboardInterrupt
            return step(*a)
        return wrapped

    monkeypatch.setattr(mu, "meta_step", dying_make)
    with checkpoints.TrainCheckpointer(str(tmp_path)) as ckpt, pytest.raises(KeyboardInterrupt):
        meta_train.meta_train(ctx.model, theta, access.train_data(ctx, ckpt), cfg, ml_cfg, key,
                              checkpoint_every=2)
    monkeypatch.setattr(mu, "meta_step", real_make)
    with checkpoints.TrainCheckpointer(str(tmp_path)) as ckpt:
        _, state = ckpt.restore({"phi": straight.phi, "opt_state": mu.optimizer(cfg).init(
            straight.phi)})
        assert (state["epoch"], state["request"]) == (1, 2)
        resumed = meta_train.meta_train(ctx.model, theta, access.train_data(ctx, ckpt), cfg,
                                        ml_cfg, key, checkpoint_every=2)
    assert checkpoints.params_hash(resumed.phi) == checkpoints.params_hash(straight.phi)


@pytest.mark.slow
def test_padded_outer_batches_change_nothing(ctx):
    """A request padded with fully masked outer batches has the unpadded loss and meta-gradient
    (the padding is skipped, not averaged in), also when VAL has fewer batches than the forget
    set (the last VAL batch serves the rest, padded or not)."""
    import random

    cfg, ml_cfg = configs(ctx)
    cfg = dataclasses.replace(cfg, batch_size=32)
    data = access.train_data(ctx)
    request = data.simulated_requests(50, random.Random(0))[0]
    rows = mu.identity_rows(ctx.splits.train)
    plain = meta_train._request_data(data, request, cfg, rows, np.random.default_rng(0))
    k = plain[1]["mask"].shape[0]
    assert plain[2]["mask"].shape[0] < k  # VAL runs out before the forget set
    padded = meta_train._request_data(data, request, cfg, rows, np.random.default_rng(0), k + 2)
    assert padded[1]["mask"].shape[0] == k + 2 and not padded[1]["mask"][k:].any()
    theta = vit.init_params(ctx.model_cfg, jax.random.key(0))
    phi = meta_loss.init_params(ml_cfg, jax.random.key(1))
    grad = mu.meta_grad(ctx.model_cfg, ml_cfg, cfg)
    rng = jax.random.key(2)
    g_plain, s_plain, _ = grad(theta, phi, *plain, rng)
    g_padded, s_padded, _ = grad(theta, phi, *padded, rng)
    assert float(s_plain["loss"]) == pytest.approx(float(s_padded["loss"]), rel=1e-6)
    for a, b in zip(jax.tree.leaves(g_plain), jax.tree.leaves(g_padded), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-8)


@pytest.mark.slow
def test_meta_training_compiles_the_meta_step_once(ctx):
    """Requests of different sizes are padded to the stage's largest K: one compilation of the
    meta-step for the whole meta-training (issue: one compilation per stage)."""
    from oneshui_jax.unlearn import simulated

    cfg, ml_cfg = configs(ctx)
    cfg = dataclasses.replace(cfg, batch_size=32, epochs=1)
    data = access.train_data(ctx)
    stream = meta_train.request_stream(data, cfg, None)
    sizes = {simulated.outer_batches(len(r.forget), cfg.batch_size) for rs in stream for r in rs}
    assert len(sizes) > 1  # without the padding the step would compile once per size
    mu.clear_compiled()
    theta = vit.init_params(ctx.model_cfg, jax.random.key(0))
    meta_train.meta_train(ctx.model, theta, data, cfg, ml_cfg, jax.random.key(0))
    assert mu.meta_step(ctx.model_cfg, ml_cfg, cfg)._cache_size() == 1
