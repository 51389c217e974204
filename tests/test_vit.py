"""Tests for the ViT backbone: timm parity (names, shapes, counts, computation), functional core."""

import functools
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from oneshui_jax.models import vit
from oneshui_jax.models.vit import ViTConfig

TINY = ViTConfig.preset("vit_tiny_test", num_classes=5)


def _abstract_params(cfg: ViTConfig):
    """Parameter shapes without materialising weights."""
    return jax.eval_shape(functools.partial(vit.init_params, cfg), jax.random.key(0))


def _perturbed_params(cfg: ViTConfig, seed: int):
    """Fresh params plus N(0, 0.1) noise on every leaf, so no bias is zero and no scale is one."""
    params = vit.init_params(cfg, jax.random.key(seed))
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(seed + 1000), len(leaves))
    noisy = [
        p + 0.1 * jax.random.normal(k, p.shape, p.dtype)
        for p, k in zip(leaves, keys, strict=True)
    ]
    return jax.tree.unflatten(treedef, noisy)


def _images(cfg: ViTConfig, batch: int, seed: int) -> jax.Array:
    """Uniform NHWC images in [-1, 1]."""
    shape = (batch, cfg.image_size, cfg.image_size, cfg.in_chans)
    return jax.random.uniform(jax.random.key(seed), shape, minval=-1.0, maxval=1.0)


def _expected_timm_shapes(depth: int, width: int, tokens: int, patch: int, classes: int):
    """timm vit_base_patch16_224-style state-dict keys -> torch shapes, in timm order."""
    shapes = {
        "cls_token": (1, 1, width),
        "pos_embed": (1, tokens, width),
        "patch_embed.proj.weight": (width, 3, patch, patch),
        "patch_embed.proj.bias": (width,),
    }
    for i in range(depth):
        b = f"blocks.{i}."
        shapes |= {
            b + "norm1.weight": (width,), b + "norm1.bias": (width,),
            b + "attn.qkv.weight": (3 * width, width), b + "attn.qkv.bias": (3 * width,),
            b + "attn.proj.weight": (width, width), b + "attn.proj.bias": (width,),
            b + "norm2.weight": (width,), b + "norm2.bias": (width,),
            b + "mlp.fc1.weight": (4 * width, width), b + "mlp.fc1.bias": (4 * width,),
            b + "mlp.fc2.weight": (width, 4 * width), b + "mlp.fc2.bias": (width,),
        }
    shapes |= {
        "norm.weight": (width,), "norm.bias": (width,),
        "head.weight": (classes, width), "head.bias": (classes,),
    }
    return shapes


# ------------------------------------------------------------------------------------------
# numpy reference of timm's forward pass, on a torch-layout state dict
# ------------------------------------------------------------------------------------------


def _np_linear(x, sd, name):
    return x @ sd[name + ".weight"].T + sd[name + ".bias"]


def _np_layer_norm(x, sd, name):
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + 1e-6) * sd[name + ".weight"] + sd[name + ".bias"]


