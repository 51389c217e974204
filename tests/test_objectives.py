"""Every objective against independent float64 numpy values (SPEC.md 5.1, 6.2, 6.3, Q18).

Expected values come from the small numpy references below or from hand computation, never from
the functions under test: masked means, BCE / cross-entropy task losses, batch mAP (torchmetrics
1.3.0: step AP over distinct scores, ties grouped, labels without positives left out) and top-1
accuracy, the three distances, the (1 - acc)-weighted loss, MetaUnlearn's outer objectives for
every loss type, distance, ``use_accs`` and task (values, and gradients against numpy central
differences with the documented stop-gradients), the retain-step loss, the outer-batch weights,
and the sign and scale of MetaUnlearn's inner step and of support_ascent's step.

Every batch has a padded row (mask False) with extreme logits and labels, so a result that
ignored the mask would be far off.
"""

import functools
import itertools

import doubles
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from sklearn.metrics import average_precision_score

from oneshui_jax import losses, metrics
from oneshui_jax.models import meta_loss, vit
from oneshui_jax.unlearn import api, support_ascent
from oneshui_jax.unlearn.meta_unlearn import core as mu

TASKS = ("multilabel", "classification")

# ---------------------------------------------------------------------------------------------
# Numpy references (float64)


def np_sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def np_bce(x, y):
    """Per-element BCE-with-logits, the numerically stable form."""
    return np.maximum(x, 0.0) - x * y + np.log1p(np.exp(-np.abs(x)))


def np_log_softmax(x):
    z = x - x.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


def np_ce(x, y):
    """Per-row softmax cross-entropy with integer labels."""
    return -np_log_softmax(x)[np.arange(len(y)), y]


def np_task_loss(task, x, y, m):
    """Mean BCE over valid rows x labels, or mean CE over valid rows (0 with no valid row)."""
    x, y = np.asarray(x, np.float64)[m], np.asarray(y)[m]
    if len(x) == 0:
        return 0.0
    return float(np_bce(x, y).mean() if task == "multilabel" else np_ce(x, y).mean())


def np_ap(scores, targets):
    """sklearn-style AP: sum over distinct thresholds (descending) of (R_n - R_{n-1}) P_n."""
    scores, targets = np.asarray(scores, np.float64), np.asarray(targets)
    num_pos = targets.sum()
    if num_pos == 0:
        return np.nan
    ap, prev_recall = 0.0, 0.0
    for thr in sorted(set(scores.tolist()), reverse=True):
        selected = scores >= thr
        tp = targets[selected].sum()
        recall = tp / num_pos
        ap += (recall - prev_recall) * tp / selected.sum()
        prev_recall = recall
    return ap


def np_map(x, y, m):
    """Macro AP over labels with a positive among the valid rows, on sigmoid scores."""
    s, t = np_sigmoid(np.asarray(x, np.float64)[m]), np.asarray(y)[m]
    aps = [np_ap(s[:, c], t[:, c]) for c in range(s.shape[1])]
    aps = [a for a in aps if not np.isnan(a)]
    return float(np.mean(aps)) if aps else np.nan


def np_acc(task, x, y, m):
    """Batch mAP (multi-label) or top-1 accuracy over the valid rows."""
    if task == "multilabel":
        return np_map(x, y, m)
    return float(np.mean(np.argmax(x[m], -1) == y[m]))


def np_dist(kind, a, b):
    d = a - b
    if kind == "smooth_l1":
        return 0.5 * d * d if abs(d) < 1.0 else abs(d) - 0.5
    return abs(d) if kind == "l1" else d * d


def np_weighted(task, x, y, m, use_accs):
    loss = np_task_loss(task, x, y, m)
    return loss * (1.0 - np_acc(task, x, y, m)) if use_accs else loss


def np_kl(s, t, m, temperature=4.0):
    """torch ``F.kl_div(log_softmax(s/T), softmax(t/T))``, 'mean': over valid rows x classes."""
    log_p = np_log_softmax(s[m] / temperature)
    log_q = np_log_softmax(t[m] / temperature)
    return float(np.mean(np.exp(log_q) * (log_q - log_p)))


def np_one_hot(y, c):
    return np.eye(c)[y]


