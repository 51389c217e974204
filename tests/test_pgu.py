"""PGU (``unlearn/pgu.py``, SPEC.md 7.5) and the layer-input capture of ``vit.apply``.

Expected values come from numpy (a one-block ViT forward, window unfolding by loops, the
losses, an SVD) or from hand computations, on a tiny model.
"""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from oneshui_jax import hparams
from oneshui_jax.data import pipeline
from oneshui_jax.errors import ConfigError, TrainingDiverged
from oneshui_jax.models import vit
from oneshui_jax.models.tree import get_path
from oneshui_jax.unlearn import api, pgu

CFG = vit.ViTConfig(image_size=16, patch_size=8, width=16, depth=1, num_heads=2, num_classes=4)
LAYERS = ("patch_embed.proj", "blocks.0.attn.qkv", "blocks.0.attn.proj", "blocks.0.mlp.fc1",
          "blocks.0.mlp.fc2", "head")


@functools.cache
def perturbed_params(seed=0):
    """Fresh params plus N(0, 0.1) noise on every leaf (no zero bias, no unit scale)."""

    @jax.jit
    def make(key):
        params = vit.init_params(CFG, key)
        leaves, treedef = jax.tree.flatten(params)
        keys = jax.random.split(jax.random.fold_in(key, 1), len(leaves))
        return jax.tree.unflatten(treedef, [p + 0.1 * jax.random.normal(k, p.shape)
                                            for p, k in zip(leaves, keys, strict=True)])

    return make(jax.random.key(seed))


def images(n, seed):
    return np.random.default_rng(seed).uniform(-1, 1, (n, 16, 16, 3)).astype(np.float32)


def np_windows(image, p, stride):
    """Every p x p window of one HWC image at ``stride``, row-major, features (kh, kw, c)."""
    h, w, _ = image.shape
    return np.stack([image[i:i + p, j:j + p].reshape(-1) for i in range(0, h - p + 1, stride)
                     for j in range(0, w - p + 1, stride)])


def np_layer_norm(x, norm):
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + 1e-6) * np.asarray(norm["scale"]) + np.asarray(norm["bias"])


def np_dense(x, layer):
    return x @ np.asarray(layer["kernel"], np.float64) + np.asarray(layer["bias"])


def np_forward(params, x):
    """A one-block ViT in float64 numpy: ``(logits, {layer name: its input})``."""
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
    b = x.shape[0]
    inputs = {"patch_embed.proj": x}
    kernel = p["patch_embed"]["proj"]["kernel"].reshape(-1, CFG.width)
    tokens = np.stack([np_windows(im, 8, 8) for im in x]) @ kernel + p["patch_embed"]["proj"][
        "bias"]
    cls = np.broadcast_to(p["cls_token"], (b, 1, CFG.width))
    t = np.concatenate([cls, tokens], axis=1) + p["pos_embed"]
    blk = p["blocks"][0]
    h = inputs["blocks.0.attn.qkv"] = np_layer_norm(t, blk["norm1"])
    qkv = np_dense(h, blk["attn"]["qkv"]).reshape(b, 5, 3, 2, 8)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    scores = np.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(8)
    weights = np.exp(scores - scores.max(-1, keepdims=True))
    weights /= weights.sum(-1, keepdims=True)
    a = inputs["blocks.0.attn.proj"] = np.einsum("bhqk,bkhd->bqhd", weights, v).reshape(b, 5, 16)
    t = t + np_dense(a, blk["attn"]["proj"])
    h = inputs["blocks.0.mlp.fc1"] = np_layer_norm(t, blk["norm2"])
    pre = np_dense(h, blk["mlp"]["fc1"])
    g = inputs["blocks.0.mlp.fc2"] = 0.5 * pre * (1 + np.vectorize(math.erf)(pre / math.sqrt(2)))
    t = t + np_dense(g, blk["mlp"]["fc2"])
    f = inputs["head"] = np_layer_norm(t, p["norm"])[:, 0]
    return np_dense(f, p["head"]), inputs


