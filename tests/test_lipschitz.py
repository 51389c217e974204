"""Lipschitz / JiT (``unlearn/lipschitz.py``, SPEC.md 7.4 and Q21) on a tiny ViT.

Expected values come from this file's own formula: the noise is the method's (``lipschitz.noise``,
its documented contract), everything else (the clamp to the batch min / max, the perturbed logits,
the ratio sums, the gradient, the SGD steps, the batching) is recomputed here from ``vit.apply``.
"""


import doubles
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from oneshui_jax.errors import ConfigError, TrainingDiverged
from oneshui_jax.models import vit
from oneshui_jax.unlearn import api, lipschitz

MODEL_CFG = vit.ViTConfig(image_size=16, patch_size=8, width=16, depth=1, num_heads=2,
                          num_classes=4)
MODEL = api.Model(vit=MODEL_CFG, task="multilabel")
APPLY = jax.jit(vit.apply, static_argnums=0)
SIGMA, N_SAMPLES, LR = 30.0, 3, 0.5


def random_params(seed):
    return doubles.random_params(vit.init_params, MODEL_CFG, seed)


def images(seed, n):
    """Portraits in [0.2, 0.9]: the batch min / max are not the [-1, 1] bounds of the range."""
    return np.random.default_rng(seed).uniform(0.2, 0.9, (n, 16, 16, 3)).astype(np.float32)


def request(x):
    n = x.shape[0]
    return api.Request(images=jnp.asarray(x), labels=jnp.zeros((n, 4), jnp.int32),
                       identities=tuple(range(n)))


def flat(tree):
    return np.concatenate([np.ravel(np.asarray(v, np.float64)) for v in jax.tree.leaves(tree)])


# ---------------------------------------------------------------------------------------------
# The reference's computation, written out


def perturbed(x, rng, batch, sigma=SIGMA, n_samples=N_SAMPLES, bounds=None):
    """x̃_s = clip(x + σ ε_s, min(x), max(x)) for s < n_samples (numpy, the batch's own rows)."""
    lo, hi = bounds or (x.min(), x.max())
    return [np.clip(x.astype(np.float64)
                    + sigma * np.asarray(lipschitz.noise(rng, batch, s, x.shape[0], x.shape[1:]),
                                         np.float64), lo, hi).astype(np.float32)
            for s in range(n_samples)]


def np_loss(params, x, noisy):
    """mean_s |Σ_b ‖out_b − out2_{s,b}‖ / ‖x_b − x̃_{s,b}‖| in float64."""
    out = np.asarray(APPLY(MODEL_CFG, params, x)[0], np.float64)
    ks = []
    for xt in noisy:
        out2 = np.asarray(APPLY(MODEL_CFG, params, xt)[0], np.float64)
        num = np.linalg.norm(out - out2, axis=1)
        den = np.linalg.norm((x.astype(np.float64) - xt).reshape(x.shape[0], -1), axis=1)
        ks.append(abs(np.sum(num / den)))
    return float(np.mean(ks))


@jax.jit
def _grad(params, x, out2, den):
    """∇_θ mean_s |Σ_b ‖f_θ(x)_b − out2_{s,b}‖ / den_{s,b}| (out2 [S, B, C], den [S, B])."""

    def loss(p):
        out = vit.apply(MODEL_CFG, p, x)[0]
        return jnp.mean(jnp.abs(jnp.sum(jnp.linalg.norm(out[None] - out2, axis=2) / den,
                                        axis=1)))

    return jax.grad(loss)(params)


def ref_grad(params, x, noisy):
    """∇_θ of the same loss, with the perturbed logits held fixed (torch's no_grad)."""
    out2 = np.stack([np.asarray(APPLY(MODEL_CFG, params, xt)[0]) for xt in noisy])
    den = np.stack([np.linalg.norm((x - xt).reshape(x.shape[0], -1), axis=1) for xt in noisy])
    return _grad(params, jnp.asarray(x), jnp.asarray(out2), jnp.asarray(den))


def reference_run(params, x, rng, batch_size, zero_grad):
    """torch's loop: unpadded batches in order, SGD(lr), p.grad summed unless zeroed."""
    grad_sum = None
    losses = []
    for k, start in enumerate(range(0, x.shape[0], batch_size)):
        xb = x[start:start + batch_size]
        noisy = perturbed(xb, rng, k)
        losses.append(np_loss(params, xb, noisy))
        g = ref_grad(params, xb, noisy)
        grad_sum = g if zero_grad or grad_sum is None else jax.tree.map(jnp.add, grad_sum, g)
        params = jax.tree.map(lambda p, gs: p - LR * gs, params, grad_sum)
    return params, losses