def np_objective(task, loss_type, dist, use_accs, d, *, u_f=None, u_v=None, u_v_target=None):
    """``L_b`` of SPEC.md 6.3 written out; ``u_f`` / ``u_v`` override the fixture's.

    ``u_v_target`` is the u_v used inside D(u_f, u_v), where it is a stop-gradient target:
    passing the base u_v there while perturbing ``u_v`` gives the documented gradient.
    """
    u_f = d["u_f"] if u_f is None else u_f
    u_v = d["u_v"] if u_v is None else u_v
    u_v_target = u_v if u_v_target is None else u_v_target
    m = d["mask"]
    if loss_type == "scrub":
        y_r = d["y_v"] if task == "multilabel" else np_one_hot(d["y_v"], u_f.shape[-1])
        bce = float(np_bce(d["u_r"][m], y_r[m]).mean())
        return (0.99 * bce + 0.001 * 16.0 * np_kl(d["u_r"], d["o_r"], m)
                - 16.0 * np_kl(u_f, d["o_f"], m))

    def weighted(x, y):
        return np_weighted(task, x, y, m, use_accs)

    a_f = weighted(u_f, d["y_f"])
    a_ov = weighted(d["o_v"], d["y_v"])
    out = 0.0
    if loss_type in ("full", "original"):
        out += np_dist(dist, a_f, a_ov)
    if loss_type in ("full", "unlearned", "rev"):
        out += np_dist(dist, a_f, weighted(u_v_target, d["y_v"]))
    if loss_type == "rev":
        out += np_dist(dist, weighted(u_v, d["y_v"]), a_ov)
    return out


def central_difference(f, name, x, eps=1e-5, **fixed):
    """Numpy float64 gradient of the scalar ``f(name=x, **fixed)`` w.r.t. the array ``x``."""
    x = np.asarray(x, np.float64)
    grad = np.zeros_like(x)
    for i in np.ndindex(x.shape):
        step = np.zeros_like(x)
        step[i] = eps
        grad[i] = (f(**{name: x + step}, **fixed) - f(**{name: x - step}, **fixed)) / (2 * eps)
    return grad


# ---------------------------------------------------------------------------------------------
# Hand-made batches: 4 valid rows and a padded row (row 4) with extreme logits and labels.
# "near": every distance of the outer objective is below 1 (some negative), "far": the forget
# terms are above 1. Scores have no near-ties and every acc is strictly inside (0, 1), so the
# numpy central differences see the batch mAP / accuracy as the constants they are meant to be.

MASK = np.array([True, True, True, True, False])
PAD_ML = [30.0, -30.0, 30.0, 30.0]
PAD_CLS = [-30.0, 30.0, 0.0, 0.0]

