"""Per-block rematerialisation (``remat``): the same numbers, and really checkpointed.

``vit.apply(..., remat=True)``, ``config.train.remat`` (the train step) and
``config.meta_unlearn.remat`` (the meta-step's inner step and outer passes) wrap every transformer
block in ``jax.checkpoint``. These tests check the forward pass, the train step's update and the
second-order meta-gradient against the plain model, that the traced programs contain one
checkpoint per block (none without the option), what keys compilations and fingerprints, and the
residuals kept for the backward pass. The memory XLA:CPU estimates is in bench/remat_memory.py
(its schedule does not show the saving, so it is not asserted here).
"""

import dataclasses
import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from jax.extend.core import jaxprs_in_params

from oneshui_jax import config_lib, optim
from oneshui_jax import train as train_lib
from oneshui_jax.errors import ConfigError
from oneshui_jax.models import meta_loss, vit
from oneshui_jax.study import reuse, validate
from oneshui_jax.unlearn import api
from oneshui_jax.unlearn.meta_unlearn import core as mu

MODEL = vit.ViTConfig(image_size=16, patch_size=8, width=16, depth=3, num_heads=2,
                      num_classes=4)
CHECKPOINT_PRIMITIVES = ("remat", "checkpoint")  # jax.checkpoint traces as ``remat2``
APPLY = jax.jit(vit.apply, static_argnums=0, static_argnames=("dtype", "remat"))


def _count_checkpoints(jaxpr) -> int:
    """Equations of a checkpoint primitive in ``jaxpr`` and every jaxpr nested in it (jit,
    scan, custom rules), the checkpoints themselves included."""
    count = 0
    for eqn in jaxpr.eqns:
        if any(name in eqn.primitive.name for name in CHECKPOINT_PRIMITIVES):
            count += 1
        count += sum(_count_checkpoints(sub) for sub in jaxprs_in_params(eqn.params))
    return count


def _checkpoints(fn, *args) -> int:
    return _count_checkpoints(jax.make_jaxpr(fn)(*args).jaxpr)


def _params(seed=0):
    """Initial parameters plus noise, so that no bias is zero and no scale one."""
    params = vit.init_params(MODEL, jax.random.key(seed))
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(seed + 1), len(leaves))
    return jax.tree.unflatten(treedef, [p + 0.1 * jax.random.normal(k, p.shape)
                                        for p, k in zip(leaves, keys, strict=True)])


def _images(n, seed=2):
    return jax.random.uniform(jax.random.key(seed), (n, 16, 16, 3), minval=-1.0, maxval=1.0)


def _assert_trees_close(a, b, rtol=1e-5, atol=1e-6):
    """Leaf by leaf; ``atol`` is relative to the leaf's largest magnitude (float32 rounding of
    sums scales with their terms)."""
    flat_a, flat_b = jax.tree.leaves(a), jax.tree.leaves(b)
    assert len(flat_a) == len(flat_b)
    for x, y in zip(flat_a, flat_b, strict=True):
        x, y = np.asarray(x, np.float32), np.asarray(y, np.float32)
        scale = max(1.0, float(np.max(np.abs(y), initial=0.0)))
        np.testing.assert_allclose(x, y, rtol=rtol, atol=atol * scale)


# ---------------------------------------------------------------------------------------------
# The model


@pytest.mark.parametrize("dtype", [None, jnp.bfloat16])
@pytest.mark.slow
def test_forward_is_the_same_with_remat(dtype):
    params, images = _params(), _images(4)
    plain = APPLY(MODEL, params, images, dtype=dtype)
    remat = APPLY(MODEL, params, images, dtype=dtype, remat=True)
    _assert_trees_close(plain, remat, rtol=0, atol=0)  # the same operations, in the same order


