"""The training loop (``train.fit``, ``train.evaluate``, SPEC.md 4) checked from outside.

Expected values are worked out here, independently of the code under test: the learning rate of
every step from the reference's schedule written out in closed form, the best-by-validation
epoch from scripted validation scores, and losses and metrics in plain numpy.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from oneshui_jax import train as train_lib
from oneshui_jax.models import vit

TINY = vit.ViTConfig.preset("vit_tiny_test", num_classes=3)
PLAIN_SGD = {"momentum": 0.0, "weight_decay": 0.0}  # one compiled step for the whole module


def _batches(n_batches: int, batch_size: int = 4, seed: int = 0):
    """An endless cycle of fixed random batches (the last one padded), like grain's iterator."""
    rng = np.random.default_rng(seed)
    fixed = []
    for b in range(n_batches):
        mask = np.ones(batch_size, bool)
        if b == n_batches - 1:
            mask[-1] = False
        fixed.append({"image": rng.uniform(-1, 1, (batch_size, 32, 32, 3)).astype(np.float32),
                      "label": rng.integers(0, 3, batch_size), "mask": mask})

    class Cycle:
        def __init__(self):
            self.i = 0

        def __next__(self):
            batch = fixed[self.i % n_batches]
            self.i += 1
            return batch

    return Cycle()


def _expected_lr(step: int, base: float, steps_per_epoch: int, epochs: int, warmup: int):
    """The reference's schedule written out: per-step linear warmup, then per-epoch cosine."""
    epoch = step // steps_per_epoch
    if epoch < warmup:
        return base * step / (warmup * steps_per_epoch + 1e-8)
    return base * 0.5 * (1.0 + math.cos(math.pi * (epoch - warmup) / epochs))


_CALLS: list[dict] = []


@pytest.fixture(scope="module", autouse=True)
def _recording_train_step():
    """Wraps the train step ``fit`` builds (for this module): records the learning rate of every
    call and the parameters before and after it."""
    real = train_lib.make_train_step

    def make_recording(model_cfg, cfg, tx):
        step = real(model_cfg, cfg, tx)

        def recording(params, opt_state, batch, lr):
            before = jax.device_get(params)
            params, opt_state, out = step(params, opt_state, batch, lr)
            _CALLS.append({"lr": float(lr), "before": before, "after": jax.device_get(params),
                           "batch": batch})
            return params, opt_state, out

        return recording

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(train_lib, "make_train_step", make_recording)
        train_lib._cached_train_step.cache_clear()  # built again, through the recording wrapper
        yield
    train_lib._cached_train_step.cache_clear()


@pytest.fixture
def recorded_steps():
    _CALLS.clear()
    return _CALLS


@pytest.mark.parametrize("warmup", [0, 1, 3])
@pytest.mark.slow
def test_fit_applies_the_reference_schedule_at_every_step(recorded_steps, warmup):
    epochs, steps = 5, 2
    cfg = train_lib.TrainConfig(task="classification", compute_dtype="float32", epochs=epochs,
                                lr=0.2, warmup_epochs=warmup, **PLAIN_SGD)
    params = vit.init_params(TINY, jax.random.key(0))
    train_lib.fit(TINY, cfg, params, _batches(steps), steps,
                  lambda p: {"loss": 0.0, "metric": 1.0}, progress=False)
    got = [c["lr"] for c in recorded_steps]
    want = [_expected_lr(k, 0.2, steps, epochs, warmup) for k in range(epochs * steps)]
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-9)
    if warmup:
        assert got[0] == 0.0  # the reference's very first batch runs at lr 0
    # Hand-checked values: after warmup the cosine never reaches 0.
    assert got[-1] == pytest.approx(0.2 * 0.5 * (1 + math.cos(math.pi * (epochs - 1 - warmup)
                                                              / epochs)), rel=1e-6)