_RAW = {
    ("multilabel", "near"): dict(
        u_f=[[1.01, 1.06, -0.38, -0.03], [-0.28, 0.53, 0.63, -0.45], [1.28, 0.26, -0.25, -0.60],
             [0.15, -0.93, 0.01, -1.20], PAD_ML],
        # Label 3 has no positive among the valid rows; the padded row's labels are wrong.
        y_f=[[0, 0, 0, 0], [1, 0, 1, 0], [1, 0, 0, 0], [1, 1, 1, 0], [0, 1, 0, 1]],
        u_v=[[-1.99, 1.10, -0.26, -0.73], [-0.77, -2.42, 1.03, 1.58], [-0.10, -0.68, 0.76, -1.10],
             [0.66, -1.92, -1.23, 1.03], PAD_ML],
        o_v=[[0.54, 0.02, -0.43, -1.00], [-0.71, -1.42, -1.01, -0.06], [0.77, -3.44, 0.10, -2.85],
             [-0.51, 0.30, 0.42, 1.23], PAD_ML],
        y_v=[[1, 1, 1, 0], [0, 1, 1, 1], [1, 0, 1, 0], [0, 1, 0, 1], [0, 1, 0, 0]]),
    ("multilabel", "far"): dict(
        u_f=[[-3.61, 1.82, -2.54, 0.37], [1.69, 0.76, -1.02, 1.84], [-2.49, 2.49, 2.08, 2.60],
             [2.26, -2.09, 2.76, 1.55], PAD_ML],
        y_f=[[1, 0, 1, 0], [0, 0, 1, 0], [1, 0, 0, 0], [0, 1, 0, 0], [0, 1, 0, 1]],
        u_v=[[-2.46, -0.89, 1.15, 2.54], [-0.07, 0.91, 0.86, 0.34], [1.53, -1.17, -2.69, 0.18],
             [0.01, -0.77, 1.03, -0.62], PAD_ML],
        o_v=[[0.76, 1.10, -0.70, -0.75], [1.09, 2.24, 1.49, 0.37], [-0.76, 1.07, -1.46, -0.39],
             [-1.58, 0.89, -0.23, -2.39], PAD_ML],
        y_v=[[1, 1, 0, 1], [1, 1, 1, 0], [0, 0, 0, 1], [0, 1, 1, 0], [0, 1, 0, 0]]),
    ("classification", "near"): dict(
        u_f=[[-0.44, 1.31, 1.05, 0.35], [1.20, -0.01, 0.85, -0.12], [-1.37, -1.15, 0.68, -0.88],
             [0.97, 1.59, 1.50, -0.33], PAD_CLS],
        y_f=[1, 2, 2, 1, 0],
        u_v=[[-0.12, -1.20, -2.13, -0.04], [-1.26, 0.81, 0.79, -0.09], [-0.19, 1.30, -0.55, 0.69],
             [-0.93, 0.18, -1.08, 0.20], PAD_CLS],
        o_v=[[-0.82, 1.09, 1.05, -0.85], [0.00, -0.60, -0.76, 0.09], [0.32, 0.46, -0.72, -2.20],
             [-2.22, 0.31, -0.07, -1.17], PAD_CLS],
        y_v=[1, 2, 1, 1, 0]),
    ("classification", "far"): dict(
        u_f=[[2.25, -1.07, 1.79, 1.06], [-1.64, 2.15, 1.54, 2.27], [0.78, 0.54, 0.74, 0.54],
             [-2.11, 2.49, 1.27, 1.06], PAD_CLS],
        y_f=[1, 0, 0, 0, 0],
        u_v=[[-0.36, -0.89, 1.43, 1.63], [-0.39, 1.69, -0.30, -0.14], [1.32, -0.69, -0.24, -0.63],
             [1.79, -0.90, -0.26, 0.75], PAD_CLS],
        o_v=[[-2.73, -2.44, 0.98, 0.29], [0.04, 1.19, -1.33, -0.64], [-0.35, 1.60, -0.88, 0.20],
             [-0.20, -0.48, -1.33, 1.57], PAD_CLS],
        y_v=[3, 1, 1, 3, 0]),
}


def batch(task, regime):
    """A fixture as float64 numpy arrays holding exactly the float32 values jax receives.

    Scrub reuses the val batch as its retain batch; ``o_f`` is the original model on the forget
    images (its padded row the opposite of u_f's, so an unmasked KL would explode).
    """
    raw = _RAW[task, regime]
    d = {k: np.asarray(np.asarray(v, np.float32), np.float64) if k[0] in "uo"
         else np.asarray(v, np.int32) for k, v in raw.items()}
    o_f = np.roll(d["o_v"], 1, axis=1)
    o_f[4] = -d["u_f"][4]
    d.update(mask=MASK, u_r=d["u_v"], o_r=d["o_v"], y_r=d["y_v"], o_f=o_f)
    return d


def jx(x):
    """The fixture array as jax receives it (float32 logits, int32 labels, bool mask)."""
    x = np.asarray(x)
    return jnp.asarray(x.astype(np.float32) if x.dtype.kind == "f" else x)


def call_objective(task, loss_type, dist, use_accs, d, u_f=None, u_v=None, o_v=None):
    return losses.forget_objective(
        task, loss_type, dist, use_accs,
        u_f=jx(d["u_f"]) if u_f is None else u_f, y_f=jx(d["y_f"]), m_f=jx(d["mask"]),
        u_v=jx(d["u_v"]) if u_v is None else u_v, o_v=jx(d["o_v"]) if o_v is None else o_v,
        y_v=jx(d["y_v"]), m_v=jx(d["mask"]), u_r=jx(d["u_r"]), o_r=jx(d["o_r"]),
        y_r=jx(d["y_r"]), m_r=jx(d["mask"]), o_f=jx(d["o_f"]))


def unmasked(d):
    """The same batch with the padded row counted (to check a test can see the mask)."""
    return {**d, "mask": np.ones_like(d["mask"])}


