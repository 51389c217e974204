"""Tests for the meta-loss network ℓ_φ and the torch-faithful AdamW-AMSGrad (no torch needed).

The torch numbers come from ``tools/make_meta_fixtures.py`` (``tests/golden/meta_loss_torch.npz``,
``tests/golden/amsgrad_torch.json``).
"""

import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from oneshui_jax import optim
from oneshui_jax.errors import ConfigError
from oneshui_jax.models import meta_loss as ml
from oneshui_jax.models.meta_loss import MetaLossConfig
from oneshui_jax.models.vit import ViTConfig

GOLDEN = os.path.join(os.path.dirname(__file__), "golden")
SMALL = MetaLossConfig(num_classes=5, feature_dim=16, num_identities=7, task="multilabel",
                       hidden_size=32, num_layers=1)


@pytest.fixture(scope="module")
def torch_cases():
    """``{case: {key: array}}`` from the torch fixture, with ``sd`` / ``grad_sd`` sub-dicts."""
    data = np.load(os.path.join(GOLDEN, "meta_loss_torch.npz"))
    cases: dict = {}
    for key in data.files:
        if "/" not in key:
            continue
        case, rest = key.split("/", 1)
        entry = cases.setdefault(case, {"sd": {}, "grad_sd": {}})
        if rest.startswith(("sd/", "grad_sd/")):
            group, name = rest.split("/", 1)
            entry[group][name] = data[key]
        else:
            entry[rest] = data[key]
    for entry in cases.values():
        entry["cfg"] = MetaLossConfig(**json.loads(str(entry["config"])))
    return cases


@pytest.fixture(scope="module")
def amsgrad_cases():
    with open(os.path.join(GOLDEN, "amsgrad_torch.json")) as f:
        return json.load(f)["cases"]


# ------------------------------------------------------------------------------------------
# config
# ------------------------------------------------------------------------------------------


def test_input_size_vit_b():
    vit_b = ViTConfig.preset("vit_base_patch16_224", num_classes=40)
    celeba = MetaLossConfig.for_vit(vit_b, num_identities=100, task="multilabel")
    assert celeba.feature_dim == 768 and celeba.input_size == 912
    mufac = MetaLossConfig.for_vit(ViTConfig.preset("vit_base_patch16_224", num_classes=8),
                                   num_identities=100, task="classification")
    assert mufac.input_size == 848
    assert MetaLossConfig.for_vit(vit_b, num_identities=1, task="multilabel",
                                  use_feats=False).input_size == 912 - 768
    assert MetaLossConfig.for_vit(vit_b, num_identities=1, task="multilabel",
                                  use_ids=False).input_size == 912 - 64
    assert MetaLossConfig.for_vit(vit_b, num_identities=1, task="multilabel",
                                  use_targets=False).input_size == 912 - 40
    assert celeba.features_size == 912 - 64


@pytest.mark.parametrize("field, value", [
    ("num_classes", 0), ("feature_dim", -1), ("num_identities", 0), ("task", "regression"),
    ("hidden_size", 0), ("num_layers", -1), ("embed_size", 0), ("dropout", 1.0),
    ("dropout", -0.1), ("use_ids", 1), ("num_classes", 2.0),
])
def test_config_validation(field, value):
    kwargs = dict(num_classes=5, feature_dim=16, num_identities=7, task="multilabel")
    kwargs[field] = value
    with pytest.raises(ConfigError, match=field):
        MetaLossConfig(**kwargs)


def test_no_identities_needed_without_ids():
    cfg = MetaLossConfig(num_classes=3, feature_dim=4, num_identities=0, task="multilabel",
                         use_ids=False)
    assert "embed" not in ml.init_params(cfg, jax.random.key(0))


