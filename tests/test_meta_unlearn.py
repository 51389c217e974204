"""MetaUnlearn: exact streamed meta-gradient, outer objectives, request-time step (SPEC.md 6)."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from oneshui_jax import losses
from oneshui_jax.models import meta_loss, vit
from oneshui_jax.unlearn.meta_unlearn import core as mu

C = 4
# Jitted once per config (static: model, meta-loss and MetaUnlearn configs, the objective).
meta_gradient = jax.jit(mu.meta_gradient, static_argnums=(0, 1, 2, 10))
meta_gradient_naive = jax.jit(mu.meta_gradient_naive, static_argnums=(0, 1, 2, 10))


def _setup(task="multilabel", loss_type="full", dtype=jnp.float32, use_accs=True, **kw):
    model_cfg = vit.ViTConfig(image_size=16, patch_size=8, width=16, depth=1, num_heads=2,
                              num_classes=C)
    ml_cfg = meta_loss.MetaLossConfig.for_vit(model_cfg, num_identities=6, task=task,
                                              hidden_size=16)
    cfg = mu.Config(task=task, meta_lr=0.5, loss_type=loss_type, use_accs=use_accs,
                               compute_dtype=jnp.dtype(dtype).name, **kw)
    theta = jax.tree.map(lambda x: x.astype(dtype), vit.init_params(model_cfg, jax.random.key(0)))
    phi = jax.tree.map(lambda x: x.astype(dtype),
                       meta_loss.init_params(ml_cfg, jax.random.key(1)))
    rng = np.random.default_rng(0)

    def labels(*shape):
        if task == "multilabel":
            return jnp.asarray(rng.integers(0, 2, (*shape, C)), jnp.int32)
        return jnp.asarray(rng.integers(0, C, shape), jnp.int32)

    def images(*shape):
        return jnp.asarray(rng.uniform(-1, 1, (*shape, 16, 16, 3)), dtype)

    support = {"image": images(3), "label": labels(3), "row": jnp.array([0, 3, 5]),
               "mask": jnp.array([True, True, False])}
    mask = np.ones((2, 5), bool)
    mask[1, 3:] = False  # the last forget batch is partial
    forget = {"image": images(2, 5), "label": labels(2, 5), "mask": jnp.asarray(mask)}
    val = {"image": images(2, 5), "label": labels(2, 5), "mask": jnp.ones((2, 5), bool)}
    retain = {"image": images(2, 5), "label": labels(2, 5), "mask": jnp.ones((2, 5), bool)}
    return model_cfg, ml_cfg, cfg, theta, phi, support, forget, val, retain


@pytest.mark.parametrize("loss_type", ["full", "rev", "scrub"])
@pytest.mark.slow
def test_streamed_meta_gradient_equals_differentiating_everything(loss_type):
    model_cfg, ml_cfg, cfg, theta, phi, support, forget, val, retain = _setup(loss_type=loss_type)
    rng = jax.random.key(7)  # dropout on, the same masks in both
    loss_s, grad_s, _ = meta_gradient(model_cfg, ml_cfg, cfg, theta, phi, support, forget, val,
                                      retain, rng, mu.outer_batch_loss)
    loss_n, grad_n = meta_gradient_naive(model_cfg, ml_cfg, cfg, theta, phi, support, forget,
                                         val, retain, rng, mu.outer_batch_loss)
    np.testing.assert_allclose(loss_s, loss_n, rtol=1e-5)
    flat_s, flat_n = jax.tree.leaves(grad_s), jax.tree.leaves(grad_n)
    scale = max(float(jnp.abs(g).max()) for g in flat_n)
    assert scale > 0
    for a, b in zip(flat_s, flat_n, strict=True):
        np.testing.assert_allclose(a, b, atol=1e-5 * scale, rtol=1e-4)


@pytest.mark.slow
def test_meta_gradient_matches_finite_differences_in_float64():
    # "original" compares with the original model only: no detached target moves with phi
    # (with "full", the detached unlearned-val term makes the meta-gradient differ from the
    # total derivative, as in the reference).
    with jax.enable_x64(True):
        model_cfg, ml_cfg, cfg, theta, phi, support, forget, val, retain = _setup(
            dtype=jnp.float64, use_accs=False, forget_loss="l2", loss_type="original")
        rng = jax.random.key(3)

        def total(p):
            return meta_gradient_naive(model_cfg, ml_cfg, cfg, theta, p, support, forget, val,
                                       None, rng, mu.outer_batch_loss)[0]

        _, grad, _ = meta_gradient(model_cfg, ml_cfg, cfg, theta, phi, support, forget, val,
                                   None, rng, mu.outer_batch_loss)
        direction = jax.tree.map(
            lambda x: jnp.asarray(np.random.default_rng(x.size).normal(size=x.shape)), phi)
        eps = 1e-5
        plus = total(jax.tree.map(lambda p, d: p + eps * d, phi, direction))
        minus = total(jax.tree.map(lambda p, d: p - eps * d, phi, direction))
        numeric = (plus - minus) / (2 * eps)
        analytic = sum(jnp.vdot(g, d) for g, d in zip(jax.tree.leaves(grad),
                                                      jax.tree.leaves(direction), strict=True))
        assert abs(float(analytic)) > 1e-8
        np.testing.assert_allclose(float(analytic), float(numeric), rtol=1e-4)
    assert not jax.config.read("jax_enable_x64")


@pytest.mark.slow
def test_inner_step_is_one_gradient_step_on_the_learned_loss():
    model_cfg, ml_cfg, cfg, theta, phi, support, *_ = _setup()
    step = mu.make_unlearn_step(model_cfg, ml_cfg, cfg)
    theta_u = step(theta, phi, support)

    def mean_learned_loss(t):  # written out: valid support rows only, dropout off
        logits, cls = vit.apply(model_cfg, t, support["image"][:2])
        x = meta_loss.meta_inputs(ml_cfg, logits, cls, support["label"][:2])
        return meta_loss.apply(ml_cfg, phi, x, support["row"][:2]).mean()

    grads = jax.grad(mean_learned_loss)(theta)
    expected = jax.tree.map(lambda p, g: p - cfg.meta_lr * g, theta, grads)
    for a, b in zip(jax.tree.leaves(theta_u), jax.tree.leaves(expected), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-6)
    changed = [float(jnp.abs(a - b).max()) for a, b in zip(jax.tree.leaves(theta_u),
                                                           jax.tree.leaves(theta), strict=True)]
    assert max(changed) > 0
    twice = mu.apply_steps(step, theta, phi, support, forget_epochs=2)
    assert not np.allclose(jax.tree.leaves(twice)[0], jax.tree.leaves(theta_u)[0])


@pytest.mark.slow
def test_meta_step_updates_phi_and_compiles_once():
    model_cfg, ml_cfg, cfg, theta, phi, support, forget, val, retain = _setup()
    tx = mu.optimizer(cfg)
    step = mu.make_meta_step(model_cfg, ml_cfg, cfg, tx)
    state = tx.init(phi)
    new_phi, state, stats, theta_u = step(theta, phi, state, jnp.float32(1e-2), support, forget,
                                          val, None, jax.random.key(0))
    assert np.isfinite(float(stats["loss"])) and float(stats["grad_norm"]) > 0
    assert any(not np.allclose(a, b) for a, b in zip(jax.tree.leaves(new_phi),
                                                     jax.tree.leaves(phi), strict=True))
    step(theta, new_phi, state, jnp.float32(5e-3), support, forget, val, None,
         jax.random.key(1))
    assert step._cache_size() == 1
    assert jax.tree.structure(theta_u) == jax.tree.structure(theta)


@pytest.mark.slow
def test_retain_step_works_for_classification():
    """The optional retain step's objective (the task loss, Q18) through the streamed
    meta-gradient on a classification task. Values of every outer objective are checked against
    numpy in ``test_objectives.py``."""
    model_cfg, ml_cfg, cfg, theta, phi, support, forget, val, retain = _setup(
        task="classification", use_retain=True)
    loss, grad, _ = meta_gradient(model_cfg, ml_cfg, cfg, theta, phi, support, forget, val,
                                  retain, None, mu.retain_batch_loss)
    assert np.isfinite(float(loss)) and float(optax.global_norm(grad)) > 0


def test_outer_objective_pieces():
    logits = jnp.array([[2.0, -1.0], [0.5, 0.5], [9.0, -9.0]])
    labels = jnp.array([[1, 0], [0, 1], [1, 1]])
    mask = jnp.array([True, True, False])
    # mAP over the two valid rows: label 0 perfectly ranked, label 1 one positive ranked first.
    assert float(losses.batch_map(logits, labels, mask)) == pytest.approx(1.0)
    assert float(losses.distance("smooth_l1", jnp.float32(0.5), 0.0)) == pytest.approx(0.125)
    assert float(losses.distance("smooth_l1", jnp.float32(3.0), 0.0)) == pytest.approx(2.5)
    assert float(losses.distance("l2", jnp.float32(3.0), 1.0)) == pytest.approx(4.0)
    same = losses.kl_mean(logits, logits, mask)
    assert float(same) == pytest.approx(0.0, abs=1e-7)
    with pytest.raises(ValueError, match="loss_type"):
        mu.Config(task="multilabel", loss_type="fancy")


def test_meta_lr_schedule_is_per_epoch_cosine():
    cfg = mu.Config(task="multilabel", epochs=3, lr=1.0)
    assert [round(cfg.lr_at(e), 6) for e in range(3)] == [1.0, 0.75, 0.25]
    assert dataclasses.replace(cfg, epochs=1).lr_at(0) == 1.0


def test_reference_hyperparameter_table():
    """SPEC.md 6.6, the reference's const.py."""
    h = mu.reference_hyperparameters
    assert h("celeba", 5) == dict(batch_size=64, num_identities_simulation=5, tuned=True,
                                  epochs=3, lr=1e-4, meta_lr=0.1)
    assert (h("mufac", 5)["epochs"], h("mufac", 5)["lr"], h("mufac", 5)["meta_lr"]) == (
        10, 1e-2, 1e-3)
    assert (h("mufac", 10)["lr"], h("mufac", 10)["meta_lr"]) == (1e-3, 1e-3)
    assert h("celebahq", 1)["num_identities_simulation"] == 50
    assert h("celeba", 1)["lr"] == 1e-3 and h("celeba", 1)["num_identities_simulation"] == 10
    fallback = h("mufac", 20)
    assert not fallback["tuned"] and fallback["meta_lr"] == 0.1 and fallback["epochs"] == 8
    with pytest.raises(ValueError, match="synthfaces"):
        h("synthfaces", 10)