@pytest.mark.parametrize("task", TASKS)
def test_fixtures_exercise_what_the_tests_rely_on(task):
    """Accs strictly in (0, 1); smooth_l1 on both sides of 1 and negative differences."""
    below, above, negative = 0, 0, 0
    for regime, use_accs in itertools.product(("near", "far"), (True, False)):
        d = batch(task, regime)
        for x, y in ((d["u_f"], d["y_f"]), (d["u_v"], d["y_v"]), (d["o_v"], d["y_v"])):
            assert 0.05 < np_acc(task, x, y, MASK) < 0.95
            assert np_acc(task, x, y, MASK) != pytest.approx(np_acc(task, x, y, np.ones(5, bool)))
        a_f, a_uv, a_ov = (np_weighted(task, d[x], d[y], MASK, use_accs)
                           for x, y in (("u_f", "y_f"), ("u_v", "y_v"), ("o_v", "y_v")))
        diffs = np.array([a_f - a_ov, a_f - a_uv, a_uv - a_ov])
        assert np.all(np.abs(np.abs(diffs) - 1.0) > 0.05) and np.all(np.abs(diffs) > 0.05)
        below += np.sum(np.abs(diffs) < 1)
        above += np.sum(np.abs(diffs) > 1)
        negative += np.sum(diffs < 0)
    assert below and above and negative


# ---------------------------------------------------------------------------------------------
# Task losses


def test_masked_mean_by_hand():
    """[B] and [B, C] values: the mean over the valid rows (x C); nothing valid gives 0."""
    values = jnp.array([1.0, 2.0, 3.0, 100.0])
    mask = jnp.array([True, False, True, False])
    assert float(losses.masked_mean(values, mask)) == pytest.approx(2.0)
    values2 = jnp.array([[1.0, 2.0], [3.0, 4.0], [50.0, 60.0]])
    assert float(losses.masked_mean(values2, jnp.array([True, True, False]))) == pytest.approx(
        2.5)
    assert float(losses.masked_mean(values2, jnp.array([False, True, True]))) == pytest.approx(
        117.0 / 4)
    empty = losses.masked_mean(values2, jnp.zeros(3, bool))
    assert float(empty) == 0.0


@pytest.mark.parametrize("task", TASKS)
def test_per_example_loss(task):
    """BCE averaged over labels, or CE, per row (padded rows included: no mask here)."""
    d = batch(task, "near")
    got = np.asarray(losses.per_example_loss(task, jx(d["u_f"]), jx(d["y_f"])))
    if task == "multilabel":
        want = np_bce(d["u_f"], d["y_f"]).mean(-1)
    else:
        want = np_ce(d["u_f"], d["y_f"])
    assert want[4] > 20  # the padded row's labels are wrong and confident
    np.testing.assert_allclose(got, want, rtol=1e-5)


@pytest.mark.parametrize("regime", ["near", "far"])
@pytest.mark.parametrize("task", TASKS)
def test_task_loss(task, regime):
    """Mean over valid rows (x labels); the padded row would change it by a lot."""
    d = batch(task, regime)
    for x, y in (("u_f", "y_f"), ("o_v", "y_v")):
        want = np_task_loss(task, d[x], d[y], MASK)
        got = float(losses.task_loss(task, jx(d[x]), jx(d[y]), jx(MASK)))
        assert got == pytest.approx(want, rel=1e-5)
        assert np_task_loss(task, d[x], d[y], np.ones(5, bool)) > want + 3.0


# ---------------------------------------------------------------------------------------------
# Batch mAP / accuracy and metrics.py

# Column 0: a positive and a negative tied at the top; column 1: no positive among the valid
# rows (the padded row's); column 2: three tied scores. Padded row: top scores, wrong labels.
MAP_LOGITS = np.array([[2.0, 0.1, 0.3], [2.0, -0.4, 0.3], [0.5, 0.7, 0.3], [-1.0, 1.2, -0.2],
                       [5.0, 5.0, 5.0]], np.float32)
MAP_LABELS = np.array([[1, 0, 0], [0, 0, 1], [0, 0, 1], [1, 0, 0], [0, 1, 0]], np.int32)