# ------------------------------------------------------------------------------------------
# parity with the torch module
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", ["full", "plain"])
def test_torch_parity(torch_cases, case):
    t = torch_cases[case]
    cfg = t["cfg"]
    params = ml.from_torch_state_dict(cfg, t["sd"])
    ids = jnp.asarray(t["ids"]) if cfg.use_ids else None
    x = ml.meta_inputs(cfg, jnp.asarray(t["logits"]), jnp.asarray(t["feats"]),
                       jnp.asarray(t["labels"]))
    np.testing.assert_allclose(x, t["x"], atol=1e-6)

    loss = lambda p, x: ml.mean_loss(cfg, p, x, ids)

    @jax.jit
    def run(params, x):
        out = ml.apply(cfg, params, x, ids)
        grad_p, grad_x = jax.grad(loss, argnums=(0, 1))(params, x)
        # second order: d/dx sum((d mean / dx)^2), torch's double backward
        gg = jax.grad(lambda x: jnp.sum(jax.grad(loss, argnums=1)(params, x) ** 2))(x)
        return out, grad_p, grad_x, gg

    out, grad_p, grad_x, gg = run(params, jnp.asarray(t["x"]))
    assert out.shape == t["out"].shape and out.dtype == jnp.float32
    np.testing.assert_allclose(out, t["out"], atol=1e-5)
    np.testing.assert_allclose(grad_x, t["grad_x"], atol=1e-6, rtol=1e-4)
    grad_sd = ml.to_torch_state_dict(grad_p)
    assert list(grad_sd) == list(t["grad_sd"])
    for key, value in t["grad_sd"].items():
        np.testing.assert_allclose(grad_sd[key], value, atol=1e-6, rtol=1e-4, err_msg=key)
    np.testing.assert_allclose(gg, t["gradgrad_x"], atol=1e-7, rtol=1e-4)


def test_state_dict_round_trip(torch_cases):
    t = torch_cases["full"]
    params = ml.from_torch_state_dict(t["cfg"], t["sd"])
    back = ml.to_torch_state_dict(params)
    assert list(back) == list(t["sd"]) == ml.torch_state_dict_keys(t["cfg"])
    for key, value in t["sd"].items():
        np.testing.assert_array_equal(back[key], value)
    fresh = ml.init_params(t["cfg"], jax.random.key(0))
    assert jax.tree.structure(fresh) == jax.tree.structure(params)
    assert jax.tree.map(jnp.shape, fresh) == jax.tree.map(jnp.shape, params)


def test_state_dict_errors(torch_cases):
    t = torch_cases["full"]
    sd = dict(t["sd"])
    del sd["embed.weight"]
    sd["extra.weight"] = np.zeros(3)
    sd["input_block.0.weight"] = sd["input_block.0.weight"].T
    with pytest.raises(ValueError) as err:
        ml.from_torch_state_dict(t["cfg"], sd)
    for word in ("embed.weight", "extra.weight", "input_block.0.weight"):
        assert word in str(err.value)


# ------------------------------------------------------------------------------------------
# init, inputs, dropout
# ------------------------------------------------------------------------------------------


def test_init_statistics():
    cfg = MetaLossConfig(num_classes=40, feature_dim=768, num_identities=2000, task="multilabel",
                         num_layers=1)
    params = ml.init_params(cfg, jax.random.key(0))
    sd = ml.to_torch_state_dict(params)
    assert list(sd) == ml.torch_state_dict_keys(cfg)
    for name in ("input_block.0", "input_block.2", "hidden_blocks.0.1", "hidden_blocks.0.4",
                 "output_block.1"):
        weight, bias = sd[name + ".weight"], sd[name + ".bias"]
        bound = 1.0 / math.sqrt(weight.shape[1])
        for array in (weight, bias):
            assert np.abs(array).max() <= bound
            if array.size >= 512:  # uniform: max near the bound, std = bound / sqrt(3)
                assert np.abs(array).max() > 0.95 * bound
                assert abs(array.std() - bound / math.sqrt(3)) < 0.1 * bound
    assert sd["input_block.0.weight"].shape == (512, 912)
    emb = sd["embed.weight"]
    assert emb.shape == (2000, 64)
    assert abs(emb.mean()) < 0.02 and abs(emb.std() - 1.0) < 0.02
    for name in ("input_block.1", "hidden_blocks.0.0", "output_block.0"):
        np.testing.assert_array_equal(sd[name + ".weight"], np.ones(512, np.float32))
        np.testing.assert_array_equal(sd[name + ".bias"], np.zeros(512, np.float32))
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(params))