def np_covariances(params, x, stride):
    """``Σ XᵀX`` per layer in float64 from the numpy forward (patch layer: windows)."""
    _, inputs = np_forward(params, x)
    out = {}
    for name, value in inputs.items():
        if name == "patch_embed.proj":
            rows = np.concatenate([np_windows(im, 8, stride) for im in value])
        else:
            rows = value.reshape(-1, value.shape[-1])
        out[name] = rows.T @ rows
    return out


def np_projection(c, c_f, gamma):
    u, s, _ = np.linalg.svd(np.asarray(c, np.float64) - c_f)
    root = np.sqrt(s)
    k = int(np.sum(np.cumsum(root) / root.sum() <= gamma)) + 1
    return u[:, :k] @ u[:, :k].T, k


# ---------------------------------------------------------------------------------------------
# The capture and the covariances


@pytest.mark.slow
def test_captured_layer_inputs_equal_a_numpy_forward():
    params, x = perturbed_params(), images(3, 0)
    apply = jax.jit(vit.apply, static_argnums=0, static_argnames="capture_inputs")
    logits, feats, inputs = apply(CFG, params, jnp.asarray(x), capture_inputs=True)
    expected_logits, expected = np_forward(params, x.astype(np.float64))
    assert sorted(inputs) == sorted(vit.dense_kernel_paths(CFG))
    assert [pgu.layer_name(p) for p in vit.dense_kernel_paths(CFG)] == list(LAYERS)
    for path, value in inputs.items():
        np.testing.assert_allclose(value, expected[pgu.layer_name(path)], rtol=1e-4, atol=1e-5,
                                   err_msg=str(path))
    np.testing.assert_allclose(logits, expected_logits, rtol=1e-4, atol=1e-5)
    plain = apply(CFG, params, jnp.asarray(x))
    assert len(plain) == 2
    np.testing.assert_array_equal(plain[0], logits)
    np.testing.assert_array_equal(plain[1], feats)
    assert len(vit.dense_kernel_paths(vit.ViTConfig.preset("vit_base_patch16_224"))) == 50


@pytest.mark.parametrize("mode,stride", [("stride1", 1), ("patches", 8)])
def test_batch_covariances_equal_numpy_and_ignore_padded_rows(mode, stride):
    params, x = perturbed_params(), images(5, 1)
    mask = np.array([True, False, True, True, False])
    x[~mask] = 50.0  # padding that would dominate every covariance if it counted
    got = pgu.batch_covariances(CFG, params, jnp.asarray(x), jnp.asarray(mask), mode)
    expected = np_covariances(params, x[mask].astype(np.float64), stride)
    assert set(got) == set(LAYERS)
    for name in LAYERS:
        np.testing.assert_allclose(got[name], expected[name], rtol=2e-4, atol=2e-3,
                                   err_msg=name)
    windows = 81 if mode == "stride1" else 4  # (16 - 8 + 1)² windows or the 4 patches
    assert np.trace(got["patch_embed.proj"]) == pytest.approx(
        sum(np.sum(np_windows(im, 8, stride) ** 2) for im in x[mask]), rel=1e-5)
    assert np_windows(x[0], 8, stride).shape == (windows, 192)


