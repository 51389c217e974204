"""Bad Teacher (``unlearn/bad_teacher.py``, SPEC.md 7.2, Q20) on a tiny ViT.

Expected values are computed here in float64 numpy: the per-example mixture of the two teachers'
distributions and its KL to the student with ``batchmean`` reduction.
"""

import functools

import doubles
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import test_scrub
from test_scrub import CFG, MODEL, REQUEST, leaves

from oneshui_jax.errors import ConfigError, TrainingDiverged
from oneshui_jax.models import vit
from oneshui_jax.unlearn import api, bad_teacher, scrub


def np_softmax(x):
    x = np.asarray(x, np.float64)
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def np_sigmoid(x):
    return 1 / (1 + np.exp(-np.asarray(x, np.float64)))


def np_loss(kind, student, smart, dumb, split, mask):
    """``Σ_valid rows KL(split P(dumb) + (1 − split) P(smart) ‖ P(student)) / #valid``."""
    prob = np_softmax if kind == "softmax" else np_sigmoid
    split = np.asarray(split, np.float64)[:, None]
    q = split * prob(dumb) + (1 - split) * prob(smart)
    p = prob(student)
    rows = (q * np.log(q / p)).sum(-1)
    if kind == "bernoulli":
        rows += ((1 - q) * np.log((1 - q) / (1 - p))).sum(-1)
    mask = np.asarray(mask, bool)
    return rows[mask].sum() / mask.sum()


def logits_set(seed, n=5, c=4):
    rng = np.random.default_rng(seed)
    return [rng.normal(0, 2, (n, c)) for _ in range(3)]


def test_forget_rows_take_the_bad_teacher_and_retain_rows_the_original():
    flags = bad_teacher.forget_flags(np.array([7, 2, 9, 3, 2]), np.array([2, 3, 11]))
    assert flags.tolist() == [0, 1, 0, 1, 1]
    _, smart, dumb = logits_set(0)
    for kind, prob in (("softmax", np_softmax), ("bernoulli", np_sigmoid)):
        mixed = np.asarray(bad_teacher.mixed_teacher(kind, jnp.asarray(smart), jnp.asarray(dumb),
                                                     jnp.asarray(flags)))
        for row, flag in enumerate(flags):
            expected = prob(dumb[row]) if flag else prob(smart[row])
            np.testing.assert_allclose(mixed[row], expected, atol=1e-6)


@pytest.mark.parametrize("kind", ["softmax", "bernoulli"])
def test_loss_equals_numpy_and_is_zero_at_the_mixed_teacher(kind):
    student, smart, dumb = logits_set(1)
    split = np.array([1, 0, 0, 1, 1], np.float32)
    mask = np.array([1, 1, 1, 1, 0], bool)
    args = [jnp.asarray(a) for a in (student, smart, dumb, split, mask)]
    got = float(bad_teacher.teacher_kl(kind, *args))
    assert got == pytest.approx(np_loss(kind, student, smart, dumb, split, mask), rel=1e-5)
    assert got > 0
    # a student whose distribution is exactly the mixed teacher's: the minimum, 0
    prob = np_softmax if kind == "softmax" else np_sigmoid
    q = split[:, None] * prob(dumb) + (1 - split[:, None]) * prob(smart)
    exact = np.log(q) if kind == "softmax" else np.log(q / (1 - q))
    at_teacher = float(bad_teacher.teacher_kl(kind, jnp.asarray(exact), *args[1:]))
    assert abs(at_teacher) < 1e-5
    assert np_loss(kind, exact + np.random.default_rng(2).normal(0, 0.1, exact.shape), smart,
                   dumb, split, mask) > 1e-4  # and any other student is above it
    student_pad = student.copy()
    student_pad[4] = 50.0  # a padded row changes nothing
    again = float(bad_teacher.teacher_kl(kind, jnp.asarray(student_pad), *args[1:]))
    assert again == pytest.approx(got, rel=1e-6)


