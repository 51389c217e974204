"""mAP with torchmetrics-1.3.0 semantics, accuracy, ToW, and the reference's LR schedule."""

import math

import numpy as np
import pytest
from sklearn.metrics import average_precision_score

from oneshui_jax import metrics, optim


def test_average_precision_matches_sklearn_with_ties():
    rng = np.random.default_rng(0)
    for _ in range(20):
        scores = rng.integers(0, 5, 60) / 4.0  # heavy ties, like bf16 scores
        targets = rng.integers(0, 2, 60)
        if targets.sum() == 0:
            continue
        assert metrics.average_precision(scores, targets) == pytest.approx(
            average_precision_score(targets, scores), abs=1e-12)


def test_map_skips_labels_without_positives():
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(50, 4))
    targets = rng.integers(0, 2, (50, 4))
    targets[:, 2] = 0  # no positive: NaN in torchmetrics 1.3.0, left out of the mean
    expected = np.mean([average_precision_score(targets[:, c], logits[:, c])
                        for c in (0, 1, 3)]) * 100
    assert metrics.mean_average_precision(logits, targets) == pytest.approx(expected)
    assert math.isnan(metrics.mean_average_precision(logits, np.zeros_like(targets)))


def _round_to_bf16(x: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 -> float64 by bit arithmetic: keep the top 16 bits of the float32,
    rounding to nearest, ties to even (what torch does when it stores a bf16 result)."""
    bits = np.asarray(x, np.float32).view(np.uint32).astype(np.uint64)
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
    return rounded.astype(np.uint32).view(np.float32).astype(np.float64)


def test_map_on_bf16_rounded_scores_is_the_reference_q4():
    """The reference scores torch.sigmoid of bf16 logits, i.e. sigmoid rounded to bf16 (SPEC Q4):
    ``score_dtype="bfloat16"`` gives sklearn's AP on independently rounded scores; it ties
    confident images, so it differs from the float scores here."""
    rng = np.random.default_rng(3)
    logits = rng.normal(3.0, 2.5, size=(400, 3)).astype(np.float32)
    targets = rng.integers(0, 2, (400, 3))
    scores = _round_to_bf16(1.0 / (1.0 + np.exp(-logits.astype(np.float64))))
    np.testing.assert_array_equal(metrics.sigmoid_scores(logits, "bfloat16"), scores)
    assert len(np.unique(scores)) < 0.5 * scores.size  # many ties
    expected = np.mean([average_precision_score(targets[:, c], scores[:, c])
                        for c in range(3)]) * 100
    rounded = metrics.task_metric("multilabel", logits, targets, "bfloat16")
    assert rounded == pytest.approx(expected, abs=1e-9)
    assert rounded != pytest.approx(metrics.task_metric("multilabel", logits, targets), abs=1e-3)


def test_ap_score_dtype_follows_config_train_ap_scores():
    """``config.train.ap_scores``: "reference" rounds the scores to a half-precision compute
    dtype (the reference's bf16 autocast) and to nothing under float32; "float32" never."""
    from oneshui_jax import train
    from oneshui_jax.errors import ConfigError

    assert train.ap_score_dtype("bfloat16") == "bfloat16"
    assert train.ap_score_dtype("bfloat16", "float32") is None
    assert train.ap_score_dtype("float32", "reference") is None
    with pytest.raises(ConfigError, match="ap_scores"):
        train.ap_score_dtype("bfloat16", "bf16")
    with pytest.raises(ConfigError, match="config.train.ap_scores"):
        train.TrainConfig(task="multilabel", ap_scores="sometimes")


def test_accuracy_and_task_dispatch():
    logits = np.array([[0.1, 0.9], [0.8, 0.2], [0.3, 0.7]])
    assert metrics.accuracy(logits, np.array([1, 0, 0])) == pytest.approx(200 / 3)
    assert metrics.task_metric("classification", logits, np.array([1, 0, 1])) == 100.0
    with pytest.raises(ValueError, match="unknown task"):
        metrics.task_metric("regression", logits, np.array([1, 0, 1]))


def test_tow():
    ref = {"retain": 90.0, "forget": 60.0, "test": 80.0}
    assert metrics.tow(ref, ref) == pytest.approx(100.0)
    got = {"retain": 80.0, "forget": 70.0, "test": 80.0}
    assert metrics.tow(got, ref) == pytest.approx(100 * 0.9 * 0.9)


def test_reference_lr_schedule():
    """Values of torch's WarmUpLR + CosineAnnealingLR(T_max=30) as the reference steps them."""
    kw = dict(base_lr=1e-3, steps_per_epoch=10, epochs=30, warmup_epochs=2)
    assert optim.reference_lr(0, **kw) == 0.0  # the first batch runs at lr 0
    assert optim.reference_lr(1, **kw) == pytest.approx(1e-3 / 20)
    assert optim.reference_lr(19, **kw) == pytest.approx(1e-3 * 19 / 20)
    assert optim.reference_lr(20, **kw) == pytest.approx(1e-3)  # epoch 2
    assert optim.reference_lr(29, **kw) == pytest.approx(1e-3)  # constant within an epoch
    assert optim.reference_lr(30, **kw) == pytest.approx(1e-3 * (1 + math.cos(math.pi / 30)) / 2)
    last = optim.reference_lr(299, **kw)
    assert last == pytest.approx(1e-3 * 0.0245, rel=1e-2) and last > 0  # never reaches 0


def test_epoch_cosine_is_torch_cosine_annealing_per_epoch():
    """CosineAnnealingLR(T_max=4) stepped once per epoch: lr of epochs 0-3 (PGU, MetaUnlearn)."""
    lrs = [optim.epoch_cosine(0.1, e, 4) for e in range(4)]
    np.testing.assert_allclose(lrs, [0.1, 0.1 * (1 + 0.5 ** 0.5) / 2, 0.05,
                                     0.1 * (1 - 0.5 ** 0.5) / 2], rtol=1e-12)


def test_sgd_matches_torch_semantics():
    """p -= lr * buf, buf = 0.9 buf + (g + wd p): torch.optim.SGD(momentum=0.9, weight_decay)."""
    import jax.numpy as jnp
    tx = optim.sgd(weight_decay=0.1, momentum=0.9)
    p = jnp.array([1.0, -2.0])
    state = tx.init(p)
    buf = np.zeros(2)
    p_ref = np.array([1.0, -2.0])
    for g in ([0.5, 0.5], [1.0, -1.0], [0.0, 2.0]):
        u, state = tx.update(jnp.array(g), state, p)
        p = p - 0.1 * u
        buf = 0.9 * buf + (np.array(g) + 0.1 * p_ref)
        p_ref = p_ref - 0.1 * buf
    np.testing.assert_allclose(p, p_ref, rtol=1e-6)


def test_adamw_matches_torch_semantics():
    """torch.optim.AdamW: p -= lr * (m_hat / (sqrt(v_hat) + eps) + wd * p)."""
    import jax.numpy as jnp
    tx = optim.make("adamw", weight_decay=0.01)
    p = jnp.array([1.0, -2.0])
    state = tx.init(p)
    m = v = np.zeros(2)
    p_ref = np.array([1.0, -2.0])
    for t, g in enumerate(([0.5, 0.5], [1.0, -1.0], [0.0, 2.0]), start=1):
        u, state = tx.update(jnp.array(g), state, p)
        p = p - 0.1 * u
        m = 0.9 * m + 0.1 * np.array(g)
        v = 0.999 * v + 0.001 * np.array(g) ** 2
        p_ref = p_ref - 0.1 * (m / (1 - 0.9**t) / (np.sqrt(v / (1 - 0.999**t)) + 1e-8)
                               + 0.01 * p_ref)
    np.testing.assert_allclose(p, p_ref, rtol=1e-5)
    with pytest.raises(ValueError, match="unknown optimizer"):
        optim.make("lion", 0.0)


def test_reference_lr_equals_torch_trajectory():
    """Every batch's lr equals torch's WarmUpLR + CosineAnnealingLR (tools/make_lr_fixture.py)."""
    import json
    import os
    path = os.path.join(os.path.dirname(__file__), "golden", "reference_lr.json")
    for case in json.load(open(path))["cases"]:
        torch_lrs = case.pop("lrs")
        ours = [optim.reference_lr(k, **case) for k in range(len(torch_lrs))]
        np.testing.assert_allclose(ours, torch_lrs, rtol=1e-8, atol=1e-15)