def test_meta_inputs_layout():
    cfg = MetaLossConfig(num_classes=3, feature_dim=2, num_identities=4, task="classification")
    logits = jnp.array([[0.0, 1.0, -1.0], [2.0, 0.0, 0.0]])
    feats = jnp.array([[5.0, 6.0], [7.0, 8.0]])
    x = ml.meta_inputs(cfg, logits, feats, jnp.array([2, 0]))
    assert x.shape == (2, cfg.features_size) == (2, 8)
    np.testing.assert_allclose(x[:, :3], jax.nn.sigmoid(logits))  # sigmoid, not softmax
    np.testing.assert_array_equal(x[:, 3:5], feats)
    np.testing.assert_array_equal(x[:, 5:], [[0, 0, 1], [1, 0, 0]])  # one-hot targets
    np.testing.assert_array_equal(
        ml.meta_inputs(cfg, logits, feats, jax.nn.one_hot(jnp.array([2, 0]), 3)), x)

    multi = MetaLossConfig(num_classes=3, feature_dim=2, num_identities=4, task="multilabel",
                           use_feats=False)
    y = jnp.array([[1, 0, 1], [0, 1, 1]])
    xm = ml.meta_inputs(multi, logits, None, y)
    np.testing.assert_array_equal(xm[:, 3:], y.astype(jnp.float32))
    assert xm.dtype == jnp.float32
    with pytest.raises(ValueError, match="labels"):
        ml.meta_inputs(multi, logits, None, jnp.array([2, 0]))
    with pytest.raises(ValueError, match="cls_features"):
        ml.meta_inputs(cfg, logits, None, jnp.array([2, 0]))


def test_dropout():
    cfg = MetaLossConfig(num_classes=5, feature_dim=16, num_identities=7, task="multilabel",
                         hidden_size=256, num_layers=1)
    params = ml.init_params(cfg, jax.random.key(0))
    x = jax.random.normal(jax.random.key(1), (64, cfg.features_size))
    ids = jnp.arange(64) % 7
    apply = jax.jit(ml.apply, static_argnums=0)
    eval_out = apply(cfg, params, x, ids)
    np.testing.assert_array_equal(eval_out, apply(cfg, params, x, ids))
    assert bool(jnp.all(eval_out > 0))
    a = apply(cfg, params, x, ids, dropout_rng=jax.random.key(2))
    b = apply(cfg, params, x, ids, dropout_rng=jax.random.key(3))
    assert not np.allclose(a, eval_out) and not np.allclose(a, b)
    np.testing.assert_array_equal(a, apply(cfg, params, x, ids, dropout_rng=jax.random.key(2)))

    # inverted dropout: half the units are zeroed and the others doubled, so the mean of a
    # (linear) readout of the dropped layer is preserved on average
    h = jnp.ones((2000, 256))
    dropped = ml._dropout(h, 0.5, jax.random.key(4))
    assert set(np.unique(np.asarray(dropped)).tolist()) == {0.0, 2.0}
    assert abs(float(dropped.mean()) - 1.0) < 0.01
    no_drop = MetaLossConfig(num_classes=5, feature_dim=16, num_identities=7, task="multilabel",
                             hidden_size=256, num_layers=1, dropout=0.0)
    np.testing.assert_array_equal(
        apply(no_drop, params, x, ids, dropout_rng=jax.random.key(2)), eval_out)


def test_jit_and_grad_of_grad():
    """Nested differentiation as in MetaUnlearn: an inner grad w.r.t. x, an outer one w.r.t. φ."""
    params = ml.init_params(SMALL, jax.random.key(0))
    x = jax.random.normal(jax.random.key(1), (4, SMALL.features_size))
    ids = jnp.array([0, 3, 6, 3])
    rng = jax.random.key(5)

    def outer(phi, x, ids, rng):
        g = jax.grad(lambda x: ml.mean_loss(SMALL, phi, x, ids, dropout_rng=rng))(x)
        x_new = x - 0.1 * g
        return jnp.sum(ml.apply(SMALL, phi, x_new, ids) ** 2)

    grads = jax.jit(jax.grad(outer))(params, x, ids, rng)
    assert jax.tree.structure(grads) == jax.tree.structure(params)
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree.leaves(grads))
    assert float(jnp.abs(grads["embed"]["embedding"][jnp.array([0, 3, 6])]).sum()) > 0
    assert float(jnp.abs(grads["embed"]["embedding"][1]).sum()) == 0
    jitted = jax.jit(ml.apply, static_argnums=0)
    np.testing.assert_allclose(jitted(SMALL, params, x, ids), ml.apply(SMALL, params, x, ids),
                               rtol=1e-6)