def fake_train_data(num_images=14, seed=0):
    """4 TRAIN identities (3 images each, one of them a held-out support image) and 2 VAL."""
    rng = np.random.default_rng(seed)
    source = [{"image": rng.integers(0, 256, (20, 20, 3), dtype=np.uint8),
               "label": rng.integers(0, 2, 4).astype(np.uint8), "identity": i // 3}
              for i in range(num_images)]
    table = {i: [3 * i, 3 * i + 1, 3 * i + 2] for i in range(4)}
    support = (1, 7)
    allowed = [i for i in range(12) if i not in support] + [12, 13]
    return api.TrainData(
        source=api.GuardedSource(source, np.array(allowed), "TRAIN without support, VAL"),
        identity_images=table, image_identities=np.array([i // 3 if i < 12 else -1
                                                          for i in range(num_images)]),
        train_identities=(0, 1, 2, 3), holdout_identities=(1, 3), support_images=support,
        val_images=np.array([12, 13]), image_size=16, seed=3, crop_scale=(0.5, 1.0))


def test_prepare_sums_covariances_over_the_train_augmented_train_images():
    data, params = fake_train_data(), perturbed_params()
    model = api.Model(CFG, "multilabel")
    cfg = pgu.Config(batch_size=4, patch_covariance="stride1")
    artifacts, info = pgu.prepare(model, params, data, cfg, jax.random.key(0))
    train = [0, 2, 3, 4, 5, 6, 8, 9, 10, 11]  # TRAIN images minus the support images 1 and 7
    assert info["train_images"] == 10 and info["batches"] == 3 and info["layers"] == 6
    # The study's training augmentation (data.crop_scale), not the pipeline's default.
    pcfg = pipeline.PipelineConfig(image_size=16, batch_size=4, seed=3, crop_scale=(0.5, 1.0))
    expected = {name: 0.0 for name in LAYERS}
    seen = []
    for batch in pipeline.train_dataset(data.source, np.array(train), pcfg, 1):
        valid = batch["image"][batch["mask"]].astype(np.float64)
        seen += batch["index"][batch["mask"]].tolist()
        for name, c in np_covariances(params, valid, 1).items():
            expected[name] = expected[name] + c
    assert sorted(seen) == train
    for name in LAYERS:
        np.testing.assert_allclose(artifacts["covariance"][name], expected[name], rtol=2e-4,
                                   atol=2e-3, err_msg=name)


# ---------------------------------------------------------------------------------------------
# The projection, the losses, the schedule


def test_retained_rank_and_projection_by_hand():
    q, _ = np.linalg.qr(np.random.default_rng(0).normal(size=(4, 4)))
    eigenvalues = np.array([4.0, -9.0, 16.0, 1.0])  # |λ| descending: 16, 9, 4, 1
    d = q @ np.diag(eigenvalues) @ q.T
    by_magnitude = q[:, [2, 1, 0, 3]]
    # √|λ| = 4, 3, 2, 1 over 10: cumulative 0.4, 0.7, 0.9, 1.0
    for gamma, k in ((0.3, 1), (0.5, 2), (0.75, 3), (0.95, 4)):
        assert int(pgu.retained_rank(jnp.array([16.0, 9.0, 4.0, 1.0]), gamma)) == k
        p, got_k = pgu.projection(jnp.asarray(d + 5 * np.eye(4), jnp.float32),
                                  jnp.asarray(5 * np.eye(4), jnp.float32), gamma)
        assert int(got_k) == k
        u = by_magnitude[:, :k]
        np.testing.assert_allclose(p, u @ u.T, atol=1e-5)


def test_losses_against_numpy():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(4, 5)).astype(np.float32) * 2
    mask = np.array([True, True, False, True])
    classes = np.array([1, 4, 0, 2])
    multi = np.array([[1, 0, 0, 1, 1], [0, 0, 0, 0, 0], [1, 1, 1, 1, 1], [0, 1, 0, 0, 1]],
                     np.uint8)
    soft = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    sig = 1 / (1 + np.exp(-logits.astype(np.float64)))
    rows = np.flatnonzero(mask)

    def f(prob):
        return -np.log(1 - prob + 0.05)

    expected = {
        "classification": np.mean([f(soft[i, classes[i]]) for i in rows]),
        # the 0/1 labels as column indices: columns 0 and 1 only
        "index": np.mean([np.mean([f(sig[i, int(y)]) for y in multi[i]]) for i in rows]),
        # the true labels; row 1 has none and counts 0
        "positives": np.mean([np.mean(f(sig[i][multi[i] > 0])) if multi[i].any() else 0.0
                              for i in rows]),
    }
    got = {
        "classification": pgu.reverse_loss("classification", logits, classes, mask),
        "index": pgu.reverse_loss("multilabel", logits, multi, mask, "index"),
        "positives": pgu.reverse_loss("multilabel", logits, multi, mask, "positives"),
    }
    for name, value in expected.items():
        assert float(got[name]) == pytest.approx(value, rel=1e-5), name
    entropy = np.mean([np.sum(soft[i] * np.log(soft[i] + 1e-15)) for i in rows])
    assert float(pgu.negative_entropy(logits, mask)) == pytest.approx(entropy, rel=1e-5)
    total = pgu.unlearning_loss("classification", logits, classes, mask)
    assert float(total) == pytest.approx(expected["classification"] + 0.2 * entropy, rel=1e-5)


