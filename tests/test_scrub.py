"""SCRUB (``unlearn/scrub.py``, SPEC.md 7.1, Q20, Q24) on a tiny ViT.

Expected values are computed here: the KL divergences in float64 numpy, the step objectives
written out in this file (``jax.grad`` of a formula that does not go through the method), and the
steps' updates recovered from the parameters before and after.
"""

import functools
import itertools
import re

import doubles
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from oneshui_jax import hparams
from oneshui_jax.data import pipeline
from oneshui_jax.errors import ConfigError, TrainingDiverged
from oneshui_jax.models import vit
from oneshui_jax.unlearn import api, scrub

CFG = vit.ViTConfig(image_size=16, patch_size=8, width=16, depth=1, num_heads=2, num_classes=3)
MODEL = api.Model(CFG, "multilabel")


@functools.cache
def teacher_student():
    """A teacher and a student that differs from it (so the KL and its gradient are not 0)."""
    return (doubles.random_params(vit.init_params, CFG, 0),
            doubles.random_params(vit.init_params, CFG, 1))


def batch(n, seed, valid=None):
    rng = np.random.default_rng(seed)
    mask = np.ones(n, bool) if valid is None else np.arange(n) < valid
    return {"image": jnp.asarray(rng.uniform(-1, 1, (n, 16, 16, 3)), jnp.float32),
            "label": jnp.asarray(rng.integers(0, 2, (n, 3)), jnp.uint8),
            "mask": jnp.asarray(mask)}


def np_kl(kind, s, t, temperature, mask):
    """``T² Σ_valid rows Σ_c KL / #valid`` in float64 numpy."""
    s, t = np.asarray(s, np.float64) / temperature, np.asarray(t, np.float64) / temperature
    mask = np.asarray(mask, bool)
    if kind == "softmax":
        q = np.exp(t - t.max(-1, keepdims=True))
        q /= q.sum(-1, keepdims=True)
        log_p = s - s.max(-1, keepdims=True)
        log_p -= np.log(np.exp(log_p).sum(-1, keepdims=True))
        rows = (q * (np.log(q) - log_p)).sum(-1)
    else:
        q, p = 1 / (1 + np.exp(-t)), 1 / (1 + np.exp(-s))
        rows = (q * np.log(q / p) + (1 - q) * np.log((1 - q) / (1 - p))).sum(-1)
    return rows[mask].sum() / mask.sum() * temperature ** 2


def written_kl(kind, s, t, temperature, mask):
    """The same KL in jax (differentiable), written out independently of the module."""
    s, t = s / temperature, t / temperature
    m = mask.astype(jnp.float32)
    if kind == "softmax":
        q = jax.nn.softmax(t, -1)
        rows = jnp.sum(q * (jnp.log(q) - jax.nn.log_softmax(s, -1)), -1)
    else:
        q, p = jax.nn.sigmoid(t), jax.nn.sigmoid(s)
        rows = jnp.sum(q * jnp.log(q / p) + (1 - q) * jnp.log((1 - q) / (1 - p)), -1)
    return jnp.sum(rows * m) / jnp.sum(m) * temperature ** 2


def leaves(tree):
    return [np.asarray(x, np.float64) for x in jax.tree.leaves(tree)]


def norm(arrays):
    return float(np.sqrt(sum(np.sum(a ** 2) for a in arrays)))


def logits(params, images):
    return vit.apply(CFG, params, images)[0]