# ------------------------------------------------------------------------------------------
# torch AdamW(amsgrad=True)
# ------------------------------------------------------------------------------------------


def _run(tx, case, jit=False):
    params = jnp.asarray(case["params0"], jnp.float32)
    state = tx.init(params)

    def step(params, state, grad, lr):
        updates, state = tx.update(grad, state, params)
        return params - lr * updates, state

    if jit:
        step = jax.jit(step)
    out = []
    for g in case["grads"]:
        params, state = step(params, state, jnp.asarray(g, jnp.float32), jnp.float32(case["lr"]))
        out.append(np.asarray(params))
    return np.stack(out), state


@pytest.mark.parametrize("jit", [False, True])
def test_torch_adamw_amsgrad_matches_torch(amsgrad_cases, jit):
    for case in amsgrad_cases:
        tx = optim.torch_adamw_amsgrad(case["weight_decay"], *case["betas"], eps=case["eps"])
        trajectory, state = _run(tx, case, jit=jit)
        np.testing.assert_allclose(trajectory, case["params"], rtol=1e-6, atol=1e-7)
        np.testing.assert_allclose(state.mu, case["exp_avg"], rtol=1e-6)
        np.testing.assert_allclose(state.nu, case["exp_avg_sq"], rtol=1e-6)
        np.testing.assert_allclose(state.nu_max, case["max_exp_avg_sq"], rtol=1e-6)
        assert int(state.count) == len(case["grads"])
        # the fixture exercises the max: the raw second moment decreased somewhere
        assert not np.allclose(case["exp_avg_sq"], case["max_exp_avg_sq"])


def test_torch_adamw_amsgrad_differs_from_optax(amsgrad_cases):
    for case in amsgrad_cases:
        tx = optax.chain(optax.scale_by_amsgrad(*case["betas"], eps=case["eps"]),
                         optax.add_decayed_weights(case["weight_decay"]))
        trajectory, _ = _run(tx, case)
        gap = np.abs(trajectory - np.asarray(case["params"])).max()
        assert gap > 100 * 1e-6 * np.abs(case["params"]).max(), gap


def test_torch_adamw_amsgrad_state_and_errors():
    tx = optim.torch_adamw_amsgrad(weight_decay=0.1)
    params = {"a": jnp.ones((2, 3)), "b": {"c": jnp.zeros(4)}}
    state = tx.init(params)
    for leaf in jax.tree.leaves(state):
        assert isinstance(leaf, jax.Array)
    assert state.count.dtype == jnp.int32 and state.count.shape == ()
    with pytest.raises(ValueError, match="params"):
        tx.update(jax.tree.map(jnp.ones_like, params), state)
    # weight decay is decoupled: a zero gradient still shrinks the parameters by lr * wd * p
    updates, _ = tx.update(jax.tree.map(jnp.zeros_like, params), state, params)
    np.testing.assert_allclose(updates["a"], 0.1 * params["a"])
    # without weight decay, params are optional
    tx0 = optim.torch_adamw_amsgrad()
    updates, _ = tx0.update(params, tx0.init(params))
    np.testing.assert_allclose(updates["a"], 1.0 / (1.0 + 1e-8), rtol=1e-6)


def test_meta_params_and_optimizer_state_checkpoint(tmp_path):
    """Params (int-keyed hidden blocks) and the AMSGrad state survive an orbax round trip."""
    from oneshui_jax import checkpoints

    params = ml.init_params(SMALL, jax.random.key(0))
    tx = optim.torch_adamw_amsgrad()
    state = tx.init(params)
    _, state = tx.update(jax.tree.map(jnp.ones_like, params), state)
    tree = {"params": params, "opt_state": state}
    digest = checkpoints.save_tree(str(tmp_path), "meta_loss", tree)
    template = {"params": ml.init_params(SMALL, jax.random.key(1)), "opt_state": tx.init(params)}
    restored = checkpoints.load_tree(str(tmp_path), "meta_loss", template, digest)
    assert jax.tree.structure(restored) == jax.tree.structure(tree)
    for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(tree), strict=True):
        np.testing.assert_array_equal(a, b)
    assert int(restored["opt_state"].count) == 1