def test_batch_map_by_hand_with_ties_padding_and_labels_without_positives():
    """Column 0: P=1/2 at R=1/2 then 2/4 at R=1, AP 1/2; column 2: AP 2/3; column 1 skipped."""
    want = (0.5 + 2.0 / 3.0) / 2.0
    assert np_map(MAP_LOGITS, MAP_LABELS, MASK) == pytest.approx(want, abs=1e-12)
    got = float(losses.batch_map(jnp.asarray(MAP_LOGITS), jnp.asarray(MAP_LABELS),
                                 jnp.asarray(MASK)))
    assert got == pytest.approx(want, abs=1e-6)
    assert float(losses.batch_accuracy("multilabel", jnp.asarray(MAP_LOGITS),
                                       jnp.asarray(MAP_LABELS), jnp.asarray(MASK))) == (
        pytest.approx(want, abs=1e-6))
    assert abs(np_map(MAP_LOGITS, MAP_LABELS, np.ones(5, bool)) - want) > 0.03


@pytest.mark.parametrize("regime", ["near", "far"])
@pytest.mark.parametrize("task", TASKS)
def test_batch_accuracy_on_fixtures(task, regime):
    """mAP / top-1 accuracy of every fixture batch, valid rows only."""
    d = batch(task, regime)
    for x, y in (("u_f", "y_f"), ("u_v", "y_v"), ("o_v", "y_v")):
        got = float(losses.batch_accuracy(task, jx(d[x]), jx(d[y]), jx(MASK)))
        assert got == pytest.approx(np_acc(task, d[x], d[y], MASK), abs=1e-6)


def test_classification_accuracy_by_hand():
    """2 of the 3 valid rows are right; the padded row is right too (3/4 if counted)."""
    logits = jnp.array([[0.1, 0.9, 0.0], [0.8, 0.2, 0.0], [0.3, 0.1, 0.7], [0.0, 0.0, 9.0]])
    labels = jnp.array([1, 1, 2, 2])
    mask = jnp.array([True, True, True, False])
    got = float(losses.batch_accuracy("classification", logits, labels, mask))
    assert got == pytest.approx(2.0 / 3.0)


def test_numpy_ap_reference_agrees_with_sklearn():
    """The reference used throughout this file is sklearn's step AP, ties included."""
    rng = np.random.default_rng(0)
    for _ in range(10):
        scores = rng.integers(0, 4, 12) / 3.0
        targets = rng.integers(0, 2, 12)
        if targets.any():
            assert np_ap(scores, targets) == pytest.approx(
                average_precision_score(targets, scores), abs=1e-12)


def test_metrics_average_precision_and_map():
    """metrics.py against the numpy AP: ties, a label without positives (skipped), all-NaN."""
    rng = np.random.default_rng(1)
    logits = rng.integers(-2, 3, (9, 4)).astype(np.float64)  # heavy ties
    targets = rng.integers(0, 2, (9, 4))
    targets[:, 2] = 0
    targets[0, [0, 1, 3]] = 1
    for c in (0, 1, 3):
        assert metrics.average_precision(logits[:, c], targets[:, c]) == pytest.approx(
            np_ap(logits[:, c], targets[:, c]), abs=1e-12)
    assert np.isnan(metrics.average_precision(logits[:, 2], targets[:, 2]))
    want = np.mean([np_ap(np_sigmoid(logits[:, c]), targets[:, c]) for c in (0, 1, 3)]) * 100
    assert metrics.mean_average_precision(logits, targets) == pytest.approx(want, abs=1e-9)
    by_hand = metrics.mean_average_precision(MAP_LOGITS[:4], MAP_LABELS[:4])
    assert by_hand == pytest.approx((0.5 + 2.0 / 3.0) / 2.0 * 100, abs=1e-9)
    assert np.isnan(metrics.mean_average_precision(logits, np.zeros_like(targets)))


# ---------------------------------------------------------------------------------------------
# Distances and the weighted loss


@pytest.mark.parametrize("d", [0.25, -0.6, 1.5, -2.5])
@pytest.mark.parametrize("kind", losses.DISTANCES)
def test_distance(kind, d):
    """smooth_l1: d²/2 below 1 in magnitude, |d| - 1/2 above; l1 |d|; l2 d²."""
    want = {"smooth_l1": 0.5 * d * d if abs(d) < 1 else abs(d) - 0.5,
            "l1": abs(d), "l2": d * d}[kind]
    got = float(losses.distance(kind, jnp.float32(0.7 + d), jnp.float32(0.7)))
    assert got == pytest.approx(want, rel=1e-5)
    grad = float(jax.grad(losses.distance, argnums=1)(kind, jnp.float32(0.7 + d),
                                                       jnp.float32(0.7)))
    want_grad = {"smooth_l1": d if abs(d) < 1 else np.sign(d), "l1": np.sign(d),
                 "l2": 2 * d}[kind]
    assert grad == pytest.approx(want_grad, rel=1e-4)