# ---------------------------------------------------------------------------------------------
# Unlearning


def make_request(task, n=3, seed=5):
    rng = np.random.default_rng(seed)
    labels = (rng.integers(0, 4, n) if task == "classification"
              else rng.integers(0, 2, (n, 4)).astype(np.uint8))
    return api.Request(jnp.asarray(images(n, seed)), jnp.asarray(labels), tuple(range(n)))


def train_covariances(params, stride):
    return np_covariances(params, images(12, 9).astype(np.float64), stride)


RUNS = {  # task, compute dtype, patch covariance, reverse BCE
    "classification-f32-stride1": ("classification", "float32", "stride1", "index"),
    "multilabel-bf16-patches": ("multilabel", "bfloat16", "patches", "positives"),
}


@pytest.fixture(scope="module")
def runs():
    """Each of ``RUNS`` unlearned once (2 epochs, γ 0.6) with the numpy projections."""
    out = {}
    for name, (task, dtype, mode, reverse) in RUNS.items():
        params = perturbed_params(2)
        cov = train_covariances(params, 1 if mode == "stride1" else 8)
        cfg = pgu.Config(task=task, lr=0.5, epochs=2, gamma=0.6, patch_covariance=mode,
                         reverse_bce=reverse, compute_dtype=dtype)
        req = make_request(task)
        artifacts = {"covariance": {k: jnp.asarray(v, jnp.float32) for k, v in cov.items()}}
        new, info = pgu.unlearn(api.Model(CFG, task), params, artifacts, req, cfg,
                                jax.random.key(0))
        support = np_covariances(params, np.asarray(req.images, np.float64),
                                 1 if mode == "stride1" else 8)
        projections = {layer: np_projection(cov[layer], support[layer], cfg.gamma)
                       for layer in LAYERS}
        out[name] = (params, new, info, cfg, req, projections)
    return out


@pytest.mark.slow
def test_projection_ranks_match_numpy(runs):
    for _, _, info, _, _, projections in runs.values():
        assert info["ranks"] == {name: k for name, (_, k) in projections.items()}
        assert info["updated_layers"] == 6 and info["steps"] == 2


def test_update_is_orthogonal_to_the_retained_input_subspace(runs):
    for run, (params, new, _, _, _, projections) in runs.items():
        for name, path in pgu.layer_paths(CFG).items():
            delta = np.asarray(get_path(new, path) - get_path(params, path), np.float64)
            delta = delta.reshape(-1, delta.shape[-1])  # [in, out]
            p, k = projections[name]
            assert k < p.shape[0] and np.linalg.norm(delta) > 0, (run, name)
            assert np.linalg.norm(p @ delta) < 1e-4 * np.linalg.norm(delta), (run, name)


def test_frozen_parameters_are_bit_identical(runs):
    kernels = set(vit.dense_kernel_paths(CFG))
    for params, new, *_ in runs.values():
        flat_old = jax.tree_util.tree_flatten_with_path(params)[0]
        flat_new = dict(jax.tree_util.tree_flatten_with_path(new)[0])
        assert len(flat_old) == len(flat_new)
        frozen = 0
        for key, value in flat_old:
            path = tuple(getattr(k, "key", None) for k in key)
            if path not in kernels:
                np.testing.assert_array_equal(np.asarray(flat_new[key]), np.asarray(value))
                frozen += 1
        assert frozen == len(flat_old) - 6