def test_the_step_moves_parameters_by_lr_times_the_gradient(recorded_steps):
    """Plain SGD (no momentum, no decay): ``p_after = p_before - lr * dL/dp``, with ``L`` the mean
    cross-entropy over the valid rows, worked out here from the model's logits in numpy."""
    cfg = train_lib.TrainConfig(task="classification", compute_dtype="float32", epochs=3,
                                lr=0.5, warmup_epochs=1, **PLAIN_SGD)
    params = vit.init_params(TINY, jax.random.key(1))
    train_lib.fit(TINY, cfg, params, _batches(2), 2, lambda p: {"loss": 0.0, "metric": 1.0},
                  progress=False)
    call = next(c for c in recorded_steps if c["lr"] > 0 and not c["batch"]["mask"].all())
    batch = call["batch"]
    valid = batch["mask"]

    def direct_loss(p):  # the loss the step should descend: mean CE over valid rows only
        logits = vit.apply(TINY, p, jnp.asarray(batch["image"][valid]))[0]
        labels = jnp.asarray(batch["label"][valid])
        log_probs = logits - jax.scipy.special.logsumexp(logits, -1, keepdims=True)
        return -jnp.mean(jnp.take_along_axis(log_probs, labels[:, None], -1))

    grads = jax.jit(jax.grad(direct_loss))(call["before"])
    expected = jax.tree.map(lambda p, g: p - call["lr"] * g, call["before"], grads)
    for a, b in zip(jax.tree.leaves(call["after"]), jax.tree.leaves(expected), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_fit_keeps_the_best_by_validation_parameters():
    """Validation scores are scripted: the best epoch is 1 (strictly better wins, ties keep the
    first), and the parameters returned are those validated at that epoch, not the last ones."""
    cfg = train_lib.TrainConfig(task="classification", compute_dtype="float32", epochs=4,
                                lr=0.1, warmup_epochs=0, **PLAIN_SGD)
    scores = iter([40.0, 70.0, 70.0, 55.0])
    seen = []

    def validate(p):
        seen.append(jax.device_get(p))
        return {"loss": 1.0, "metric": next(scores)}

    result = train_lib.fit(TINY, cfg, vit.init_params(TINY, jax.random.key(2)), _batches(2), 2,
                           validate, progress=False)
    assert result.best_epoch == 1
    assert [h["val_metric"] for h in result.history] == [40.0, 70.0, 70.0, 55.0]
    for got, want in zip(jax.tree.leaves(result.params), jax.tree.leaves(seen[1]),
                         strict=True):
        np.testing.assert_array_equal(got, want)
    assert any(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(seen[1]),
                                                        jax.tree.leaves(seen[3]), strict=True))


def test_fit_without_any_improvement_keeps_the_last_parameters():
    """Validation never beats 0 (the reference would crash, Q17): the last parameters are kept."""
    cfg = train_lib.TrainConfig(task="classification", compute_dtype="float32", epochs=2,
                                lr=0.1, warmup_epochs=0, **PLAIN_SGD)
    seen = []

    def validate(p):
        seen.append(jax.device_get(p))
        return {"loss": 1.0, "metric": 0.0}

    result = train_lib.fit(TINY, cfg, vit.init_params(TINY, jax.random.key(3)), _batches(2), 2,
                           validate, progress=False)
    assert result.best_epoch == 1
    for got, want in zip(jax.tree.leaves(result.params), jax.tree.leaves(seen[-1]), strict=True):
        np.testing.assert_array_equal(got, want)