def test_remat_checkpoints_every_block_and_nothing_without_it():
    params, images = _params(), _images(2)

    def loss(p, remat):
        return jnp.sum(vit.apply(MODEL, p, images, remat=remat)[0] ** 2)

    assert _checkpoints(lambda p: loss(p, False), params) == 0
    assert _checkpoints(lambda p: loss(p, True), params) == MODEL.depth
    assert _checkpoints(jax.grad(lambda p: loss(p, False)), params) == 0
    assert _checkpoints(jax.grad(lambda p: loss(p, True)), params) >= MODEL.depth


def test_remat_keeps_only_block_inputs_for_the_backward_pass():
    """The residuals of the gradient (jax.vjp's pullback): a fraction with remat."""
    params, images = _params(), _images(8)

    def residual_bytes(remat):
        pullback = jax.eval_shape(lambda p: jax.vjp(
            lambda q: vit.apply(MODEL, q, images, remat=remat)[0].sum(), p)[1], params)
        return sum(math.prod(x.shape) * x.dtype.itemsize for x in jax.tree.leaves(pullback))

    assert residual_bytes(True) < 0.5 * residual_bytes(False)


@pytest.mark.slow
def test_gradients_are_the_same_with_remat():
    params, images = _params(), _images(4)

    def loss(p, remat):
        logits, cls = vit.apply(MODEL, p, images, remat=remat)
        return jnp.sum(jnp.sin(logits)) + jnp.sum(cls**2)

    grad = jax.jit(jax.grad(loss), static_argnums=1)
    plain, remat = grad(params, False), grad(params, True)
    _assert_trees_close(plain, remat, rtol=1e-4, atol=1e-5)
    # second order too (MetaUnlearn differentiates through a gradient step)
    hvp = jax.jit(lambda p, t, r: jax.jvp(lambda q: grad(q, r), (p,), (t,))[1],
                  static_argnums=2)
    _assert_trees_close(hvp(params, plain, False), hvp(params, plain, True), rtol=1e-4,
                        atol=1e-5)


def test_remat_cannot_be_combined_with_capturing_inputs():
    with pytest.raises(ConfigError, match="capture_inputs"):
        vit.apply(MODEL, _params(), _images(1), remat=True, capture_inputs=True)


# ---------------------------------------------------------------------------------------------
# The train step (config.train.remat)


def _train_batch(n=6):
    labels = jax.random.randint(jax.random.key(3), (n,), 0, MODEL.num_classes)
    return {"image": _images(n), "label": labels, "mask": jnp.arange(n) < n - 1}


@pytest.mark.slow
def test_train_step_is_the_same_with_remat():
    batch, lr = _train_batch(), jnp.float32(0.5)  # a large step: gradient differences show
    results = {}
    for remat in (False, True):
        cfg = train_lib.TrainConfig(task="classification", compute_dtype="float32",
                                    remat=remat)
        tx = optim.make(cfg.optimizer, cfg.weight_decay, cfg.momentum)
        step = train_lib.make_train_step(MODEL, cfg, tx)
        params = _params()
        jaxpr_checkpoints = _checkpoints(step, params, tx.init(params), batch, lr)
        assert (jaxpr_checkpoints >= MODEL.depth) if remat else jaxpr_checkpoints == 0
        results[remat] = step(params, tx.init(params), batch, lr)
    (p0, s0, out0), (p1, s1, out1) = results[False], results[True]
    np.testing.assert_allclose(out0["loss"], out1["loss"], rtol=1e-6)
    _assert_trees_close(s0, s1)  # the momentum trace: the gradient itself
    _assert_trees_close(p0, p1)


def test_train_step_cache_keys_on_remat():
    base = train_lib.TrainConfig(task="classification", compute_dtype="float32")
    on = dataclasses.replace(base, remat=True)
    _, step_off = train_lib.train_step(MODEL, base)
    _, step_on = train_lib.train_step(MODEL, on)
    assert step_on is not step_off
    assert train_lib.train_step(MODEL, dataclasses.replace(on, lr=0.3, epochs=7))[1] is step_on
    params = _params()
    tx = optim.make(on.optimizer, on.weight_decay, on.momentum)
    args = (params, tx.init(params), _train_batch(), jnp.float32(0.1))
    assert _checkpoints(step_on, *args) >= MODEL.depth and _checkpoints(step_off, *args) == 0