def test_update_is_projected_sgd_on_the_pgu_loss(runs):
    """Two epochs of one batch: θ ← θ − lr_e (g − P g) with lr_0 = lr and lr_1 = lr / 2."""
    params, new, _, cfg, req, projections = runs["classification-f32-stride1"]
    assert cfg.compute_dtype == "float32"
    paths = pgu.layer_paths(CFG)
    labels = np.asarray(req.labels)

    def loss(kernels):
        p = pgu._with_kernels(params, {paths[n]: k for n, k in kernels.items()})
        probs = jax.nn.softmax(vit.apply(CFG, p, req.images)[0], axis=-1)
        rev = -jnp.log(1 - probs[jnp.arange(3), labels] + 0.05)
        return jnp.mean(rev) + 0.2 * jnp.mean(jnp.sum(probs * jnp.log(probs + 1e-15), -1))

    kernels = {n: get_path(params, paths[n]) for n in LAYERS}
    grad = jax.jit(jax.grad(loss))
    for lr in (0.5, 0.25):
        grads = grad(kernels)
        for n in LAYERS:
            g = np.asarray(grads[n], np.float64).reshape(-1, grads[n].shape[-1])
            g = (g - projections[n][0] @ g).reshape(grads[n].shape)
            kernels[n] = kernels[n] - lr * jnp.asarray(g, jnp.float32)
    for n in LAYERS:
        np.testing.assert_allclose(get_path(new, paths[n]), kernels[n], rtol=1e-4,
                                   atol=1e-6, err_msg=n)


def test_gamma_one_leaves_the_model_unchanged():
    params = perturbed_params()
    artifacts = {"covariance": train_covariances(params, 1)}
    new, info = pgu.unlearn(api.Model(CFG, "multilabel"), params, artifacts,
                            make_request("multilabel"), pgu.Config(gamma=1.0),
                            jax.random.key(0))
    assert info["updated_layers"] == 0
    jax.tree.map(np.testing.assert_array_equal, new, params)


# ---------------------------------------------------------------------------------------------
# The method API


def test_method_interface_reference_values_and_validation():
    api.check_method("pgu", pgu)
    assert pgu.ACCESS == api.STATS
    block, h = api.reference_block(pgu, "pgu", "mufac", 10)
    assert h.tuned and h.values["pgu_gamma"] == 0.75
    assert (block.lr, block.epochs, block.gamma, block.batch_size) == (0.1, 10, 0.75, 128)
    assert (block.patch_covariance, block.reverse_bce, block.compute_dtype) == (
        "stride1", "index", "bfloat16")
    assert "task" not in block
    cfg = api.make_config("pgu", pgu, block, task="classification")
    assert cfg.gamma == 0.75 and cfg.task == "classification"
    assert hparams.reference("pgu", "celebahq", 200).values["pgu_gamma"] == 0.75
    for key, value in (("gamma", 1.5), ("patch_covariance", "stride16"),
                       ("reverse_bce", "mask"), ("compute_dtype", "float16"), ("epochs", 0),
                       ("batch_size", 0), ("lr", float("nan"))):
        with pytest.raises(ConfigError, match=f"config.pgu.{key}"):
            api.make_config("pgu", pgu, {**block.to_dict(), key: value}, task="multilabel")


def test_a_loss_that_becomes_nan_stops_at_the_end_of_its_epoch():
    params = perturbed_params()
    artifacts = {"covariance": train_covariances(params, 1)}
    with pytest.raises(TrainingDiverged, match=(
            r"^pgu: the loss became (nan|inf) in epoch [0-2] \(epochs 0-2\); training stopped "
            r"and nothing of the method's run was kept .* Lower config\.pgu\.lr \(1e\+30\)")):
        pgu.unlearn(api.Model(CFG, "multilabel"), params, artifacts, make_request("multilabel"),
                    pgu.Config(epochs=3, lr=1e30, compute_dtype="float32"), jax.random.key(0))