def _numpy_ce(logits: np.ndarray, labels: np.ndarray) -> np.ndarray:
    logits = logits.astype(np.float64)
    shifted = logits - logits.max(-1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
    return -log_probs[np.arange(len(labels)), labels]


def test_train_loss_is_the_mean_over_valid_rows_only():
    """The training loss of a padded batch equals the numpy mean of per-example losses over its
    valid rows (the padded row's loss would change it)."""
    cfg = train_lib.TrainConfig(task="classification", compute_dtype="float32", **PLAIN_SGD)
    params = vit.init_params(TINY, jax.random.key(4))
    images = np.random.default_rng(5).uniform(-1, 1, (4, 32, 32, 3)).astype(np.float32)
    labels, mask = np.array([0, 2, 1, 2]), np.array([True, True, True, False])
    logits = np.asarray(vit.apply(TINY, params, jnp.asarray(images))[0])
    tx, step = train_lib.train_step(TINY, cfg)
    _, _, out = step(jax.tree.map(jnp.copy, params), tx.init(params),
                     {"image": images, "label": labels, "mask": mask}, jnp.float32(0.0))
    per_example = _numpy_ce(logits, labels)
    assert float(out["loss"]) == pytest.approx(per_example[mask].mean(), rel=1e-5)
    assert float(out["loss"]) != pytest.approx(per_example.mean(), rel=1e-3)


@pytest.mark.parametrize("batch_size", [32, 256])
def test_split_loss_at_the_evaluation_batch_is_the_reference_batch_mean(batch_size):
    """A planted forget set of 70 images through the evaluation pipeline at batch 32 (the
    reference's, 3 batches: 32 + 32 + 6) and 256 (one batch): the split loss is the mean of the
    per-batch means for that batch size, which differ from each other here."""
    from oneshui_jax.data import pipeline

    n = 70
    planted = (np.arange(n) * 7 % 13).astype(np.float32) + np.where(np.arange(n) >= 64, 20, 0)
    source = [{"image": np.zeros((8, 8, 3), np.uint8), "label": i, "identity": 0}
              for i in range(n)]
    cfg = pipeline.PipelineConfig(image_size=8, batch_size=batch_size)

    def eval_step(params, images, labels):  # the planted loss of each image, by its index
        labels = np.asarray(labels)
        return np.eye(3, dtype=np.float32)[labels % 3], planted[np.minimum(labels, n - 1)]

    out = train_lib.evaluate(eval_step, None, pipeline.eval_batches(source, np.arange(n), cfg),
                             "classification")
    means = [planted[i:i + batch_size].mean() for i in range(0, n, batch_size)]
    assert out["loss"] == pytest.approx(float(np.mean(means)), rel=1e-6)
    np.testing.assert_array_equal(out["losses"], planted)
    at_32 = np.mean([planted[i:i + 32].mean() for i in range(0, n, 32)])
    assert at_32 != pytest.approx(planted.mean(), rel=1e-3)  # the batch size matters here


def test_evaluate_ignores_padded_rows_and_averages_batch_means():
    """``evaluate``: per-example losses and the metric over valid rows only (padding holds
    garbage that would change both), and the loss as the unweighted mean of per-batch means
    (the reference's semantics, Q28), which differs from the mean over examples here."""
    rng = np.random.default_rng(6)
    params = vit.init_params(TINY, jax.random.key(5))
    batches = []
    for size in (4, 1):  # the second batch holds one valid row and three padded ones
        mask = np.arange(4) < size
        images = rng.uniform(-1, 1, (4, 32, 32, 3)).astype(np.float32)
        images[~mask] = 50.0
        labels = rng.integers(0, 3, 4)
        batches.append({"image": images, "label": labels, "mask": mask})
    eval_step = train_lib.make_eval_step(TINY, "classification", "float32")
    out = train_lib.evaluate(eval_step, params, iter(batches), "classification")

    per_batch, all_logits, all_labels = [], [], []
    for b in batches:
        logits = np.asarray(vit.apply(TINY, params, jnp.asarray(b["image"]))[0])[b["mask"]]
        labels = b["label"][b["mask"]]
        per_batch.append(_numpy_ce(logits, labels))
        all_logits.append(logits)
        all_labels.append(labels)
    np.testing.assert_allclose(out["losses"], np.concatenate(per_batch), rtol=1e-5)
    assert out["loss"] == pytest.approx(np.mean([p.mean() for p in per_batch]), rel=1e-5)
    assert out["loss"] != pytest.approx(np.concatenate(per_batch).mean(), rel=1e-3)
    logits, labels = np.concatenate(all_logits), np.concatenate(all_labels)
    assert out["metric"] == pytest.approx(100.0 * np.mean(logits.argmax(-1) == labels))
    assert len(out["losses"]) == 5