def close(got, want, theta, rtol=2e-3):
    """The updates θ' − θ agree to ``rtol`` of their size."""
    d_got, d_want = flat(got) - flat(theta), flat(want) - flat(theta)
    assert np.linalg.norm(d_want) > 0
    return np.linalg.norm(d_got - d_want) <= rtol * np.linalg.norm(d_want)


def cfg(**kw):
    return lipschitz.Config(**{"lr": LR, "weighting": SIGMA, "n_samples": N_SAMPLES, **kw})


# ---------------------------------------------------------------------------------------------
# Tests


@pytest.fixture(scope="module")
def one_batch():
    theta, x, rng = random_params(0), images(1, 2), jax.random.key(7)
    new, info = lipschitz.unlearn(MODEL, theta, {}, request(x), cfg(), rng)
    return theta, x, rng, new, info


def test_loss_is_the_lipschitz_ratio_sum_on_clamped_noise(one_batch):
    """Loss = mean_s |Σ_b ‖out − out2_s‖ / ‖x − x̃_s‖| with x̃ clamped to the batch min / max."""
    theta, x, rng, _, info = one_batch
    assert info["batches"] == 1 and len(info["loss"]) == 1
    want = np_loss(theta, x, perturbed(x, rng, 0))
    assert info["loss"][0] == pytest.approx(want, rel=1e-4)
    # The test can tell the clamp apart: [-1, 1] bounds or none give another loss.
    for bounds in ((-1.0, 1.0), (-np.inf, np.inf)):
        assert abs(np_loss(theta, x, perturbed(x, rng, 0, bounds=bounds)) - want) > 1e-3 * want
    # And another noise draw another loss (the rng is used).
    assert abs(np_loss(theta, x, perturbed(x, rng, 1)) - want) > 1e-4 * want


def test_loss_with_a_small_sigma_where_the_clamp_is_partial():
    """σ = 0.3: some pixels clamp, most do not; the loss still matches the formula."""
    theta, x, rng = random_params(3), images(4, 2), jax.random.key(11)
    _, info = lipschitz.unlearn(MODEL, theta, {}, request(x), cfg(weighting=0.3, lr=0.0), rng)
    want = np_loss(theta, x, perturbed(x, rng, 0, sigma=0.3))
    assert info["loss"][0] == pytest.approx(want, rel=1e-4)
    clipped = [np.mean((xt == x.min()) | (xt == x.max())) for xt in perturbed(x, rng, 0, 0.3)]
    assert 0.05 < np.mean(clipped) < 0.95


def test_one_batch_update_is_plain_sgd(one_batch):
    """θ' = θ − lr ∇loss (no momentum, no weight decay), out2 without gradient."""
    theta, x, rng, new, _ = one_batch
    g = ref_grad(theta, x, perturbed(x, rng, 0))
    want = jax.tree.map(lambda p, gi: p - LR * gi, theta, g)
    assert close(new, want, theta)
    assert not close(new, jax.tree.map(lambda p, gi: p + LR * gi, theta, g), theta)


def test_gradients_accumulate_across_batches_unless_zeroed():
    """Q21: after batch 2 the faithful step uses g1 + g2, the fix g2 alone; one batch: equal."""
    theta, x, rng = random_params(5), images(6, 4), jax.random.key(3)
    faithful, info_a = lipschitz.unlearn(MODEL, theta, {}, request(x), cfg(batch_size=2), rng)
    fixed, info_f = lipschitz.unlearn(MODEL, theta, {}, request(x),
                                      cfg(batch_size=2, zero_grad_between_batches=True), rng)
    want_a, losses = reference_run(theta, x, rng, 2, zero_grad=False)
    want_f, _ = reference_run(theta, x, rng, 2, zero_grad=True)
    assert close(faithful, want_a, theta) and close(fixed, want_f, theta)
    assert not close(faithful, fixed, theta, rtol=0.05)
    assert info_a["batches"] == 2 and not info_a["zero_grad_between_batches"]
    np.testing.assert_allclose(info_a["loss"], losses, rtol=1e-4)
    assert info_f["loss"][0] == pytest.approx(info_a["loss"][0], rel=1e-6)
    # Deterministic given rng.
    again, _ = lipschitz.unlearn(MODEL, theta, {}, request(x), cfg(batch_size=2), rng)
    np.testing.assert_array_equal(flat(again), flat(faithful))
    # One batch: the two options are the same step.
    one_a, _ = lipschitz.unlearn(MODEL, theta, {}, request(x[:2]), cfg(batch_size=2), rng)
    one_f, _ = lipschitz.unlearn(MODEL, theta, {}, request(x[:2]),
                                 cfg(batch_size=2, zero_grad_between_batches=True), rng)
    np.testing.assert_allclose(flat(one_a), flat(one_f), rtol=0, atol=1e-7)
    assert np.any(flat(one_a) != flat(theta))