def _np_attention(x, sd, name, heads):
    """timm Attention: qkv reshape [B, N, 3, heads, hd].permute(2, 0, 3, 1, 4), softmax, proj."""
    b, n, d = x.shape
    qkv = _np_linear(x, sd, name + ".qkv").reshape(b, n, 3, heads, d // heads)
    q, k, v = qkv.transpose(2, 0, 3, 1, 4)
    scores = (q * (d // heads) ** -0.5) @ k.transpose(0, 1, 3, 2)
    attn = np.exp(scores - scores.max(-1, keepdims=True))
    attn /= attn.sum(-1, keepdims=True)
    return _np_linear((attn @ v).transpose(0, 2, 1, 3).reshape(b, n, d), sd, name + ".proj")


def _np_vit(sd, images_nhwc, heads):
    """timm VisionTransformer.forward on NCHW images; returns (logits, pre-logits)."""
    x = np.asarray(images_nhwc, np.float64).transpose(0, 3, 1, 2)
    w = sd["patch_embed.proj.weight"]
    d, c, p, _ = w.shape
    b, _, h, _ = x.shape
    g = h // p
    patches = x.reshape(b, c, g, p, g, p).transpose(0, 2, 4, 1, 3, 5).reshape(b, g * g, -1)
    x = patches @ w.reshape(d, -1).T + sd["patch_embed.proj.bias"]
    cls = np.broadcast_to(sd["cls_token"], (b, 1, d))
    x = np.concatenate([cls, x], axis=1) + sd["pos_embed"]
    erf = np.vectorize(math.erf)
    depth = len({k.split(".")[1] for k in sd if k.startswith("blocks.")})
    for i in range(depth):
        blk = f"blocks.{i}."
        x = x + _np_attention(_np_layer_norm(x, sd, blk + "norm1"), sd, blk + "attn", heads)
        hid = _np_linear(_np_layer_norm(x, sd, blk + "norm2"), sd, blk + "mlp.fc1")
        x = x + _np_linear(0.5 * hid * (1 + erf(hid / math.sqrt(2))), sd, blk + "mlp.fc2")
    feats = _np_layer_norm(x, sd, "norm")[:, 0]
    return _np_linear(feats, sd, "head"), feats


def _np_state_dict(params):
    return {k: v.astype(np.float64) for k, v in vit.to_timm_state_dict(params).items()}


# ------------------------------------------------------------------------------------------
# ViT-B/16: counts, names, shapes (shapes only, no weights)
# ------------------------------------------------------------------------------------------


def test_vit_b16_counts_names_and_torch_shapes():
    cfg = ViTConfig.preset("vit_base_patch16_224", num_classes=40)
    abstract = _abstract_params(cfg)
    assert vit.count_params(abstract) == 85_829_416
    assert len(jax.tree.leaves(abstract)) == 152

    expected = _expected_timm_shapes(depth=12, width=768, tokens=197, patch=16, classes=40)
    assert len(expected) == 152
    assert vit.timm_state_dict_keys(cfg) == list(expected)

    # zero-stride arrays: to_timm_state_dict runs on the real layout without allocating weights
    zeros = jax.tree.map(lambda s: np.broadcast_to(np.float32(0), s.shape), abstract)
    state_dict = vit.to_timm_state_dict(zeros)
    assert list(state_dict) == list(expected)
    assert {k: v.shape for k, v in state_dict.items()} == expected


def test_vit_b16_imagenet_head_count():
    cfg = ViTConfig.preset("vit_base_patch16_224")
    assert cfg == ViTConfig()
    assert vit.count_params(_abstract_params(cfg)) == 86_567_656


def test_presets_and_config_properties():
    demo = ViTConfig.preset("vit_small_demo")
    assert (demo.num_patches, demo.head_dim, demo.mlp_hidden) == (16, 32, 384)
    assert ViTConfig.preset("vit_base_patch16_224").num_patches == 196
    assert hash(ViTConfig.preset("vit_tiny_test")) == hash(ViTConfig.preset("vit_tiny_test"))


@pytest.mark.parametrize(
    "overrides, field",
    [
        ({"image_size": 30}, "image_size"),
        ({"num_heads": 5}, "num_heads"),
        ({"depth": 0}, "depth"),
        ({"mlp_ratio": -1.0}, "mlp_ratio"),
        ({"num_classes": 2.5}, "num_classes"),
    ],
)
def test_bad_config_names_field(overrides, field):
    with pytest.raises(ValueError, match=field):
        ViTConfig.preset("vit_tiny_test", **overrides)


def test_unknown_preset():
    with pytest.raises(ValueError, match="vit_huge"):
        ViTConfig.preset("vit_huge")


# ------------------------------------------------------------------------------------------
# Tiny model: forward pass
# ------------------------------------------------------------------------------------------


def test_init_follows_timm():
    """timm's distributions: trunc_normal_(std=.02) truncated at +-2 in absolute units (so
    about 4.6% of the values lie beyond 2 std, which a truncation at 2 std would forbid); the
    patch conv keeps torch's U(+-1/sqrt(fan_in)) for kernel and bias; cls_token std 1e-6."""
    cfg = ViTConfig.preset("vit_small_demo")
    params = vit.init_params(cfg, jax.random.key(0))
    blk = params["blocks"][0]
    assert float(jnp.abs(params["cls_token"]).max()) < 1e-5
    for std_leaf in (params["pos_embed"], blk["attn"]["qkv"]["kernel"], blk["mlp"]["fc1"]["kernel"],
                     params["head"]["kernel"]):
        assert 0.018 < float(std_leaf.std()) < 0.022
    big = np.concatenate([np.ravel(b[layer]["fc1" if layer == "mlp" else "qkv"]["kernel"])
                          for b in params["blocks"].values() for layer in ("mlp", "attn")])
    assert 0.040 < np.mean(np.abs(big) > 0.04) < 0.051  # normal: 4.55% beyond 2 std
    # ViT-B/16's 85M linear weights: nothing sits on the far bounds (+-2 = 100 std), where an
    # inverse-CDF truncated normal puts about 5 (as many as 5 in these 20M with this key).
    draw = np.asarray(vit.timm_trunc_normal(0.02)(jax.random.key(1), (20_000_000,)))
    assert float(np.abs(draw).max()) < 0.15 and abs(float(draw.std()) - 0.02) < 1e-4
    conv = params["patch_embed"]["proj"]
    bound = 1.0 / math.sqrt(cfg.in_chans * cfg.patch_size**2)
    for leaf in (conv["kernel"], conv["bias"]):
        assert float(jnp.abs(leaf).max()) <= bound and float(jnp.abs(leaf).max()) > 0.9 * bound
    assert abs(float(conv["kernel"].std()) - bound / math.sqrt(3)) < 0.05 * bound
    for zero in (params["head"]["bias"], blk["attn"]["qkv"]["bias"], blk["norm1"]["bias"]):
        assert not jnp.any(zero)
    assert jnp.all(blk["norm2"]["scale"] == 1) and jnp.all(params["norm"]["scale"] == 1)
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(params))


def _equations(jaxpr):
    """Every equation of a jaxpr, those of nested jaxprs (jit, custom_jvp, ...) included."""
    for eqn in jaxpr.eqns:
        yield eqn
        for param in eqn.params.values():
            for sub in param if isinstance(param, tuple | list) else (param,):
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    yield from _equations(inner)


@pytest.mark.slow
def test_bfloat16_follows_autocast():
    """bf16 compute as torch.autocast runs timm's ViT: the convolution and every matmul return
    bf16; every addition on the [B, T, D] stream (position embedding, residuals) is float32;
    the LayerNorm outputs (the inputs of qkv, fc1 and the head) are float32 while the attention
    and GELU outputs (inputs of proj and fc2) are bf16; the logits are the head's bf16 output."""
    params = _perturbed_params(TINY, seed=21)
    images = _images(TINY, 2, seed=22)
    jaxpr = jax.make_jaxpr(lambda p, x: vit.apply(TINY, p, x, dtype=jnp.bfloat16))(params, images)
    eqns = list(_equations(jaxpr.jaxpr))
    stream_shape = (2, 1 + TINY.num_patches, TINY.width)
    for eqn in eqns:
        if eqn.primitive.name in ("dot_general", "conv_general_dilated"):
            assert eqn.outvars[0].aval.dtype == jnp.bfloat16, eqn
    adds = [e.outvars[0].aval.dtype for e in eqns if e.primitive.name == "add"
            and e.outvars[0].aval.shape == stream_shape]
    # bf16: only the biases of attn.proj and mlp.fc2 (part of their matmul, as in torch);
    # float32: the position embedding, 2 residuals per block and the LayerNorms' shifts.
    assert adds.count(jnp.bfloat16) == 2 * TINY.depth
    assert adds.count(jnp.float32) >= 1 + 2 * TINY.depth
    assert len(adds) == adds.count(jnp.bfloat16) + adds.count(jnp.float32)

    logits, cls, inputs = vit.apply(TINY, params, images, dtype=jnp.bfloat16, capture_inputs=True)
    for path, x in inputs.items():
        layer = path[-2]
        if layer in ("qkv", "fc1", "head"):
            assert x.dtype == jnp.float32, path
        elif layer in ("proj", "fc2") and path[0] == "blocks":
            assert x.dtype == jnp.bfloat16, path
    assert cls.dtype == jnp.float32
    head = params["head"]
    want = (cls.astype(jnp.bfloat16) @ head["kernel"].astype(jnp.bfloat16)
            + head["bias"].astype(jnp.bfloat16))
    assert want.dtype == jnp.bfloat16
    np.testing.assert_array_equal(logits, want.astype(jnp.float32))


# float32 code paths may differ in the last bits between CPUs (this golden file matched one
# machine bit for bit and another to 2.4e-7) and between XLA's compile settings; one rounding to
# bfloat16 anywhere moves a logit by ~1e-3 of its size, 100 times this tolerance.
GOLDEN_RTOL, GOLDEN_ATOL = 1e-5, 1e-6


def test_float32_forward_is_unchanged():
    """The autocast stream casts nothing in float32: no dtype conversion is traced, and the timm
    fixture model's float32 outputs equal those the code gave before it
    (tests/golden/vit_tiny_fp32.npz) to float32 rounding (``GOLDEN_RTOL``, ``GOLDEN_ATOL``)."""
    import json
    import os

    here = os.path.dirname(__file__)
    data = np.load(os.path.join(here, "fixtures", "timm_tiny_vit.npz"))
    meta = json.loads(str(data["meta"]))["config"]
    cfg = ViTConfig(image_size=meta["img_size"], patch_size=meta["patch_size"],
                    width=meta["embed_dim"], depth=meta["depth"], num_heads=meta["num_heads"],
                    mlp_ratio=meta["mlp_ratio"], num_classes=meta["num_classes"])
    params = vit.from_timm_state_dict(
        cfg, {k[3:]: data[k] for k in data.files if k.startswith("sd/")})
    images = jnp.asarray(data["images_nhwc"])
    golden = np.load(os.path.join(here, "golden", "vit_tiny_fp32.npz"))
    for dtype in (None, jnp.float32):
        fn = jax.jit(lambda p, x, dtype=dtype: vit.apply(cfg, p, x, dtype=dtype))
        eqns = _equations(jax.make_jaxpr(fn)(params, images).jaxpr)
        assert not [e for e in eqns if e.primitive.name == "convert_element_type"]
        logits, cls = fn(params, images)
        assert logits.dtype == cls.dtype == jnp.float32
        np.testing.assert_allclose(logits, golden["logits"], rtol=GOLDEN_RTOL, atol=GOLDEN_ATOL)
        np.testing.assert_allclose(cls, golden["cls_features"], rtol=GOLDEN_RTOL,
                                   atol=GOLDEN_ATOL)


def test_tiny_shapes_features_and_head():
    model = vit.VisionTransformer(TINY, rngs=nnx.Rngs(params=jax.random.key(0)))
    images = _images(TINY, 3, seed=1)
    logits, cls = model(images)
    tokens = model.forward_features(images)
    assert logits.shape == (3, 5) and cls.shape == (3, 32)
    assert tokens.shape == (3, 1 + TINY.num_patches, 32)
    np.testing.assert_array_equal(cls, tokens[:, 0])
    head = model.head
    np.testing.assert_allclose(logits, cls @ head.kernel[...] + head.bias[...], atol=1e-6)


def test_functional_apply_matches_module_and_init():
    key = jax.random.key(3)
    model = vit.VisionTransformer(TINY, rngs=nnx.Rngs(params=key))
    params = nnx.state(model, nnx.Param).to_pure_dict()
    jax.tree.map(np.testing.assert_array_equal, vit.init_params(TINY, key), params)
    images = _images(TINY, 2, seed=4)
    for got, want in zip(vit.apply(TINY, params, images), model(images), strict=True):
        np.testing.assert_array_equal(got, want)


def test_matches_numpy_timm_reference():
    params = _perturbed_params(TINY, seed=5)
    images = _images(TINY, 2, seed=6)
    logits, cls = vit.apply(TINY, params, images)
    ref_logits, ref_cls = _np_vit(_np_state_dict(params), images, TINY.num_heads)
    np.testing.assert_allclose(logits, ref_logits, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(cls, ref_cls, rtol=1e-4, atol=1e-4)


def test_attention_matches_numpy_reference():
    cfg = ViTConfig.preset("vit_tiny_test", num_heads=4)
    params = _perturbed_params(cfg, seed=7)
    model = nnx.merge(nnx.split(vit.VisionTransformer(cfg, rngs=nnx.Rngs(0)))[0], params)
    x = jax.random.normal(jax.random.key(8), (2, 1 + cfg.num_patches, cfg.width))
    got = model.blocks[0].attn(x)
    want = _np_attention(np.asarray(x, np.float64), _np_state_dict(params), "blocks.0.attn", 4)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_jit_and_bfloat16():
    params = _perturbed_params(TINY, seed=9)
    images = _images(TINY, 2, seed=10)
    jitted = jax.jit(vit.apply, static_argnums=0, static_argnames="dtype")
    eager_logits, eager_cls = vit.apply(TINY, params, images)
    jit_logits, jit_cls = jitted(TINY, params, images)
    np.testing.assert_allclose(jit_logits, eager_logits, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(jit_cls, eager_cls, rtol=1e-5, atol=1e-5)

    bf16_logits, bf16_cls = jitted(TINY, params, images, dtype=jnp.bfloat16)
    assert bf16_logits.dtype == jnp.float32 and bf16_cls.dtype == jnp.float32
    scale = float(jnp.abs(eager_logits).max())
    assert float(jnp.abs(bf16_logits - eager_logits).max()) < 0.05 * scale
    assert float(jnp.abs(bf16_cls - eager_cls).max()) < 0.1
    # ... and really computed in bfloat16: rounding shows, and the matmuls are bf16 in the HLO.
    assert float(jnp.abs(bf16_logits - eager_logits).max()) > 1e-4 * scale
    hlo = jitted.lower(TINY, params, images, dtype=jnp.bfloat16).as_text()
    assert "bf16" in hlo and "bf16" not in jitted.lower(TINY, params, images).as_text()
    assert re.search(r"dot_general.*bf16", hlo) or re.search(r"bf16.*dot_general", hlo)


def test_jitted_apply_does_not_retrace():
    traces = []

    def traced_apply(cfg, params, images):
        traces.append(images.shape)
        return vit.apply(cfg, params, images)

    jitted = jax.jit(traced_apply, static_argnums=0)
    params = vit.init_params(TINY, jax.random.key(0))
    jitted(TINY, params, _images(TINY, 2, seed=0))
    new_params = jax.tree.map(lambda p: p + 1.0, params)
    same_cfg = ViTConfig.preset("vit_tiny_test", num_classes=5)  # equal, not identical
    jitted(same_cfg, new_params, _images(TINY, 2, seed=1))
    assert len(traces) == 1


# ------------------------------------------------------------------------------------------
# timm state-dict conversion
# ------------------------------------------------------------------------------------------


def test_timm_round_trip():
    params = _perturbed_params(TINY, seed=11)
    state_dict = vit.to_timm_state_dict(params)
    assert list(state_dict) == vit.timm_state_dict_keys(TINY)
    assert all(isinstance(v, np.ndarray) for v in state_dict.values())
    back = vit.from_timm_state_dict(TINY, state_dict)
    assert jax.tree.structure(back) == jax.tree.structure(params)
    jax.tree.map(np.testing.assert_array_equal, back, params)


def test_timm_key_table_and_layouts():
    """One table: every leaf has one timm key whose torch shape is the permuted one."""
    abstract = _abstract_params(TINY)
    table = vit.timm_keys(TINY.depth)
    assert list(table) == vit.timm_state_dict_keys(TINY)
    assert sorted(map(str, table.values())) == sorted(
        str(tuple(getattr(k, "key", getattr(k, "idx", None)) for k in path))
        for path, _ in jax.tree_util.tree_flatten_with_path(abstract)[0])
    assert table["blocks.1.norm2.weight"] == ("blocks", 1, "norm2", "scale")
    assert vit.torch_axes(("head", "kernel"), 2) == (1, 0)
    assert vit.torch_axes(("patch_embed", "proj", "kernel"), 4) == (3, 2, 0, 1)
    assert vit.torch_axes(("pos_embed",), 3) is None
    with pytest.raises(ValueError, match="head.kernel: a kernel of rank 3"):
        vit.torch_axes(("head", "kernel"), 3)


def test_timm_mismatch_lists_every_problem():
    state_dict = vit.to_timm_state_dict(vit.init_params(TINY, jax.random.key(0)))
    del state_dict["blocks.1.norm2.bias"]
    state_dict["blocks.7.attn.qkv.weight"] = np.zeros((96, 32), np.float32)
    state_dict["head.weight"] = np.zeros((1000, 32), np.float32)
    with pytest.raises(ValueError) as err:
        vit.from_timm_state_dict(TINY, state_dict)
    message = str(err.value)
    for name in ("blocks.1.norm2.bias", "blocks.7.attn.qkv.weight", "head.weight"):
        assert name in message


# ------------------------------------------------------------------------------------------
# Second order
# ------------------------------------------------------------------------------------------


def _cross_entropy(logits, labels):
    return -jnp.take_along_axis(jax.nn.log_softmax(logits), labels[:, None], axis=1)[:, 0]


def test_fused_attention_path_matches_plain_attention():
    """The padded, length-masked path used for cuDNN gives plain attention (checked with XLA)."""
    rng = np.random.default_rng(0)
    q, k, v = (jnp.asarray(rng.normal(size=(2, 17, 3, 8)), jnp.float32) for _ in range(3))
    scores = jnp.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(8)
    plain = jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(scores, -1), v)
    fused = vit.fused_attention(q, k, v, implementation="xla")
    np.testing.assert_allclose(np.asarray(fused), np.asarray(plain), atol=1e-5)


def test_unknown_attention_implementation_is_rejected():
    cfg = ViTConfig.preset("vit_tiny_test", num_classes=3)
    params = vit.init_params(cfg, jax.random.key(0))
    with pytest.raises(ValueError, match="attention"):
        vit.apply(cfg, params, jnp.zeros((1, 32, 32, 3)), attention="flash")


def test_lecun_scheme_truncates_at_two_std_and_draws_a_lecun_patch_conv():
    """``init_params(..., "lecun")`` (the from-scratch demos, vit.INIT_SCHEMES): normals
    truncated at 2 std and a LeCun-normal patch convolution with zero bias; the class token and
    everything else as timm's scheme; an unknown scheme is refused by name."""
    cfg = ViTConfig.preset("vit_small_demo")
    params = vit.init_params(cfg, jax.random.key(0), "lecun")
    kernels = np.concatenate([np.ravel(b["mlp"]["fc1"]["kernel"])
                              for b in params["blocks"].values()])
    assert float(np.abs(kernels).max()) <= 0.04 + 1e-6 and 0.015 < kernels.std() < 0.019
    conv = params["patch_embed"]["proj"]
    fan_in = cfg.in_chans * cfg.patch_size**2
    assert not np.any(conv["bias"]) and abs(float(conv["kernel"].std()) * math.sqrt(fan_in)
                                            - 1.0) < 0.1
    timm = vit.init_params(cfg, jax.random.key(0))
    np.testing.assert_array_equal(params["cls_token"], timm["cls_token"])
    with pytest.raises(ValueError, match="init_scheme"):
        vit.init_params(cfg, jax.random.key(0), "xavier")