@pytest.mark.parametrize("kind", ["softmax", "bernoulli"])
def test_distill_kl_equals_numpy_and_ignores_padded_rows(kind):
    rng = np.random.default_rng(3)
    s, t = rng.normal(0, 3, (5, 4)), rng.normal(0, 3, (5, 4))
    mask = np.array([1, 1, 1, 0, 1], bool)
    got = float(scrub.distill_kl(kind, jnp.asarray(s), jnp.asarray(t), 4.0, jnp.asarray(mask)))
    assert got == pytest.approx(np_kl(kind, s, t, 4.0, mask), rel=1e-5)
    s_pad = s.copy()
    s_pad[3] = 1e4  # a padded row changes nothing
    again = float(scrub.distill_kl(kind, jnp.asarray(s_pad), jnp.asarray(t), 4.0,
                                   jnp.asarray(mask)))
    assert again == pytest.approx(got, rel=1e-6)
    same = float(scrub.distill_kl(kind, jnp.asarray(t), jnp.asarray(t), 4.0, jnp.asarray(mask)))
    assert abs(same) < 1e-5 and got > 0
    # Q20: the two differ (softmax over the labels is not the per-label KL)
    other = "bernoulli" if kind == "softmax" else "softmax"
    assert np_kl(other, s, t, 4.0, mask) != pytest.approx(got, rel=1e-3)


def test_max_step_ascends_the_kl_with_the_clipped_gradient():
    teacher, student = teacher_student()
    cfg = scrub.Config(compute_dtype="float32", lr=0.01)
    forget = batch(4, 10, valid=3)
    kl = jax.jit(lambda p: written_kl("softmax", logits(p, forget["image"]),
                                      logits(teacher, forget["image"]), 4.0, forget["mask"]))
    grads = leaves(jax.jit(jax.grad(kl))(student))
    raw = norm(grads)
    assert raw > 1.5, "the test needs a gradient the clipping shrinks"
    opt = scrub.optim.sgd(cfg.weight_decay, cfg.momentum).init(student)
    new, _, kl_before, reported = jax.jit(functools.partial(scrub.max_step, MODEL, cfg))(
        student, opt, teacher, forget, jnp.float32(cfg.lr))
    assert float(kl_before) == pytest.approx(float(kl(student)), rel=1e-5)
    assert float(reported) == pytest.approx(raw, rel=1e-4)
    assert float(kl(new)) > float(kl(student))  # the max-step increases the KL
    # first step (momentum buffer empty): θ' = θ − lr (clip(∇(−KL)) + wd θ)
    update = [(p - q) / cfg.lr - cfg.weight_decay * p
              for p, q in zip(leaves(student), leaves(new), strict=True)]
    assert norm(update) == pytest.approx(1.0, rel=1e-3)  # clipped to norm 1.0
    for u, g in zip(update, grads, strict=True):
        np.testing.assert_allclose(u, -g / (raw + 1e-6), atol=2e-5)


def test_min_step_descends_the_retain_objective_without_clipping():
    teacher, student = teacher_student()
    cfg = scrub.Config(compute_dtype="float32", lr=0.01, alpha=0.5, gamma=0.99)
    retain = batch(4, 11, valid=3)

    def objective(p):
        s, t = logits(p, retain["image"]), logits(teacher, retain["image"])
        y = retain["label"].astype(jnp.float32)
        bce = jnp.maximum(s, 0) - s * y + jnp.log1p(jnp.exp(-jnp.abs(s)))
        task = jnp.sum(bce.mean(-1) * retain["mask"]) / jnp.sum(retain["mask"])
        return 0.5 * written_kl("softmax", s, t, 4.0, retain["mask"]) + 0.99 * task

    objective = jax.jit(objective)
    grads = leaves(jax.jit(jax.grad(objective))(student))
    assert norm(grads) > 1.5, "the test needs a gradient that clipping would shrink"
    opt = scrub.optim.sgd(cfg.weight_decay, cfg.momentum).init(student)
    new, _, loss = jax.jit(functools.partial(scrub.min_step, MODEL, cfg))(
        student, opt, teacher, retain, jnp.float32(cfg.lr))
    assert float(loss) == pytest.approx(float(objective(student)), rel=1e-5)
    assert float(objective(new)) < float(objective(student))
    for p, q, g in zip(leaves(student), leaves(new), grads, strict=True):  # unclipped SGD
        np.testing.assert_allclose((p - q) / cfg.lr - cfg.weight_decay * p, g, atol=2e-5)