def np_task_loss_grad(task, x, y, m):
    """Analytic gradient of the masked mean task loss w.r.t. the logits."""
    w = m[:, None] / m.sum()
    if task == "multilabel":
        return (np_sigmoid(x) - y) * w / x.shape[1]
    return (np.exp(np_log_softmax(x)) - np_one_hot(y, x.shape[1])) * w


@pytest.mark.parametrize("use_accs", [True, False])
@pytest.mark.parametrize("regime", ["near", "far"])
@pytest.mark.parametrize("task", TASKS)
def test_weighted_loss_value_and_gradient(task, regime, use_accs):
    """``task_loss * (1 - acc)``, and its gradient ``(1 - acc) ∇task_loss`` (acc constant)."""
    d = batch(task, regime)
    x, y = d["u_f"], d["y_f"]
    scale = 1.0 - np_acc(task, x, y, MASK) if use_accs else 1.0
    want = np_task_loss(task, x, y, MASK) * scale
    got = float(losses.weighted_loss(task, jx(x), jx(y), jx(MASK), use_accs))
    assert got == pytest.approx(want, rel=1e-5)
    grad = np.asarray(jax.grad(losses.weighted_loss, argnums=1)(task, jx(x), jx(y), jx(MASK),
                                                                use_accs))
    want_grad = scale * np_task_loss_grad(task, x, y, MASK)
    np.testing.assert_allclose(grad, want_grad, rtol=1e-4, atol=1e-7)
    assert not grad[4].any()  # the padded row gets no gradient


# ---------------------------------------------------------------------------------------------
# MetaUnlearn's outer objectives

OBJECTIVE_CASES = list(itertools.product(TASKS, losses.LOSS_TYPES, losses.DISTANCES,
                                         (True, False)))


@pytest.mark.parametrize("task,loss_type,dist,use_accs", OBJECTIVE_CASES)
def test_forget_objective_value(task, loss_type, dist, use_accs):
    """``L_b`` against the numpy composition of the module docstring's formulas."""
    for regime in ("near", "far"):
        d = batch(task, regime)
        want = np_objective(task, loss_type, dist, use_accs, d)
        got = float(call_objective(task, loss_type, dist, use_accs, d))
        assert got == pytest.approx(want, rel=2e-5, abs=1e-6), regime
        assert np_objective(task, loss_type, dist, use_accs, unmasked(d)) != pytest.approx(
            want, rel=0.05)


def _objective_grads(task, loss_type, dist, use_accs, d):
    def f(u_f, u_v, o_v):
        return call_objective(task, loss_type, dist, use_accs, d, u_f=u_f, u_v=u_v, o_v=o_v)

    return [np.asarray(g) for g in jax.grad(f, argnums=(0, 1, 2))(
        jx(d["u_f"]), jx(d["u_v"]), jx(d["o_v"]))]


def _assert_close_grad(got, want):
    """float32 jax vs float64 central differences; returns the gradient's scale."""
    scale = np.abs(want).max()
    np.testing.assert_allclose(got, want, rtol=2e-3, atol=2e-4 * max(scale, 1e-2))
    return scale


@pytest.mark.parametrize("task,loss_type,dist,use_accs", OBJECTIVE_CASES)
def test_forget_objective_gradients(task, loss_type, dist, use_accs):
    """u_f: numpy central differences; o_v: zero; u_v: zero except rev (its own-term only)."""
    scales = []
    for regime in ("near", "far"):
        d = batch(task, regime)
        g_uf, g_uv, g_ov = _objective_grads(task, loss_type, dist, use_accs, d)
        objective = functools.partial(np_objective, task, loss_type, dist, use_accs, d)
        want_uf = central_difference(objective, "u_f", d["u_f"])
        scales.append(_assert_close_grad(g_uf, want_uf))
        assert not g_ov.any()
        if loss_type != "rev":
            assert not g_uv.any()
            continue
        # D(u_f, u_v): u_v a stop-gradient target; D(u_v, o_v): u_v keeps its gradient.
        want_uv = central_difference(objective, "u_v", d["u_v"], u_v_target=d["u_v"])
        assert _assert_close_grad(g_uv, want_uv) > 1e-4
        no_stop = central_difference(objective, "u_v", d["u_v"])
        assert np.abs(no_stop - want_uv).max() > 0.05 * np.abs(want_uv).max()
    assert max(scales) > 1e-3  # (l1 "full" can cancel exactly in one regime)


