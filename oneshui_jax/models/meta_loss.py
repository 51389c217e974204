"""The learned loss ℓ_φ of MetaUnlearn: the reference's ``MetaLoss`` network (SPEC.md 6.1).

See also SPEC.md Q19 (sigmoid inputs) and Q30 (torch defaults kept here).

MetaUnlearn (``method/approaches/meta_unlearn.py``) meta-learns a small MLP that scores each
support image; at unlearning time the ViT takes one plain gradient step on the mean of these
scores. This module is that MLP, as a pure function of a plain nested-dict parameter pytree, so
it can be differentiated through ``jax.grad`` of ``jax.grad`` and jit-compiled with every array
passed as an argument.

Input per sample, in the reference's concatenation order (:func:`meta_inputs`, then
:func:`apply`)::

    [ sigmoid(logits) (C) | CLS feature (D, if use_feats) | target (C, if use_targets)
      | E[row] (embed_size, if use_ids) ]

* C = ``num_classes``; the probabilities use **sigmoid** even for classification (Q19).
* D = the ViT width (768 for ViT-B/16; :meth:`MetaLossConfig.for_vit` takes it from the model).
* target: the multi-hot labels (multilabel) or ``one_hot(y, C)`` (classification), as float.
* E is an ``Embedding(num_identities, embed_size)`` table; ``identity_rows`` index it (the caller
  maps identity ids to rows: the reference uses the identity's index in the TRAIN list).

``input_size = C + D·use_feats + C·use_targets + embed_size·use_ids``: 912 for CelebA / CelebA-HQ
(C = 40) and 848 for MUFAC (C = 8) with ViT-B and the defaults.

Layers (``MetaLoss.__init__``; H = ``hidden_size``, default 512)::

    input_block  : Linear(input_size, H) -> LayerNorm(H) -> Linear(H, H) -> GELU -> Dropout(p)
    hidden_blocks: num_layers x  x = x + block(x),
                   block = LN -> Linear -> GELU -> Dropout -> Linear -> GELU -> Dropout
    output_block : LayerNorm(H) -> Linear(H, 1) -> Softplus(beta=1, threshold=20)

LayerNorm eps is 1e-5 (torch's default, not Flax's 1e-6), GELU is the exact erf form (not Flax's
tanh default), dropout is inverted (kept units scaled by 1/(1-p)). :func:`apply` returns one
positive loss per sample; the reference's ``forward(..., reduce=True)`` is :func:`mean_loss`.
Dropout is active iff a ``dropout_rng`` is given: the reference's meta-nets are in ``.train()``
during meta-training and in ``.eval()`` at unlearning time.

Initialisation is PyTorch's default (Q30): every Linear has weight *and* bias
~ U(-1/sqrt(fan_in), 1/sqrt(fan_in)); the embedding ~ N(0, 1); LayerNorm scale 1, bias 0. The
values differ from torch's for the same seed (different RNGs); the distributions are the same.

``params`` layout (``hidden`` and ``embed`` are absent when ``num_layers == 0`` / ``not use_ids``;
hidden block indices are ``int`` keys; kernels are ``[in, out]``)::

    embed/embedding                     [num_identities, embed_size]  <-> embed.weight
    input_block/linear1/{kernel, bias}  [S, H], [H]       <-> input_block.0.{weight, bias}
    input_block/norm/{scale, bias}      [H]               <-> input_block.1.{weight, bias}
    input_block/linear2/{kernel, bias}  [H, H], [H]       <-> input_block.2.{weight, bias}
    hidden/{i}/norm/{scale, bias}       [H]               <-> hidden_blocks.{i}.0.{weight, bias}
    hidden/{i}/linear1/{kernel, bias}   [H, H], [H]       <-> hidden_blocks.{i}.1.{weight, bias}
    hidden/{i}/linear2/{kernel, bias}   [H, H], [H]       <-> hidden_blocks.{i}.4.{weight, bias}
    output_block/norm/{scale, bias}     [H]               <-> output_block.0.{weight, bias}
    output_block/linear/{kernel, bias}  [H, 1], [1]       <-> output_block.1.{weight, bias}

(S = ``input_size`` including the embedding). :func:`to_torch_state_dict` and
:func:`from_torch_state_dict` convert to and from the torch module's state dict (Linear weights
transposed), in its key order.

Switches (defaults are the reference's): ``use_feats``, ``use_ids``, ``use_targets``,
``num_layers``, ``hidden_size`` and ``dropout`` are the reference's own options
(``--use_feats/--use_ids/--use_targets/--num_layers/--hidden_size/--prob_dropout``).
``embed_size`` is a deviation when not 64: the reference hard-codes 64 (its
``--identity_embed_size`` is never passed, Q7). Dropout masks come from JAX's RNG and cannot
match torch's bit for bit (Q27).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from oneshui_jax.errors import ConfigError
from oneshui_jax.models.tree import Path, from_torch_layout, set_path, to_torch_layout

Params = dict[str, Any]
"""Nested dict of arrays as returned by :func:`init_params`."""


LN_EPS = 1e-5
"""LayerNorm epsilon of the meta-loss (torch's default)."""

SOFTPLUS_THRESHOLD = 20.0
"""torch's ``Softplus`` returns its input above this value."""

TASKS = ("multilabel", "classification")


@dataclasses.dataclass(frozen=True)
class MetaLossConfig:
    """Hyper-parameters of the meta-loss network (frozen and hashable: a static jit argument).

    Invalid values raise :class:`~oneshui_jax.errors.ConfigError` naming the field.
    """

    num_classes: int
    feature_dim: int
    num_identities: int
    task: str
    hidden_size: int = 512
    num_layers: int = 0
    embed_size: int = 64
    dropout: float = 0.5
    use_feats: bool = True
    use_ids: bool = True
    use_targets: bool = True

    def __post_init__(self) -> None:
        """Validate every field; the error message names the offending field."""
        for name in ("num_classes", "feature_dim", "hidden_size", "embed_size"):
            _check_int(name, getattr(self, name), minimum=1)
        _check_int("num_layers", self.num_layers, minimum=0)
        _check_int("num_identities", self.num_identities, minimum=1 if self.use_ids else 0)
        if self.task not in TASKS:
            raise ConfigError(f"MetaLossConfig.task must be one of {TASKS}, got {self.task!r}")
        dropout = self.dropout
        if (not isinstance(dropout, int | float) or isinstance(dropout, bool)
                or not 0.0 <= dropout < 1.0):
            raise ConfigError(f"MetaLossConfig.dropout must be a number in [0, 1), got {dropout!r}")
        for name in ("use_feats", "use_ids", "use_targets"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(
                    f"MetaLossConfig.{name} must be a bool, got {getattr(self, name)!r}")

    @classmethod
    def for_vit(cls, vit_cfg: Any, *, num_identities: int, task: str,
                **overrides: Any) -> MetaLossConfig:
        """The config for a backbone: ``num_classes`` and ``feature_dim`` (its width) from
        ``vit_cfg`` (a :class:`~oneshui_jax.models.vit.ViTConfig`)."""
        return cls(num_classes=vit_cfg.num_classes, feature_dim=vit_cfg.width,
                   num_identities=num_identities, task=task, **overrides)

    @property
    def features_size(self) -> int:
        """Width of :func:`meta_inputs`' output: the input without the identity embedding."""
        return (self.num_classes + self.feature_dim * self.use_feats
                + self.num_classes * self.use_targets)

    @property
    def input_size(self) -> int:
        """Width of the first Linear's input (the embedding included, if used)."""
        return self.features_size + self.embed_size * self.use_ids


def _check_int(name: str, value: Any, minimum: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ConfigError(f"MetaLossConfig.{name} must be an int >= {minimum}, got {value!r}")


# --------------------------------------------------------------------------------------------
# Initialisation
# --------------------------------------------------------------------------------------------


def _linear_shapes(cfg: MetaLossConfig) -> list[tuple[Path, int, int]]:
    """``(path, fan_in, fan_out)`` of every Linear, in torch's state-dict order."""
    h = cfg.hidden_size
    out = [(("input_block", "linear1"), cfg.input_size, h), (("input_block", "linear2"), h, h)]
    for i in range(cfg.num_layers):
        out += [(("hidden", i, "linear1"), h, h), (("hidden", i, "linear2"), h, h)]
    out.append((("output_block", "linear"), h, 1))
    return out


def _norm_paths(cfg: MetaLossConfig) -> list[Path]:
    return [("input_block", "norm"), *[("hidden", i, "norm") for i in range(cfg.num_layers)],
            ("output_block", "norm")]


def init_params(cfg: MetaLossConfig, rng: jax.Array) -> Params:
    """Fresh float32 parameters with PyTorch's default initialisation (layout: module docstring).

    Linear weight and bias ~ U(±1/sqrt(fan_in)); embedding ~ N(0, 1); LayerNorm scale 1, bias 0.
    """
    params: Params = {}
    linears = _linear_shapes(cfg)
    keys = jax.random.split(rng, 2 * len(linears) + 1)
    if cfg.use_ids:
        set_path(params, ("embed", "embedding"),
             jax.random.normal(keys[-1], (cfg.num_identities, cfg.embed_size), jnp.float32))
    for n, (path, fan_in, fan_out) in enumerate(linears):
        bound = 1.0 / math.sqrt(fan_in)
        set_path(params, (*path, "kernel"), jax.random.uniform(
            keys[2 * n], (fan_in, fan_out), jnp.float32, -bound, bound))
        set_path(params, (*path, "bias"), jax.random.uniform(
            keys[2 * n + 1], (fan_out,), jnp.float32, -bound, bound))
    for path in _norm_paths(cfg):
        set_path(params, (*path, "scale"), jnp.ones((cfg.hidden_size,), jnp.float32))
        set_path(params, (*path, "bias"), jnp.zeros((cfg.hidden_size,), jnp.float32))
    return params


# --------------------------------------------------------------------------------------------
# Forward pass
# --------------------------------------------------------------------------------------------


def meta_inputs(cfg: MetaLossConfig, logits: jax.Array, cls_features: jax.Array | None,
                labels: jax.Array | None) -> jax.Array:
    """Per-sample inputs ``[sigmoid(logits) | features | targets]``: float32 ``[B, features_size]``.

    ``labels``: multi-hot ``[B, C]`` (multilabel) or int class indices ``[B]`` (classification;
    one-hot ``[B, C]`` is accepted too). ``cls_features`` / ``labels`` may be None when
    ``use_feats`` / ``use_targets`` is off. The identity embedding is appended by :func:`apply`.
    """
    batch, c = logits.shape[0], cfg.num_classes
    if logits.shape != (batch, c):
        raise ValueError(f"logits must have shape [B, {c}], got {logits.shape}")
    dtype = jnp.promote_types(logits.dtype, jnp.float32)  # float32, or float64 in x64 tests
    parts = [jax.nn.sigmoid(logits.astype(dtype))]
    if cfg.use_feats:
        if cls_features is None or cls_features.shape != (batch, cfg.feature_dim):
            got = None if cls_features is None else cls_features.shape
            raise ValueError(
                f"cls_features must have shape [{batch}, {cfg.feature_dim}], got {got}")
        parts.append(cls_features.astype(dtype))
    if cfg.use_targets:
        if labels is None:
            raise ValueError("labels are required when use_targets is on")
        if cfg.task == "classification" and labels.shape == (batch,):
            targets = jax.nn.one_hot(labels, c, dtype=dtype)
        elif labels.shape == (batch, c):
            targets = labels.astype(dtype)
        else:
            expected = f"[{batch}] or [{batch}, {c}]" if cfg.task == "classification" else (
                f"[{batch}, {c}]")
            raise ValueError(f"labels must have shape {expected} for task {cfg.task!r}, "
                             f"got {labels.shape}")
        parts.append(targets)
    return jnp.concatenate(parts, axis=1)


def _linear(p: Mapping[str, jax.Array], x: jax.Array) -> jax.Array:
    return x @ p["kernel"] + p["bias"]


def _layer_norm(p: Mapping[str, jax.Array], x: jax.Array) -> jax.Array:
    mean = jnp.mean(x, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x - mean), axis=-1, keepdims=True)
    return (x - mean) * jax.lax.rsqrt(var + LN_EPS) * p["scale"] + p["bias"]


def _gelu(x: jax.Array) -> jax.Array:
    return jax.nn.gelu(x, approximate=False)


def _softplus(x: jax.Array) -> jax.Array:
    """torch's ``Softplus(beta=1, threshold=20)``."""
    return jnp.where(x > SOFTPLUS_THRESHOLD, x, jax.nn.softplus(x))


def _dropout(x: jax.Array, rate: float, rng: jax.Array | None) -> jax.Array:
    """Inverted dropout: zero with probability ``rate``, scale kept units by 1/(1-rate)."""
    if rng is None or rate == 0.0:
        return x
    keep = jax.random.bernoulli(rng, 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), jnp.zeros_like(x))


def apply(cfg: MetaLossConfig, params: Params, x: jax.Array, identity_rows: jax.Array | None,
          *, dropout_rng: jax.Array | None = None) -> jax.Array:
    """Per-sample learned losses, float32 ``[B]`` (positive).

    ``x`` is :func:`meta_inputs`' output ``[B, features_size]``; ``identity_rows`` are int rows of
    the embedding table ``[B]`` (ignored, may be None, when ``use_ids`` is off). Dropout is applied
    iff ``dropout_rng`` is given. Pure: jit with ``static_argnums=0``; safe under nested grad.
    """
    x = x.astype(jnp.promote_types(x.dtype, jnp.float32))
    if x.ndim != 2 or x.shape[1] != cfg.features_size:
        raise ValueError(f"x must have shape [B, {cfg.features_size}], got {x.shape}")
    if cfg.use_ids:
        if identity_rows is None or identity_rows.shape != (x.shape[0],):
            got = None if identity_rows is None else identity_rows.shape
            raise ValueError(f"identity_rows must have shape [{x.shape[0]}], got {got}")
        x = jnp.concatenate([x, jnp.take(params["embed"]["embedding"], identity_rows, axis=0)],
                            axis=1)
    n_sites = 1 + 2 * cfg.num_layers
    rngs = [None] * n_sites if dropout_rng is None else list(jax.random.split(dropout_rng, n_sites))

    p = params["input_block"]
    h = _linear(p["linear2"], _layer_norm(p["norm"], _linear(p["linear1"], x)))
    h = _dropout(_gelu(h), cfg.dropout, rngs[0])
    for i in range(cfg.num_layers):
        p = params["hidden"][i]
        r = _dropout(_gelu(_linear(p["linear1"], _layer_norm(p["norm"], h))), cfg.dropout,
                     rngs[1 + 2 * i])
        r = _dropout(_gelu(_linear(p["linear2"], r)), cfg.dropout, rngs[2 + 2 * i])
        h = h + r
    p = params["output_block"]
    return _softplus(_linear(p["linear"], _layer_norm(p["norm"], h)))[:, 0]


def mean_loss(cfg: MetaLossConfig, params: Params, x: jax.Array, identity_rows: jax.Array | None,
              *, dropout_rng: jax.Array | None = None) -> jax.Array:
    """The reference's ``MetaLoss.forward(x, id, reduce=True)``: the batch mean of :func:`apply`."""
    return jnp.mean(apply(cfg, params, x, identity_rows, dropout_rng=dropout_rng))


# --------------------------------------------------------------------------------------------
# torch state-dict conversion
# --------------------------------------------------------------------------------------------

_TORCH_MODULES: dict[tuple[str, ...], str] = {
    ("input_block", "linear1"): "input_block.0",
    ("input_block", "norm"): "input_block.1",
    ("input_block", "linear2"): "input_block.2",
    ("hidden", "norm"): "0",
    ("hidden", "linear1"): "1",
    ("hidden", "linear2"): "4",
    ("output_block", "norm"): "output_block.0",
    ("output_block", "linear"): "output_block.1",
}
"""Our module path (block index removed) -> the torch module name (index inside the Sequential)."""


def _param_paths(cfg: MetaLossConfig) -> list[Path]:
    """Every parameter path, in the torch module's state-dict order."""
    paths: list[Path] = [("embed", "embedding")] if cfg.use_ids else []
    blocks: list[Path] = [("input_block", "linear1"), ("input_block", "norm"),
                          ("input_block", "linear2")]
    for i in range(cfg.num_layers):
        blocks += [("hidden", i, "norm"), ("hidden", i, "linear1"), ("hidden", i, "linear2")]
    blocks += [("output_block", "norm"), ("output_block", "linear")]
    for block in blocks:
        first = "scale" if block[-1] == "norm" else "kernel"
        paths += [(*block, first), (*block, "bias")]
    return paths


def _torch_key(path: Path) -> str:
    """The torch state-dict key of the parameter at ``path``."""
    if path[0] == "embed":
        return "embed.weight"
    leaf = "bias" if path[-1] == "bias" else "weight"
    if path[0] == "hidden":
        module = f"hidden_blocks.{path[1]}.{_TORCH_MODULES[('hidden', path[2])]}"
    else:
        module = _TORCH_MODULES[(path[0], path[1])]
    return f"{module}.{leaf}"


def _config_of(params: Params) -> MetaLossConfig:
    """A config with this parameter tree's structure (sizes partly placeholders)."""
    embed = params.get("embed", {}).get("embedding")
    kernel = params["input_block"]["linear1"]["kernel"]
    return MetaLossConfig(
        num_classes=1, feature_dim=1, num_identities=0 if embed is None else embed.shape[0],
        task="multilabel", hidden_size=kernel.shape[1], num_layers=len(params.get("hidden", {})),
        embed_size=64 if embed is None else embed.shape[1], use_ids=embed is not None)


def _rules(cfg: MetaLossConfig) -> dict[str, tuple[Path, tuple[int, ...] | None]]:
    """torch key -> (our path, axis permutation): Linear kernels are transposed."""
    return {_torch_key(path): (path, (1, 0) if path[-1] == "kernel" else None)
            for path in _param_paths(cfg)}


def torch_state_dict_keys(cfg: MetaLossConfig) -> list[str]:
    """The torch ``MetaLoss``'s state-dict keys for ``cfg``, in its order."""
    return [_torch_key(path) for path in _param_paths(cfg)]


def to_torch_state_dict(params: Params) -> dict[str, np.ndarray]:
    """Our params -> the torch module's state dict (numpy; Linear weights ``[out, in]``)."""
    return to_torch_layout(params, _rules(_config_of(params)))


def from_torch_state_dict(cfg: MetaLossConfig, state_dict: Mapping[str, Any]) -> Params:
    """The torch module's state dict (numpy-convertible values) -> our float32 params for ``cfg``.

    Raises one ``ValueError`` listing every missing, unexpected and mis-shaped key.
    """
    abstract = jax.eval_shape(lambda: init_params(cfg, jax.random.key(0)))
    return from_torch_layout(abstract, _rules(cfg), state_dict,
                             f"torch MetaLoss state dict for {cfg}")