def test_train_remat_in_the_configs_and_validated():
    for config in (config_lib.real_data_config("mufac", "meta_unlearn", 10),
                   _synthfaces_config()):
        assert config.train.remat is False
        assert validate.train_config(config, "classification").remat is False
        config.train.remat = True
        assert validate.train_config(config, "classification").remat is True
    with pytest.raises(ConfigError, match="config.train.remat"):
        train_lib.TrainConfig(task="classification", remat="yes")


def _synthfaces_config():
    import importlib.util
    import os

    path = os.path.join(os.path.dirname(__file__), "..", "configs", "synthfaces.py")
    spec = importlib.util.spec_from_file_location("synthfaces_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


# ---------------------------------------------------------------------------------------------
# MetaUnlearn (config.meta_unlearn.remat)


def _meta_setup(**kw):
    ml_cfg = meta_loss.MetaLossConfig.for_vit(MODEL, num_identities=6, task="multilabel",
                                              hidden_size=16)
    cfg = mu.Config(task="multilabel", meta_lr=0.5, compute_dtype="float32", **kw)
    theta, phi = _params(), meta_loss.init_params(ml_cfg, jax.random.key(5))
    rng = np.random.default_rng(0)

    def batch(*shape):
        return {"image": jnp.asarray(rng.uniform(-1, 1, (*shape, 16, 16, 3)), jnp.float32),
                "label": jnp.asarray(rng.integers(0, 2, (*shape, MODEL.num_classes)),
                                     jnp.int32),
                "mask": jnp.ones(shape, bool)}

    support = {**batch(3), "row": jnp.array([0, 3, 5])}
    return ml_cfg, cfg, theta, phi, support, batch(2, 4), batch(2, 4), batch(2, 4)


@pytest.mark.parametrize("loss_type", ["full", "scrub"])
@pytest.mark.slow
def test_meta_gradient_is_the_same_with_remat(loss_type):
    ml_cfg, cfg, theta, phi, support, forget, val, retain = _meta_setup(loss_type=loss_type)
    rng = jax.random.key(7)  # dropout on, the same masks in both
    fn = jax.jit(mu.meta_gradient, static_argnums=(0, 1, 2))
    loss0, grad0, theta_u0 = fn(MODEL, ml_cfg, cfg, theta, phi, support, forget, val, retain,
                                rng)
    on = dataclasses.replace(cfg, remat=True)
    loss1, grad1, theta_u1 = fn(MODEL, ml_cfg, on, theta, phi, support, forget, val, retain, rng)
    assert float(optax_norm(grad0)) > 0
    np.testing.assert_allclose(loss0, loss1, rtol=1e-6)
    _assert_trees_close(theta_u0, theta_u1)
    _assert_trees_close(grad0, grad1, rtol=1e-4, atol=1e-7)


def optax_norm(tree):
    return jnp.sqrt(sum(jnp.sum(x**2) for x in jax.tree.leaves(tree)))


def test_meta_step_checkpoints_inner_and_outer_passes_only_with_remat():
    ml_cfg, cfg, theta, phi, support, forget, val, _ = _meta_setup()
    tx = mu.optimizer(cfg)
    args = (theta, phi, tx.init(phi), jnp.float32(1e-3), support, forget, val, None,
            jax.random.key(0))
    on = dataclasses.replace(cfg, remat=True)
    assert _checkpoints(mu.meta_step(MODEL, ml_cfg, cfg), *args) == 0
    # the inner step's forward (and its gradient's) and the outer pass through θ_u, per block
    assert _checkpoints(mu.meta_step(MODEL, ml_cfg, on), *args) >= 2 * MODEL.depth
    assert mu.compile_key(on) != mu.compile_key(cfg) and mu.compile_key(on).remat is True
    assert mu.meta_step(MODEL, ml_cfg, on) is not mu.meta_step(MODEL, ml_cfg, cfg)
    # the request-time step is never rematerialised, and shares the plain compilation
    request = mu.make_unlearn_step(MODEL, ml_cfg, on)
    assert _checkpoints(request, theta, phi, support) == 0
    assert mu._cached_unlearn_step(MODEL, ml_cfg, on) is mu._cached_unlearn_step(MODEL, ml_cfg,
                                                                                 cfg)


def test_meta_unlearn_remat_is_a_validated_setting_off_by_default():
    assert mu.Config().remat is False
    assert api.default_block(mu)["remat"] is False
    config = config_lib.real_data_config("mufac", "meta_unlearn", 10)
    assert config.meta_unlearn.remat is False
    with pytest.raises(ConfigError, match="config.meta_unlearn.remat"):
        mu.Config(remat=1)


# ---------------------------------------------------------------------------------------------
# Fingerprints: remat changes memory and speed, never results


def _fake_context():
    config = ml_collections.ConfigDict({"dataset": "synthfaces", "seed": 0,
                                        "data": {"dedup": "none",
                                                 "crop_scale": (0.8, 1.0)}})
    splits = {"train": [0, 1], "retain": [1], "forget": [0]}
    return type("Ctx", (), {"config": config, "model_cfg": MODEL,
                            "dataset": type("D", (), {"fingerprint": "fp"})(),
                            "splits": type("S", (), {"to_dict": lambda self: splits})()})()


def test_remat_is_not_part_of_a_stage_fingerprint():
    ctx = _fake_context()

    def fp(settings):
        return reuse.fingerprint(ctx, "pretrain", "train", settings, "parent", True)

    plain = fp({"lr": 0.1, "epochs": 3})  # a run made before the option existed
    assert fp({"lr": 0.1, "epochs": 3, "remat": False})["hash"] == plain["hash"]
    with_remat = fp({"lr": 0.1, "epochs": 3, "remat": True})
    assert with_remat["hash"] == plain["hash"] and "remat" not in with_remat["parts"]["train"]
    assert fp({"lr": 0.2, "epochs": 3, "remat": True})["hash"] != plain["hash"]
    # a method's Config record (what stages.py fingerprints) likewise
    record = api.config_record(mu.Config(remat=True))
    assert "remat" in record
    method = reuse.fingerprint(ctx, "meta_unlearn", "meta_unlearn", record, "p", True)
    off = reuse.fingerprint(ctx, "meta_unlearn", "meta_unlearn",
                            api.config_record(mu.Config()), "p", True)
    assert method["hash"] == off["hash"]


def test_bf16_stages_carry_the_autocast_numerics_and_their_ap_scores():
    """A bf16 stage's fingerprint holds ``bf16`` (runs made before the float32 residual stream
    are not reused) and ``train.ap_scores`` (it changes best-by-validation there); a float32
    stage's is what it was before either existed, whatever ``ap_scores`` says."""
    ctx = _fake_context()

    def fp(**settings):
        return reuse.fingerprint(ctx, "pretrain", "train", {"lr": 0.1, **settings}, "p", True)

    before = fp(compute_dtype="float32")
    for scores in ("reference", "float32"):
        same = fp(compute_dtype="float32", ap_scores=scores)
        assert same["hash"] == before["hash"] and "bf16" not in same["parts"]
    old_bf16 = fp(compute_dtype="bfloat16")["parts"]
    old_bf16.pop("bf16")
    ref, plain = fp(compute_dtype="bfloat16", ap_scores="reference"), fp(
        compute_dtype="bfloat16", ap_scores="float32")
    assert ref["parts"]["bf16"] == reuse.BF16_NUMERICS and ref["hash"] != plain["hash"]
    assert reuse.differences(old_bf16, ref["parts"]) == [
        f"bf16: '(absent)' -> {reuse.BF16_NUMERICS!r}",
        "train.ap_scores: '(absent)' -> 'reference'"]