@pytest.mark.slow
def test_meta_training_learns_a_step_that_unlearns_a_planted_request():
    """The method's claim on a planted case. The model is confident and right on the forget
    person's images and wrong on the validation images (forget loss far below val loss).
    Meta-training on this request (``original``: bring the unlearned model's forget loss to the
    original model's val loss) lowers the outer objective, and the learned one-step update then
    raises the forget loss towards the val loss on images of that person it never stepped on."""
    model_cfg = vit.ViTConfig(image_size=16, patch_size=8, width=16, depth=1, num_heads=2,
                              num_classes=C)
    ml_cfg = meta_loss.MetaLossConfig.for_vit(model_cfg, num_identities=2, task="classification",
                                              hidden_size=32, dropout=0.0)
    cfg = mu.Config(task="classification", meta_lr=0.5, loss_type="original", use_accs=False,
                    forget_loss="l1", compute_dtype="float32", dropout=0.0)
    # the plant was set up with the demos' initialisation (vit.INIT_SCHEMES)
    theta = vit.init_params(model_cfg, jax.random.key(0), "lecun")
    theta["head"] = jax.tree.map(lambda x: 100.0 * x, theta["head"])  # confident predictions
    rng = np.random.default_rng(0)
    images = jnp.asarray(rng.uniform(-1, 1, (16, 16, 16, 3)), jnp.float32)
    logits = vit.apply(model_cfg, theta, images)[0]
    right, wrong = jnp.argmax(logits, -1), jnp.argmin(logits, -1)
    support = {"image": images[:4], "label": right[:4], "row": jnp.zeros(4, jnp.int32),
               "mask": jnp.ones(4, bool)}
    forget = {"image": images[None, :8], "label": right[None, :8], "mask": jnp.ones((1, 8), bool)}
    val = {"image": images[None, 8:], "label": wrong[None, 8:], "mask": jnp.ones((1, 8), bool)}
    held_out = {"image": images[4:8], "label": right[4:8], "mask": jnp.ones(4, bool)}

    def task_loss(params, batch):
        out = vit.apply(model_cfg, params, batch["image"])[0]
        return float(losses.task_loss("classification", out, batch["label"], batch["mask"]))

    forget_before = task_loss(theta, held_out)
    val_loss = task_loss(theta, jax.tree.map(lambda x: x[0], val))
    assert forget_before < 0.2 * val_loss  # the planted gap

    tx = mu.optimizer(cfg)
    step = mu.make_meta_step(model_cfg, ml_cfg, cfg, tx)
    phi = meta_loss.init_params(ml_cfg, jax.random.key(1))
    state = tx.init(phi)
    outer = []
    for k in range(40):
        phi, state, stats, _ = step(theta, phi, state, jnp.float32(1e-2), support, forget, val,
                                    None, jax.random.key(k))
        outer.append(float(stats["loss"]))
    assert outer[-1] < 0.3 * outer[0]
    unlearned = mu.make_unlearn_step(model_cfg, ml_cfg, cfg)(theta, phi, support)
    forget_after = task_loss(unlearned, held_out)
    assert forget_after > forget_before + 0.5 * (val_loss - forget_before)
