"""Vision Transformer: the ViT-B/16 backbone of the paper, in Flax NNX with a functional core.

The paper fine-tunes timm's ``vit_base_patch16_224`` (weights ``augreg2_in21k_ft_in1k``) whose
input normalisation is mean = std = 0.5 per channel, i.e. images in [-1, 1]. This module
reproduces that architecture exactly (same tensors, same shapes, same computation) and scales
down to tiny presets for tests and CPU demos:

* patch embedding: Conv(in_chans -> width), kernel = stride = patch size, no padding;
* a class token, then a learned position embedding over 1 + num_patches tokens added after
  concatenating the class token;
* ``depth`` pre-norm blocks ``x += attn(norm1(x)); x += mlp(norm2(x))`` with a fused qkv
  projection (split in timm's ``[B, T, 3, heads, head_dim]`` order), plain-jnp scaled
  dot-product attention (no fused kernels, so grad-of-grad works), exact erf GELU;
* a final LayerNorm (eps 1e-6 everywhere) and a linear head on the class token.

There is no dropout and no drop-path.

Initialisation draws from timm's default distributions (``init_weights_vit_timm``, what
``timm.create_model(pretrained=False)`` gives, e.g. Bad Teacher's random teacher, SPEC 3): every
Linear (head included) has a ``trunc_normal_(std=.02)`` kernel and zero bias, ``pos_embed`` is
``trunc_normal_(std=.02)``; timm truncates at a=-2, b=2 in absolute units, 100 std out, so these
are normals of std 0.02 in effect (:func:`timm_trunc_normal`); ``cls_token`` is normal std 1e-6;
LayerNorms have scale 1, bias 0; the patch-embedding conv keeps PyTorch's default Conv2d init,
U(+-1/sqrt(fan_in)) for kernel and bias (:func:`torch_default_uniform`). The same distributions,
not the same numbers: the draws come from JAX's random streams, not torch's. ``init_params(...,
scheme="lecun")`` is the other scheme (:data:`INIT_SCHEMES`), which the from-scratch demos keep.

**Mixed precision as ``torch.autocast(bfloat16)`` runs timm's ViT.** With ``dtype=jnp.bfloat16``
the parameters stay float32 and only the convolution and matmuls compute (and return) bf16: the
class token and ``pos_embed`` are float32, so the residual stream ``cat([cls, patches]) +
pos_embed`` is float32 (autocast's ``cat`` promotes to its widest input) and each block adds its
bf16 branch output into it (``x + attn(norm1(x))`` stays float32); LayerNorms compute and return
float32; the attention softmax runs in float32; GELU runs on the bf16 ``fc1`` output; the logits
are the head's bf16 output (returned as float32 values). With float32 (or no) ``dtype`` nothing is
cast.

Functional API (pure, jit-able, nestable in ``jax.grad(jax.grad(...))``)::

    params = init_params(cfg, jax.random.key(0))
    logits, cls_features = apply(cfg, params, images, dtype=jnp.bfloat16)
    logits, cls_features = apply(cfg, params, images, remat=True)  # less memory in grads
    logits, cls_features, inputs = apply(cfg, params, images, capture_inputs=True)

``remat=True`` wraps each transformer block in ``jax.checkpoint``: the backward pass recomputes
a block's activations from its input instead of keeping them, so a gradient holds one
``[B, T, D]`` tensor per block plus one block's activations (bench/remat_memory.py). The forward
computation is unchanged, the gradients equal to float tolerance, and it composes with nested
``jax.grad`` (MetaUnlearn's meta-gradient).

``capture_inputs=True`` also returns the input of every dense layer (the patch projection, per
block ``attn.qkv``, ``attn.proj``, ``mlp.fc1``, ``mlp.fc2``, and the head: 50 layers for ViT-B/16),
keyed by the path of that layer's kernel (:func:`dense_kernel_paths`), as the model computes them
(PGU's activation covariances). Without it the traced computation is exactly the plain forward.

``params`` is a plain nested dict of arrays with this layout (block indices are ``int`` keys)::

    cls_token                              [1, 1, D]
    pos_embed                              [1, 1 + P, D]
    patch_embed/proj/{kernel [p, p, C, D], bias [D]}
    blocks/{i}/norm1/{scale, bias}         [D]
    blocks/{i}/attn/qkv/{kernel [D, 3D], bias [3D]}
    blocks/{i}/attn/proj/{kernel [D, D], bias [D]}
    blocks/{i}/norm2/{scale, bias}         [D]
    blocks/{i}/mlp/fc1/{kernel [D, H], bias [H]}
    blocks/{i}/mlp/fc2/{kernel [H, D], bias [D]}
    norm/{scale, bias}                     [D]
    head/{kernel [D, num_classes], bias [num_classes]}

Each leaf maps to exactly one timm state-dict key by a rule table (path joined with ``.``,
``kernel``/``scale`` -> ``weight``, Linear kernels transposed, conv kernels HWIO -> OIHW); see
:func:`timm_keys` and :func:`torch_axes` (the one table, also used by
:mod:`oneshui_jax.models.pretrained`), :func:`to_timm_state_dict` and :func:`from_timm_state_dict`.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from oneshui_jax.errors import ConfigError
from oneshui_jax.models.tree import Path, from_torch_layout, get_path, to_torch_layout

Params = dict[str, Any]
"""Nested dict of arrays as returned by :func:`init_params` (block indices are int keys)."""


LN_EPS = 1e-6
"""LayerNorm epsilon used everywhere (timm's ViT)."""

_PRESETS: dict[str, dict[str, Any]] = {
    "vit_base_patch16_224": dict(
        image_size=224, patch_size=16, width=768, depth=12, num_heads=12, mlp_ratio=4.0
    ),
    "vit_tiny_test": dict(image_size=32, patch_size=8, width=32, depth=2, num_heads=2),
    # 17 tokens, 0.47M params: about 1,800 32x32 images/s in training on 2 CPU cores (batch 64)
    "vit_small_demo": dict(image_size=32, patch_size=8, width=96, depth=4, num_heads=3),
}


@dataclasses.dataclass(frozen=True)
class ViTConfig:
    """Architecture hyper-parameters (frozen and hashable, so usable as a static jit argument).

    Defaults are ViT-B/16 at 224 with a 1000-way head. Invalid values raise
    :class:`~oneshui_jax.errors.ConfigError` (a ``ValueError``) naming the field.
    """

    image_size: int = 224
    patch_size: int = 16
    width: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_ratio: float = 4.0
    num_classes: int = 1000
    in_chans: int = 3

    def __post_init__(self) -> None:
        """Validate every field; the error message names the offending field."""
        for name in ("image_size", "patch_size", "width", "depth", "num_heads", "num_classes",
                     "in_chans"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"ViTConfig.{name} must be a positive int, got {value!r}")
        if not (isinstance(self.mlp_ratio, int | float) and self.mlp_ratio > 0):
            raise ConfigError(
                f"ViTConfig.mlp_ratio must be a positive number, got {self.mlp_ratio!r}"
            )
        if self.image_size % self.patch_size:
            raise ConfigError(
                f"ViTConfig.image_size ({self.image_size}) must be divisible by "
                f"ViTConfig.patch_size ({self.patch_size})"
            )
        if self.width % self.num_heads:
            raise ConfigError(
                f"ViTConfig.width ({self.width}) must be divisible by "
                f"ViTConfig.num_heads ({self.num_heads})"
            )
        if int(self.width * self.mlp_ratio) <= 0:
            raise ConfigError(f"ViTConfig.mlp_ratio ({self.mlp_ratio}) gives an empty MLP")

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> ViTConfig:
        """A named preset (``vit_base_patch16_224``, ``vit_tiny_test``, ``vit_small_demo``).

        ``overrides`` replace preset fields, e.g. ``num_classes=40``.
        """
        if name not in _PRESETS:
            raise ConfigError(f"unknown ViT preset {name!r}; known presets: {sorted(_PRESETS)}")
        return cls(**{**_PRESETS[name], **overrides})

    @property
    def grid_size(self) -> int:
        """Patches per image side."""
        return self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:
        """Number of patch tokens P."""
        return self.grid_size**2

    @property
    def head_dim(self) -> int:
        """Per-head channel count."""
        return self.width // self.num_heads

    @property
    def mlp_hidden(self) -> int:
        """MLP hidden width, ``int(width * mlp_ratio)`` as in timm."""
        return int(self.width * self.mlp_ratio)


# --------------------------------------------------------------------------------------------
# NNX modules
# --------------------------------------------------------------------------------------------

def timm_trunc_normal(std: float = 0.02, a: float = -2.0, b: float = 2.0):
    """timm's ``trunc_normal_(tensor, std=std, a=a, b=b)`` as an initializer: a normal of std
    ``std`` kept within ``[a, b]`` in **absolute** units (timm's bounds are not multiples of
    the std). At std 0.02 the bounds lie 100 std out, so it is a plain normal of std 0.02 in
    effect (about 4.6% of the values lie beyond 2 std).

    Drawn as a normal and clipped to ``[a, b]``: the same as truncating wherever the bounds are
    out of reach (a float32 normal draw stays within about 6 std). ``jax.random.truncated_normal``
    with bounds 100 std out is not used: its inverse-CDF draw puts a few values on the bounds
    themselves (about 1 in 10^7 at +-2)."""
    if not a < b:
        raise ValueError(f"timm_trunc_normal: a ({a}) must be below b ({b})")

    def init(key: jax.Array, shape, dtype: Any = jnp.float32) -> jax.Array:
        return jnp.clip(std * jax.random.normal(key, shape, jnp.float32), a, b).astype(dtype)

    return init


def torch_default_uniform(fan_in: int):
    """PyTorch's default ``Conv2d`` / ``Linear`` initialisation of weight and bias alike,
    ``kaiming_uniform_(a=sqrt(5))`` for the weight: U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
    bound = 1.0 / math.sqrt(fan_in)

    def init(key: jax.Array, shape, dtype: Any = jnp.float32) -> jax.Array:
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


INIT_SCHEMES = ("timm", "lecun")
"""How fresh weights are drawn (``init_params``; ``config.model.init_scheme``):

* ``"timm"``: timm's distributions (module docstring), what the reference's fresh weights
  follow (its new head, Bad Teacher's random teacher);
* ``"lecun"``: std-0.02 normals truncated at 2 std (not at timm's +-2 absolute) and a
  LeCun-normal patch convolution with zero bias, as timm's ``jax`` mode draws that conv. The
  from-scratch demos (``configs/synthfaces.py``, the MUFAC CPU profile) keep it: their results
  were measured with it, and their tiny models memorise their training faces more with it.
"""


def _std_normal(scheme: str):
    """The std-0.02 initializer of Linear kernels and ``pos_embed`` for ``scheme``."""
    if scheme == "timm":
        return timm_trunc_normal(0.02)
    return nnx.initializers.truncated_normal(stddev=0.02)  # truncated at +-2 std


def check_init_scheme(scheme: str) -> None:
    """A ConfigError naming ``config.model.init_scheme`` unless ``scheme`` is one of
    :data:`INIT_SCHEMES`."""
    if scheme not in INIT_SCHEMES:
        raise ConfigError(f"config.model.init_scheme must be one of {INIT_SCHEMES}, got "
                          f"{scheme!r}")


def _linear(d_in: int, d_out: int, dtype: Any, rngs: nnx.Rngs, init: str = "timm") -> nnx.Linear:
    """timm-initialised Linear: ``trunc_normal_(std=.02)`` kernel (``init``: the scheme of
    :data:`INIT_SCHEMES`), zero bias."""
    return nnx.Linear(d_in, d_out, dtype=dtype, kernel_init=_std_normal(init),
                      bias_init=nnx.initializers.zeros_init(), rngs=rngs)


def _layer_norm(width: int, rngs: nnx.Rngs) -> nnx.LayerNorm:
    """LayerNorm with eps 1e-6, two-pass statistics, scale 1 and bias 0. It computes and returns
    the dtype of its input and parameters (the residual stream: float32 under bf16 compute, as
    autocast runs ``layer_norm`` in float32), never the half-precision compute dtype."""
    return nnx.LayerNorm(width, epsilon=LN_EPS, dtype=None, use_fast_variance=False, rngs=rngs)


Tap = Callable[[Path, jax.Array], None] | None
"""Receives ``(kernel path relative to the module, input of that dense layer)`` when capturing."""


def _scoped(tap: Tap, *prefix: str | int) -> Tap:
    """``tap`` for a submodule at ``prefix`` (None stays None: nothing is captured)."""
    if tap is None:
        return None
    return lambda path, x: tap((*prefix, *path), x)


def _at_least_f32(x: jax.Array) -> jax.Array:
    """Cast half-precision arrays to float32; float32 and float64 pass through."""
    return x.astype(jnp.promote_types(x.dtype, jnp.float32))


ATTENTION_IMPLEMENTATIONS = ("xla", "cudnn")
"""``xla``: plain jnp attention, differentiable to any order (MetaUnlearn needs grad-of-grad).
``cudnn``: cuDNN's fused kernel (GPU only, first order only: pretrain, retrain, evaluation);
1.31x the training throughput of ``xla`` for ViT-B/16 on an H100 (bench/attention_variants.py)."""


def fused_attention(q: jax.Array, k: jax.Array, v: jax.Array, implementation: str) -> jax.Array:
    """``jax.nn.dot_product_attention`` on [B, T, heads, head_dim] inputs.

    cuDNN does not take every sequence length (ViT-B/16's 197 tokens are refused), so the tokens
    are padded to a multiple of 64 and the padding is masked out by sequence length.
    """
    t = q.shape[1]
    pad = [(0, 0), (0, -(-t // 64) * 64 - t), (0, 0), (0, 0)]
    lengths = jnp.full((q.shape[0],), t, jnp.int32)
    out = jax.nn.dot_product_attention(
        jnp.pad(q, pad), jnp.pad(k, pad), jnp.pad(v, pad), query_seq_lengths=lengths,
        key_value_seq_lengths=lengths, implementation=implementation)
    return out[:, :t]


class Attention(nnx.Module):
    """Multi-head self-attention with a fused qkv projection, as timm's ``Attention``."""

    def __init__(self, cfg: ViTConfig, *, dtype: Any = None, attention: str = "xla",
                 rngs: nnx.Rngs, init: str = "timm") -> None:
        if attention not in ATTENTION_IMPLEMENTATIONS:
            raise ConfigError(f"attention must be one of {ATTENTION_IMPLEMENTATIONS}, "
                              f"got {attention!r}")
        self.implementation = attention
        self.num_heads = cfg.num_heads
        self.qkv = _linear(cfg.width, 3 * cfg.width, dtype, rngs, init)
        self.proj = _linear(cfg.width, cfg.width, dtype, rngs, init)

    def __call__(self, x: jax.Array, tap: Tap = None) -> jax.Array:
        """``x`` [B, T, D] -> [B, T, D]; softmax(q k^T / sqrt(head_dim)) v, softmax in >= f32."""
        b, t, d = x.shape
        head_dim = d // self.num_heads
        if tap is not None:
            tap(("qkv", "kernel"), x)
        qkv = self.qkv(x).reshape(b, t, 3, self.num_heads, head_dim)
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]  # each [B, T, heads, head_dim]
        if self.implementation != "xla":
            out = fused_attention(q, k, v, self.implementation).reshape(b, t, d)
        else:
            scores = _at_least_f32(jnp.einsum("bqhd,bkhd->bhqk", q, k)) / math.sqrt(head_dim)
            weights = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
            out = jnp.einsum("bhqk,bkhd->bqhd", weights, v).reshape(b, t, d)
        if tap is not None:
            tap(("proj", "kernel"), out)
        return self.proj(out)


class Mlp(nnx.Module):
    """fc1 -> exact (erf) GELU -> fc2, as timm's ``Mlp``."""

    def __init__(self, cfg: ViTConfig, *, dtype: Any = None, rngs: nnx.Rngs,
                 init: str = "timm") -> None:
        self.fc1 = _linear(cfg.width, cfg.mlp_hidden, dtype, rngs, init)
        self.fc2 = _linear(cfg.mlp_hidden, cfg.width, dtype, rngs, init)

    def __call__(self, x: jax.Array, tap: Tap = None) -> jax.Array:
        """``x`` [..., D] -> [..., D]."""
        if tap is not None:
            tap(("fc1", "kernel"), x)
        hidden = jax.nn.gelu(self.fc1(x), approximate=False)
        if tap is not None:
            tap(("fc2", "kernel"), hidden)
        return self.fc2(hidden)


class Block(nnx.Module):
    """Pre-norm transformer block: ``x + attn(norm1(x))`` then ``x + mlp(norm2(x))``."""

    def __init__(self, cfg: ViTConfig, *, dtype: Any = None, attention: str = "xla",
                 rngs: nnx.Rngs, init: str = "timm") -> None:
        self.norm1 = _layer_norm(cfg.width, rngs)
        self.attn = Attention(cfg, dtype=dtype, attention=attention, rngs=rngs, init=init)
        self.norm2 = _layer_norm(cfg.width, rngs)
        self.mlp = Mlp(cfg, dtype=dtype, rngs=rngs, init=init)

    def __call__(self, x: jax.Array, tap: Tap = None) -> jax.Array:
        """``x`` [B, T, D] -> [B, T, D]."""
        x = x + self.attn(self.norm1(x), _scoped(tap, "attn"))
        return x + self.mlp(self.norm2(x), _scoped(tap, "mlp"))


def checkpointed_block(block: Block, x: jax.Array) -> jax.Array:
    """``block(x)`` under ``jax.checkpoint``: only ``x`` (and the block's parameters) are kept for
    the backward pass, which recomputes the block's activations (per-block rematerialisation).

    The block is split into its structure and parameter pytree so that the parameters enter the
    checkpointed function as arguments (differentiable, never captured as constants).
    """
    graphdef, state = nnx.split(block)

    def run(state, x):
        return nnx.merge(graphdef, state)(x)

    return jax.checkpoint(run)(state, x)


class PatchEmbed(nnx.Module):
    """Non-overlapping patch projection (timm's ``PatchEmbed``): NHWC images -> [B, P, D]."""

    def __init__(self, cfg: ViTConfig, *, dtype: Any = None, rngs: nnx.Rngs,
                 init: str = "timm") -> None:
        p = cfg.patch_size
        if init == "timm":  # timm keeps torch's default Conv2d init
            kernel_init = bias_init = torch_default_uniform(cfg.in_chans * p * p)
        else:
            kernel_init, bias_init = nnx.initializers.lecun_normal(), nnx.initializers.zeros_init()
        self.proj = nnx.Conv(cfg.in_chans, cfg.width, (p, p), strides=(p, p), padding="VALID",
                             dtype=dtype, kernel_init=kernel_init, bias_init=bias_init,
                             rngs=rngs)

    def __call__(self, images: jax.Array, tap: Tap = None) -> jax.Array:
        """``images`` [B, H, W, C] -> tokens [B, (H/p)*(W/p), D] in row-major patch order."""
        if tap is not None:
            tap(("proj", "kernel"), images)
        x = self.proj(images)
        return x.reshape(x.shape[0], -1, x.shape[-1])


class VisionTransformer(nnx.Module):
    """ViT with a class-token head (timm ``VisionTransformer``, ``global_pool='token'``).

    ``dtype`` is the compute dtype (None: that of the parameters and inputs); parameters are
    float32. ``__call__`` returns ``(logits, cls_features)`` in at least float32. ``remat``: each
    block runs under ``jax.checkpoint`` (:func:`checkpointed_block`), except when capturing.
    """

    def __init__(self, cfg: ViTConfig, *, dtype: Any = None, attention: str = "xla",
                 remat: bool = False, rngs: nnx.Rngs, init: str = "timm") -> None:
        check_init_scheme(init)
        self.cfg = cfg
        self.remat = bool(remat)
        self.patch_embed = PatchEmbed(cfg, dtype=dtype, rngs=rngs, init=init)
        self.cls_token = nnx.Param(
            1e-6 * jax.random.normal(rngs.params(), (1, 1, cfg.width), jnp.float32)
        )
        self.pos_embed = nnx.Param(
            _std_normal(init)(rngs.params(), (1, 1 + cfg.num_patches, cfg.width), jnp.float32)
        )
        self.blocks = nnx.List([Block(cfg, dtype=dtype, attention=attention, rngs=rngs,
                                      init=init) for _ in range(cfg.depth)])
        self.norm = _layer_norm(cfg.width, rngs)
        self.head = _linear(cfg.width, cfg.num_classes, dtype, rngs, init)

    def forward_features(self, images: jax.Array, tap: Tap = None) -> jax.Array:
        """NHWC images in [-1, 1] -> tokens [B, 1 + P, D] after the final norm (compute dtype).

        ``tap`` (optional) receives the input of every dense layer, keyed by its kernel path.
        """
        x = self.patch_embed(images, _scoped(tap, "patch_embed"))  # the compute dtype
        # The residual stream: autocast's ``cat`` promotes to its widest input, the float32 class
        # token, and ``+ pos_embed`` stays float32; every block adds its (compute dtype) branch
        # outputs into it. Without a half-precision compute dtype nothing is cast.
        stream = jnp.promote_types(x.dtype, self.cls_token[...].dtype)
        cls = jnp.broadcast_to(self.cls_token[...].astype(stream), (x.shape[0], 1, x.shape[-1]))
        x = jnp.concatenate([cls, x.astype(stream)], axis=1) + self.pos_embed[...].astype(stream)
        for i, block in enumerate(self.blocks):
            if self.remat and tap is None:
                x = checkpointed_block(block, x)
            else:
                x = block(x, _scoped(tap, "blocks", i))
        return self.norm(x)

    def __call__(self, images: jax.Array, tap: Tap = None) -> tuple[jax.Array, jax.Array]:
        """NHWC images -> ``(logits [B, num_classes], cls_features [B, D])``, >= float32.

        ``cls_features`` is the class token after the final norm, i.e. the head's input.
        """
        cls_features = self.forward_features(images, tap)[:, 0]
        if tap is not None:
            tap(("head", "kernel"), cls_features)
        logits = self.head(cls_features)
        return _at_least_f32(logits), _at_least_f32(cls_features)


# --------------------------------------------------------------------------------------------
# Functional core
# --------------------------------------------------------------------------------------------


def init_params(cfg: ViTConfig, rng: jax.Array, scheme: str = "timm") -> Params:
    """Freshly initialised float32 parameters as a plain nested dict (layout: module docstring),
    drawn by ``scheme`` (:data:`INIT_SCHEMES`; timm's distributions by default).

    Works under ``jax.eval_shape(functools.partial(init_params, cfg), rng)`` to get shapes only.
    """
    model = VisionTransformer(cfg, rngs=nnx.Rngs(params=rng), init=scheme)
    return nnx.state(model, nnx.Param).to_pure_dict()


@functools.cache
def _graphdef(cfg: ViTConfig, dtype: np.dtype | None, attention: str = "xla",
              remat: bool = False) -> nnx.GraphDef:
    """The module structure for ``(cfg, compute dtype, attention, remat)``, built once,
    abstractly (no weights)."""
    abstract = nnx.eval_shape(
        lambda: VisionTransformer(cfg, dtype=dtype, attention=attention, remat=remat,
                                  rngs=nnx.Rngs(0)))
    return nnx.split(abstract)[0]


def apply(
    cfg: ViTConfig, params: Params, images: jax.Array, *, dtype: Any = None,
    attention: str = "xla", capture_inputs: bool = False, remat: bool = False,
) -> tuple[jax.Array, jax.Array] | tuple[jax.Array, jax.Array, dict[Path, jax.Array]]:
    """Pure forward pass: NHWC images in [-1, 1] -> ``(logits, cls_features)``.

    ``dtype`` is the compute dtype of the convolution and the matmuls (e.g. ``jnp.bfloat16``,
    as ``torch.autocast`` runs them; module docstring): the residual stream, the LayerNorms and
    the attention softmax stay float32, and both outputs are returned in float32 (float64 if
    parameters and images are float64 and ``dtype`` is None). Jit it with
    ``jax.jit(apply, static_argnums=0, static_argnames=("dtype", "attention", "remat"))``. With
    the default ``attention="xla"`` it is safe under nested ``jax.grad``; ``"cudnn"`` (GPU) is
    faster for first-order work (see ``ATTENTION_IMPLEMENTATIONS``).

    ``remat=True`` checkpoints every block (``jax.checkpoint``): the same forward computation,
    gradients that keep one block's activations at a time instead of all of them, at the cost of
    recomputing each block's forward in the backward pass. It changes nothing without a gradient
    and cannot be combined with ``capture_inputs`` (a ConfigError).

    ``capture_inputs=True`` returns ``(logits, cls_features, inputs)``: ``inputs`` maps the kernel
    path of every dense layer (:func:`dense_kernel_paths`, e.g. ``("blocks", 0, "attn", "qkv",
    "kernel")``) to the input that layer received in this pass: the images [B, H, W, C] for the
    patch projection (a conv: unfolding them is the caller's business), tokens [B, T, D_in] for
    the block layers and the class features [B, D] for the head, each in the dtype the layer
    receives before its own cast (float32 LayerNorm outputs for ``qkv``, ``fc1`` and the head;
    the compute dtype for ``proj`` and ``fc2``). The
    default (False) traces exactly the plain forward pass.
    """
    if remat and capture_inputs:
        raise ConfigError("vit.apply: capture_inputs reads every block's inside, which remat "
                          "hides behind jax.checkpoint; use one or the other")
    graphdef = _graphdef(cfg, None if dtype is None else jnp.dtype(dtype), attention,
                         bool(remat))
    model = nnx.merge(graphdef, params)
    if not capture_inputs:
        return model(images)
    inputs: dict[Path, jax.Array] = {}
    logits, cls_features = model(images, inputs.__setitem__)
    return logits, cls_features, inputs


def dense_kernel_paths(cfg: ViTConfig) -> list[Path]:
    """Kernel path of every dense layer in forward order: the patch projection, per block
    ``attn.qkv``, ``attn.proj``, ``mlp.fc1``, ``mlp.fc2``, then the head (50 for ViT-B/16)."""
    paths: list[Path] = [("patch_embed", "proj", "kernel")]
    for i in range(cfg.depth):
        paths += [("blocks", i, *layer, "kernel") for layer in
                  (("attn", "qkv"), ("attn", "proj"), ("mlp", "fc1"), ("mlp", "fc2"))]
    return paths + [("head", "kernel")]


def count_params(params: Params) -> int:
    """Total number of scalar parameters (works on arrays and ``jax.ShapeDtypeStruct`` leaves)."""
    return sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(params))


# --------------------------------------------------------------------------------------------
# timm state-dict conversion
# --------------------------------------------------------------------------------------------

_BLOCK_LEAVES: tuple[Path, ...] = (
    ("norm1", "scale"), ("norm1", "bias"),
    ("attn", "qkv", "kernel"), ("attn", "qkv", "bias"),
    ("attn", "proj", "kernel"), ("attn", "proj", "bias"),
    ("norm2", "scale"), ("norm2", "bias"),
    ("mlp", "fc1", "kernel"), ("mlp", "fc1", "bias"),
    ("mlp", "fc2", "kernel"), ("mlp", "fc2", "bias"),
)
"""Per-block parameter paths in timm's state-dict order."""

_LEAF_NAMES: dict[str, str] = {"kernel": "weight", "scale": "weight"}
"""Our leaf name -> timm's (``bias`` and the bare ``cls_token``/``pos_embed`` are unchanged)."""

_KERNEL_TO_TORCH: dict[int, tuple[int, ...]] = {
    2: (1, 0),  # Linear [in, out] -> torch [out, in]
    4: (3, 2, 0, 1),  # Conv HWIO -> torch OIHW
}
"""Kernel ndim -> axis permutation from our layout to torch's; other leaves keep their layout."""


def _param_paths(depth: int) -> list[Path]:
    """Every parameter path of a ``depth``-block model, in timm's state-dict order."""
    paths: list[Path] = [
        ("cls_token",), ("pos_embed",),
        ("patch_embed", "proj", "kernel"), ("patch_embed", "proj", "bias"),
    ]
    for i in range(depth):
        paths += [("blocks", i, *leaf) for leaf in _BLOCK_LEAVES]
    paths += [("norm", "scale"), ("norm", "bias"), ("head", "kernel"), ("head", "bias")]
    return paths


def _timm_key(path: Path) -> str:
    """timm state-dict key of the parameter at ``path`` (path joined by dots, leaf renamed)."""
    return ".".join(str(p) for p in (*path[:-1], _LEAF_NAMES.get(str(path[-1]), path[-1])))


def timm_keys(depth: int) -> dict[str, Path]:
    """timm state-dict key -> our parameter path for a ``depth``-block ViT, in timm's order.

    The one table between the two namings (:func:`to_timm_state_dict`,
    :func:`from_timm_state_dict` and :func:`oneshui_jax.models.pretrained.timm_to_ours`).
    """
    return {_timm_key(path): path for path in _param_paths(depth)}


def torch_axes(path: Path, ndim: int) -> tuple[int, ...] | None:
    """Axis permutation from our layout to torch's for the parameter at ``path`` of rank ``ndim``
    (None: the same layout); a ``ValueError`` for a kernel of a rank no layer has."""
    if path[-1] != "kernel":
        return None
    if ndim not in _KERNEL_TO_TORCH:
        raise ValueError(f"{'.'.join(map(str, path))}: a kernel of rank {ndim}; expected "
                         f"{' or '.join(map(str, _KERNEL_TO_TORCH))}")
    return _KERNEL_TO_TORCH[ndim]


def timm_state_dict_keys(cfg: ViTConfig) -> list[str]:
    """timm's state-dict keys for this architecture, in timm's order (152 for ViT-B/16)."""
    return list(timm_keys(cfg.depth))


def to_timm_state_dict(params: Params) -> dict[str, np.ndarray]:
    """Our params -> timm state dict (numpy, torch layouts), in timm's key order."""
    rules = {key: (path, torch_axes(path, np.ndim(get_path(params, path))))
             for key, path in timm_keys(len(params["blocks"])).items()}
    return to_torch_layout(params, rules)


def from_timm_state_dict(cfg: ViTConfig, state_dict: Mapping[str, Any]) -> Params:
    """timm state dict (numpy-convertible values) -> our float32 params for ``cfg``.

    Raises one ``ValueError`` listing every missing, unexpected and mis-shaped key.
    """
    abstract = jax.eval_shape(functools.partial(init_params, cfg), jax.random.key(0))
    rules = {key: (path, torch_axes(path, len(get_path(abstract, path).shape)))
             for key, path in timm_keys(cfg.depth).items()}
    return from_torch_layout(abstract, rules, state_dict, f"timm state dict for {cfg}")