def test_loss_fn_runs_the_original_and_the_random_model_per_row():
    params = doubles.random_params(vit.init_params, CFG, 0)
    student = doubles.random_params(vit.init_params, CFG, 1)
    dumb = bad_teacher.dumb_teacher(MODEL, jax.random.key(0))
    cfg = bad_teacher.Config(compute_dtype="float32")
    batch = test_scrub.batch(4, 20, valid=3)
    batch["forget"] = jnp.asarray([1.0, 0.0, 1.0, 0.0])
    got = float(bad_teacher.loss_fn(MODEL, cfg, student, params, dumb, batch))

    def run(p):
        return np.asarray(vit.apply(CFG, p, batch["image"])[0])

    expected = np_loss("softmax", run(student), run(params), run(dumb), batch["forget"],
                       batch["mask"])
    assert got == pytest.approx(expected, rel=1e-4)
    # one SGD step lowers it
    opt = scrub.optim.sgd(cfg.weight_decay, cfg.momentum).init(student)
    new, _, before = jax.jit(functools.partial(bad_teacher.train_step, MODEL, cfg))(
        student, opt, params, dumb, batch, jnp.float32(0.01))
    assert float(before) == pytest.approx(got, rel=1e-6)
    assert float(bad_teacher.loss_fn(MODEL, cfg, new, params, dumb, batch)) < got
    # the random teacher is a fresh init from rng, not the original model
    assert not np.allclose(run(dumb), run(params))
    again = bad_teacher.dumb_teacher(MODEL, jax.random.key(0))
    assert all(np.array_equal(a, b) for a, b in zip(leaves(dumb), leaves(again), strict=True))


def test_unlearn_reads_forget_and_retain_once_per_epoch():
    params = doubles.random_params(vit.init_params, CFG, 0)
    data, recording = test_scrub.full_data()
    cfg = bad_teacher.Config(epochs=2, batch_size=4, lr=0.05, compute_dtype="float32")
    new, info = bad_teacher.unlearn(MODEL, params, {}, REQUEST, cfg, jax.random.key(0),
                                    data=data)
    assert info["steps"] == 2 * 3 and [h["steps"] for h in info["history"]] == [3, 3]
    assert [h["lr"] for h in info["history"]] == pytest.approx([0.05, 0.025])
    assert all(h["loss"] > 0 for h in info["history"])
    reads = np.bincount(recording.read, minlength=14)
    assert reads[:10].min() == 2 and reads[:10].sum() == 2 * 3 * 4  # 3 batches of 4 per epoch
    assert reads[10:].sum() == 0  # no VAL, never a test image
    assert any(not np.array_equal(a, b) for a, b in zip(leaves(new), leaves(params),
                                                         strict=True))
    with pytest.raises(ValueError, match="ACCESS full"):
        bad_teacher.unlearn(MODEL, params, {}, REQUEST, cfg, jax.random.key(0))


def test_config_reference_values_validation_and_interface():
    api.check_method("bad_teacher", bad_teacher)
    assert bad_teacher.ACCESS == api.FULL
    block, h = api.reference_block(bad_teacher, "bad_teacher", "celeba", 200)
    assert h.tuned and (block.batch_size, block.lr, block.epochs, block.use_train_aug) == (
        256, 1e-4, 5, False)
    block, h = api.reference_block(bad_teacher, "bad_teacher", "mufac", 5)
    assert (block.lr, block.use_train_aug, block.momentum, block.weight_decay) == (
        1e-3, True, 0.9, 5e-4)
    block, h = api.reference_block(bad_teacher, "bad_teacher", "celeba", 20)  # SPEC Q24
    assert not h.tuned and block.lr == 0.1
    for key, value in (("kl", "kl"), ("batch_size", 0), ("epochs", 0), ("weight_decay", -1.0),
                       ("compute_dtype", "float16")):
        with pytest.raises(ConfigError, match=f"config.bad_teacher.{key}"):
            api.make_config("bad_teacher", bad_teacher, {key: value}, task="multilabel")
    with pytest.raises(ConfigError, match="config.bad_teacher.kl='bernoulli'"):
        api.make_config("bad_teacher", bad_teacher, {"kl": "bernoulli"}, task="classification")
    assert scrub.step_config(bad_teacher.Config(lr=1.0, batch_size=3)) == scrub.step_config(
        bad_teacher.Config())


def test_a_loss_that_becomes_nan_stops_at_the_end_of_its_epoch():
    params = doubles.random_params(vit.init_params, CFG, 0)
    data, _ = test_scrub.full_data()
    cfg = bad_teacher.Config(epochs=2, batch_size=4, lr=1e30, compute_dtype="float32")
    with pytest.raises(TrainingDiverged, match=(
            r"^bad_teacher: the loss became (nan|inf) in epoch [01] \(epochs 0-1\); training "
            r"stopped and nothing of the method's run was kept .* Lower config\.bad_teacher\.lr "
            r"\(1e\+30\)")):
        bad_teacher.unlearn(MODEL, params, {}, REQUEST, cfg, jax.random.key(0), data=data)