def test_scrub_objective_uses_bce_and_kl_mean():
    """Scrub by hand on one classification batch: BCE on one-hot labels (Q18), torch KL 'mean'."""
    d = batch("classification", "near")
    m = MASK
    y_hot = np_one_hot(d["y_v"], 4)
    bce = np.mean(np_bce(d["u_r"][m], y_hot[m]))
    q_r = np.exp(np_log_softmax(d["o_r"][m] / 4))
    kl_r = np.mean(q_r * (np.log(q_r) - np_log_softmax(d["u_r"][m] / 4)))
    q_f = np.exp(np_log_softmax(d["o_f"][m] / 4))
    kl_f = np.mean(q_f * (np.log(q_f) - np_log_softmax(d["u_f"][m] / 4)))
    want = 0.99 * bce + 0.016 * kl_r - 16 * kl_f
    got = float(call_objective("classification", "scrub", "smooth_l1", True, d))
    assert got == pytest.approx(want, rel=2e-5)
    ce = np.mean(np_ce(d["u_r"][m], d["y_v"][m]))
    assert abs(0.99 * (ce - bce)) > 1e-2  # CE instead of BCE would be seen
    kl_swapped = np.mean(np.exp(np_log_softmax(d["u_f"][m] / 4)) * (
        np_log_softmax(d["u_f"][m] / 4) - np_log_softmax(d["o_f"][m] / 4)))
    assert abs(16 * (kl_swapped - kl_f)) > 1e-3  # the KL direction would be seen


# ---------------------------------------------------------------------------------------------
# MetaUnlearn and support_ascent on a tiny ViT

MODEL_CFG = vit.ViTConfig(image_size=16, patch_size=8, width=16, depth=1, num_heads=2,
                          num_classes=4)


# Jitted once per config: compiling beats eager dispatch of a ViT on 2 cores.
APPLY = jax.jit(vit.apply, static_argnums=0)
SUPPORT_LOSS = jax.jit(mu.support_loss, static_argnums=(0, 1))
RETAIN_BATCH_LOSS = jax.jit(mu.retain_batch_loss, static_argnums=(0, 1))
INNER_STEP = jax.jit(mu.inner_step, static_argnums=(0, 1, 2))


def _images(rng, n):
    return jnp.asarray(rng.uniform(-1, 1, (n, 16, 16, 3)), jnp.float32)


def _labels(task, rng, n):
    if task == "multilabel":
        return jnp.asarray(rng.integers(0, 2, (n, 4)), jnp.int32)
    return jnp.asarray(rng.integers(0, 4, n), jnp.int32)


@pytest.mark.parametrize("task", TASKS)
def test_retain_batch_loss_is_the_task_loss(task):
    """The retain step's loss is BCE (multi-label) or CE (classification, not BCE: Q18)."""
    model_cfg = MODEL_CFG
    theta = doubles.random_params(vit.init_params, model_cfg, 0)
    theta_u = doubles.random_params(vit.init_params, model_cfg, 1)
    rng = np.random.default_rng(0)
    retain = {"image": _images(rng, 4), "label": _labels(task, rng, 4),
              "mask": jnp.array([True, True, True, False])}
    retain["image"] = retain["image"].at[3].set(40.0)  # padded: far outside [-1, 1]
    cfg = mu.Config(task=task, compute_dtype="float32")
    got = float(RETAIN_BATCH_LOSS(model_cfg, cfg, theta_u, theta, None, None, retain))
    logits = np.asarray(APPLY(model_cfg, theta_u, retain["image"])[0], np.float64)
    labels, mask = np.asarray(retain["label"]), np.asarray(retain["mask"])
    want = np_task_loss(task, logits, labels, mask)
    assert got == pytest.approx(want, rel=1e-5)
    assert abs(np_task_loss(task, logits, labels, np.ones(4, bool)) - want) > 1e-4
    if task == "classification":
        bce = np.mean(np_bce(logits[mask], np_one_hot(labels[mask], 4)))
        assert abs(bce - want) > 1e-2