def test_bernoulli_option_changes_the_max_step_objective():
    teacher, student = teacher_student()
    cfg = scrub.Config(compute_dtype="float32", kl="bernoulli")
    forget = batch(3, 12)
    got = float(scrub.forget_loss(MODEL, cfg, student, teacher, forget))
    expected = np_kl("bernoulli", logits(student, forget["image"]),
                     logits(teacher, forget["image"]), 4.0, forget["mask"])
    assert got == pytest.approx(-expected, rel=1e-4)


# ---------------------------------------------------------------------------------------------
# The loop


def full_data(progress=False):
    """14 images: forget 0-3, retain 4-9, VAL 10-11; 12-13 are test images nobody may read."""
    rng = np.random.default_rng(5)
    records = [{"image": rng.integers(0, 256, (20, 20, 3), dtype=np.uint8),
                "label": rng.integers(0, 2, 3).astype(np.uint8), "identity": i // 2}
               for i in range(14)]
    recording = doubles.Recording(records)
    forget, retain, val = np.arange(4), np.arange(4, 10), np.arange(10, 12)
    source = api.GuardedSource(recording, np.concatenate([forget, retain, val]),
                               "forget, retain and VAL images")
    data = api.FullData(source=source, forget_images=forget, retain_images=retain,
                        val_images=val, image_size=16, seed=0, progress=progress,
                        crop_scale=(0.6, 1.0))
    return data, recording


REQUEST = api.Request(jnp.zeros((1, 16, 16, 3)), jnp.zeros((1, 3)), (0,))


def test_augmented_batches_use_the_study_crop_scale():
    """With use_train_aug, epochs read the train pipeline with FullData.crop_scale."""
    data, _ = full_data()
    indices = np.arange(4, 10)
    (epoch,) = list(scrub.epoch_batches(data, indices, 4, True, 1, seed=7))
    got = [b["image"][b["mask"]] for b in epoch]
    pcfg = pipeline.PipelineConfig(image_size=16, batch_size=4, seed=7, crop_scale=(0.6, 1.0))
    want = [b["image"][b["mask"]] for b in itertools.islice(pipeline.to_iterator(
        pipeline.train_dataset(data.source, indices, pcfg, 1), pcfg), 2)]
    assert len(got) == len(want) == 2
    for g, w in zip(got, want, strict=True):
        np.testing.assert_array_equal(g, w)


@pytest.mark.parametrize("forgetting_epochs,augment", [(1, False), (5, True)])
def test_max_steps_run_only_in_the_first_forgetting_epochs(forgetting_epochs, augment):
    teacher, _ = teacher_student()
    data, recording = full_data()
    cfg = scrub.Config(epochs=3, forgetting_epochs=forgetting_epochs, batch_size=3,
                       batch_size_retain=4, use_train_aug=augment, compute_dtype="float32",
                       lr=0.01)
    new, info = scrub.unlearn(MODEL, teacher, {}, REQUEST, cfg, jax.random.key(0), data=data)
    gate = min(forgetting_epochs, 3)
    assert [h["max_steps"] for h in info["history"]] == [2] * gate + [0] * (3 - gate)
    assert [h["min_steps"] for h in info["history"]] == [2, 2, 2]
    assert (info["max_steps"], info["min_steps"]) == (2 * gate, 6)
    reads = np.bincount(recording.read, minlength=14)
    # every image once per epoch it is used in (the padding of a last batch reads one more)
    assert reads[:4].min() == gate and reads[:4].sum() == gate * 2 * 3  # 2 forget batches of 3
    assert reads[4:10].min() == 3 and reads[4:10].sum() == 3 * 2 * 4  # 2 retain batches of 4
    assert reads[10:].sum() == 0  # no VAL (no validation printout) and never a test image
    kls = [h["forget_kl"] for h in info["history"]]
    assert all(k > -1e-5 for k in kls[:gate]) and kls[gate:] == [None] * (3 - gate)
    assert [h["lr"] for h in info["history"]] == pytest.approx(
        [0.01, 0.01 * 0.75, 0.01 * 0.25])
    assert any(not np.array_equal(a, b) for a, b in zip(leaves(new), leaves(teacher),
                                                         strict=True))


def test_unlearn_needs_full_data():
    teacher, _ = teacher_student()
    with pytest.raises(ValueError, match="ACCESS full"):
        scrub.unlearn(MODEL, teacher, {}, REQUEST, scrub.Config(), jax.random.key(0))


def test_config_reference_values_validation_and_interface():
    api.check_method("scrub", scrub)
    assert scrub.ACCESS == api.FULL
    block, h = api.reference_block(scrub, "scrub", "celebahq", 500)
    assert h.tuned and (block.lr, block.forgetting_epochs, block.use_train_aug) == (5e-4, 7, True)
    assert (block.alpha, block.gamma, block.temperature, block.batch_size_retain) == (
        0.001, 0.99, 4.0, 32)
    block, h = api.reference_block(scrub, "scrub", "celeba", 50)  # SPEC Q24
    assert not h.tuned and (block.lr, block.forgetting_epochs, block.use_train_aug) == (
        0.1, 0, True)
    assert dict(api.default_block(scrub)) == {
        k: v for k, v in hparams.reference("scrub", "celeba", 50).values.items()
        if k in ("epochs", "lr", "momentum", "weight_decay", "batch_size", "batch_size_retain",
                 "forgetting_epochs", "use_train_aug")} | {
        "alpha": 0.001, "gamma": 0.99, "temperature": 4.0, "kl": "softmax",
        "compute_dtype": "bfloat16"}
    for key, value, match in (("kl", "bernouli", "config.scrub.kl"),
                              ("temperature", 0.0, "config.scrub.temperature"),
                              ("forgetting_epochs", -1, "config.scrub.forgetting_epochs"),
                              ("batch_size_retain", 0, "config.scrub.batch_size_retain"),
                              ("momentum", 1.0, "config.scrub.momentum"),
                              ("lr", float("nan"), "config.scrub.lr")):
        with pytest.raises(ConfigError, match=match):
            api.make_config("scrub", scrub, {key: value}, task="multilabel")
    with pytest.raises(ConfigError, match="config.scrub.kl='bernoulli'"):
        api.make_config("scrub", scrub, {"kl": "bernoulli"}, task="classification")
    # the compiled steps do not depend on the loop's settings
    assert scrub.step_config(scrub.Config(lr=0.3, epochs=2)) == scrub.step_config(scrub.Config())


def test_a_loss_that_becomes_nan_stops_at_the_end_of_its_epoch():
    """A planted huge learning rate: one TrainingDiverged (a ConfigError: one line, status 2)
    naming the method, the epoch and that nothing of the run was kept."""
    teacher, _ = teacher_student()
    data, _ = full_data()
    cfg = scrub.Config(epochs=3, forgetting_epochs=1, batch_size=3, batch_size_retain=4,
                       compute_dtype="float32", lr=1e30)
    with pytest.raises(TrainingDiverged) as caught:
        scrub.unlearn(MODEL, teacher, {}, REQUEST, cfg, jax.random.key(0), data=data)
    assert re.fullmatch(
        r"scrub: the (forget_kl|grad_norm|retain_loss) became (nan|inf|-inf) in epoch [0-2] "
        r"\(epochs 0-2\); training stopped and nothing of the method's run was kept \(the model "
        r"it started from is unchanged\)\. Lower config\.scrub\.lr \(1e\+30\) or check the data",
        str(caught.value)), caught.value
    assert isinstance(caught.value, ConfigError)