@pytest.mark.slow
def test_padded_rows_change_nothing():
    """N = 3 in batches of 2 runs as torch's unpadded [2, 1]; padding is in no min, max or sum."""
    theta, x, rng = random_params(8), images(9, 3), jax.random.key(5)
    assert [int(b["mask"].sum()) for b in api.request_batches(request(x), 2)] == [2, 1]
    new, info = lipschitz.unlearn(MODEL, theta, {}, request(x), cfg(batch_size=2), rng)
    want, losses = reference_run(theta, x, rng, 2, zero_grad=False)
    np.testing.assert_allclose(info["loss"], losses, rtol=1e-4)
    assert close(new, want, theta)
    # The compiled batch step: two valid rows, then the same rows and two far-out padded rows.
    step = lipschitz.compiled_step(MODEL, N_SAMPLES)
    xb, zeros = jnp.asarray(x[:2]), jax.tree.map(jnp.zeros_like, theta)
    args = (rng, jnp.uint32(0), jnp.float32(SIGMA), jnp.float32(LR), jnp.asarray(False))
    new, _, loss = step(theta, zeros, xb, jnp.ones(2, bool), *args)
    padded = jnp.concatenate([xb, jnp.full((1, 16, 16, 3), 50.0), jnp.full((1, 16, 16, 3), -50.0)])
    mask = jnp.array([True, True, False, False])
    new_p, grads_p, loss_p = step(theta, zeros, padded, mask, *args)
    assert float(loss_p) == pytest.approx(float(loss), rel=1e-6)
    assert np.all(np.isfinite(flat(grads_p)))
    assert close(new_p, new, theta, rtol=1e-5)


def test_config_reference_values_validation_and_interface():
    api.check_method("lipschitz", lipschitz)
    assert lipschitz.ACCESS == api.SUPPORT and not hasattr(lipschitz, "prepare")
    for dataset, n in (("celebahq", 20), ("mufac", 5), ("celeba", 200)):
        block, h = api.reference_block(lipschitz, "lipschitz", dataset, n)
        assert h is not None
        assert (block.batch_size, block.lr, block.weighting, block.n_samples) == (128, 0.01,
                                                                                  30.0, 25)
        assert block.zero_grad_between_batches is False and block.compute_dtype == "float32"
    c = api.make_config("lipschitz", lipschitz, block, task="classification")
    assert (c.task, c.weighting, c.n_samples, c.lr) == ("classification", 30.0, 25, 0.01)
    assert api.config_from_record("lipschitz", lipschitz, api.config_record(c)) == c
    bad = {"weighting": 0.0, "n_samples": 0, "batch_size": 0, "lr": -0.1, "compute_dtype": "fp8"}
    for field, value in bad.items():
        with pytest.raises(ConfigError, match=f"config\\.lipschitz\\.{field}"):
            api.make_config("lipschitz", lipschitz, {field: value}, task="multilabel")
    for field, value in (("lr", float("nan")), ("weighting", float("inf"))):
        with pytest.raises(ConfigError, match=f"config\\.lipschitz\\.{field}"):
            lipschitz.Config(**{field: value})
    with pytest.raises(ConfigError, match="zero_grad_between_batches"):
        api.make_config("lipschitz", lipschitz, {"zero_grad_between_batches": "yes"})
    with pytest.raises(ConfigError, match="unknown settings 'sigma'"):
        api.make_config("lipschitz", lipschitz, {"sigma": 1.0})


def test_a_loss_that_becomes_nan_stops_the_request():
    """A portrait of NaN pixels in the second batch: its loss is NaN and the request stops with
    one TrainingDiverged naming the batch (a huge step does not do it here: the ratio of a
    saturated model goes to 0)."""
    theta, x = random_params(0), images(3, 4)
    x[2:] = np.nan
    with pytest.raises(TrainingDiverged, match=(
            r"^lipschitz: the loss became nan in batch 1 of the request; training stopped and "
            r"nothing of the method's run was kept .* Lower config\.lipschitz\.lr \(0\.1\) or "
            r"check the portraits")):
        lipschitz.unlearn(MODEL, theta, {}, request(x), cfg(batch_size=2, lr=0.1),
                          jax.random.key(7))