def test_outer_batch_weights():
    """``n_b / Σ n_b`` over stacked batches; an all-padded batch weighs 0 (also on its own)."""
    mask = jnp.array([[True, True, True], [True, False, False], [False, False, False]])
    np.testing.assert_allclose(mu._weights({"mask": mask}), [0.75, 0.25, 0.0], rtol=1e-6)
    mask2 = jnp.array([[True, False, True, True], [True, True, True, True]])
    np.testing.assert_allclose(mu._weights({"mask": mask2}), [3 / 7, 4 / 7], rtol=1e-6)
    np.testing.assert_array_equal(mu._weights({"mask": jnp.zeros((2, 3), bool)}), [0.0, 0.0])


def _flat(tree):
    return np.concatenate([np.ravel(np.asarray(x, np.float64)) for x in jax.tree.leaves(tree)])


def _along(tree, direction, eps):
    leaves, treedef = jax.tree.flatten(tree)
    out, i = [], 0
    for leaf in leaves:
        n = leaf.size
        out.append(leaf + jnp.asarray(eps * direction[i:i + n].reshape(leaf.shape), leaf.dtype))
        i += n
    return jax.tree.unflatten(treedef, out)


def test_inner_step_descends_the_learned_loss_by_meta_lr_times_its_gradient():
    """d = (θ_u − θ)/η: the support loss's slope along d is −‖d‖² and a small step lowers it."""
    ml_cfg = meta_loss.MetaLossConfig.for_vit(MODEL_CFG, num_identities=6, task="multilabel",
                                              hidden_size=16)
    theta = doubles.random_params(vit.init_params, MODEL_CFG, 2)
    phi = doubles.random_params(meta_loss.init_params, ml_cfg, 3)
    rng = np.random.default_rng(0)
    support = {"image": _images(rng, 3), "label": _labels("multilabel", rng, 3),
               "row": jnp.array([0, 3, 5]), "mask": jnp.array([True, True, False])}
    meta_lr = 0.5
    theta_u = INNER_STEP(MODEL_CFG, ml_cfg, meta_lr, theta, phi, support, None)
    d = (_flat(theta_u) - _flat(theta)) / meta_lr
    norm2 = float(d @ d)
    assert norm2 > 0
    loss = SUPPORT_LOSS
    base = float(loss(MODEL_CFG, ml_cfg, theta, phi, support, None))
    eps = 2e-3 / np.sqrt(norm2)
    plus = float(loss(MODEL_CFG, ml_cfg, _along(theta, d, eps), phi, support, None))
    minus = float(loss(MODEL_CFG, ml_cfg, _along(theta, d, -eps), phi, support, None))
    slope = (plus - minus) / (2 * eps)
    assert slope == pytest.approx(-norm2, rel=0.01)
    assert plus < base < minus
    # The padded support row does not take part: changing its image changes nothing.
    other = {**support, "image": support["image"].at[2].set(5.0)}
    assert float(loss(MODEL_CFG, ml_cfg, theta, phi, other, None)) == pytest.approx(base,
                                                                                     rel=1e-6)


@pytest.mark.parametrize("task", TASKS)
def test_support_ascent_step_ascends_the_portraits_task_loss(task):
    """d = (θ' − θ)/α: the numpy task loss's slope along d is +‖d‖², and the step raises it."""
    theta = doubles.random_params(vit.init_params, MODEL_CFG, 4)
    rng = np.random.default_rng(1)
    images, labels = _images(rng, 3), _labels(task, rng, 3)
    model = api.Model(vit=MODEL_CFG, task=task)
    request = api.Request(images=images, labels=labels, identities=(None, None, None))
    alpha = 0.05
    new, info = support_ascent.unlearn(model, theta, {"alpha": np.float32(alpha)}, request,
                                       support_ascent.Config(task=task), None)
    assert info["alpha"] == pytest.approx(alpha)
    d = (_flat(new) - _flat(theta)) / alpha
    norm2 = float(d @ d)
    assert norm2 > 0
    mask = np.ones(3, bool)

    def task_loss(params):
        logits = np.asarray(APPLY(MODEL_CFG, params, images)[0], np.float64)
        return np_task_loss(task, logits, np.asarray(labels), mask)

    eps = 2e-3 / np.sqrt(norm2)
    slope = (task_loss(_along(theta, d, eps)) - task_loss(_along(theta, d, -eps))) / (2 * eps)
    assert slope == pytest.approx(norm2, rel=0.01)
    assert task_loss(_along(theta, d, 0.2 * alpha)) > task_loss(theta)
