"""ImageNet ViT-B/16 weights from local files: the reference's starting point (SPEC.md section 3).

The reference starts every ViT-B/16 from timm's ``vit_base_patch16_224`` with the
``augreg2_in21k_ft_in1k`` weights. Nothing is downloaded here: users bring the file and pass its
path (``--config.model.init``). Three formats are read, each into our parameter layout
(:mod:`oneshui_jax.models.vit`):

* a timm state dict stored with safetensors (Hugging Face ``timm/<model>/model.safetensors``),
  :func:`load_timm_safetensors`;
* a Google ViT ``.npz`` checkpoint, vision_transformer or big_vision naming,
  :func:`load_google_npz` (checkpoints with a ``pre_logits`` representation layer are refused:
  our model has none, so that conversion would be lossy);
* a run directory of ours (``checkpoints.save_params``, e.g. written by
  ``python -m oneshui_jax.models.convert``).

:func:`load_pretrained` then adapts the weights to a :class:`~oneshui_jax.models.vit.ViTConfig`
as timm does when it builds a model from pretrained weights: the position embedding is resized
when the patch grid differs, and the head is re-initialised when the number of classes differs.
Everything else must match exactly; every mismatch is reported in one error naming the file.
"""

from __future__ import annotations

import functools
import logging
import math
import os
import re
import zipfile
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np

from oneshui_jax import checkpoints
from oneshui_jax.errors import CheckpointError
from oneshui_jax.models import vit
from oneshui_jax.models.tree import set_path
from oneshui_jax.models.vit import Params, ViTConfig, init_params, timm_trunc_normal

log = logging.getLogger(__name__)

TIMM_MODEL = "vit_base_patch16_224.augreg2_in21k_ft_in1k"
"""The timm weights the reference starts from."""

_GOOGLE_PREFIXES = ("", "opt/target/", "params/", "params/img/")
"""Prefixes under which Google checkpoints store the model (as timm's ``_load_weights``)."""

_NAMINGS = {
    # norm1, norm2, attention, mlp sub-module names inside Transformer/encoderblock_{i}/
    "vision_transformer": ("LayerNorm_0", "LayerNorm_2", "MultiHeadDotProductAttention_1",
                           "MlpBlock_3"),
    "big_vision": ("LayerNorm_0", "LayerNorm_1", "MultiHeadDotProductAttention_0", "MlpBlock_0"),
}


def _missing_file_message(path: str) -> str:
    """What to obtain and where to put it."""
    return (f"ImageNet weights not found at {path}: download timm's {TIMM_MODEL} "
            f"model.safetensors (Hugging Face timm/{TIMM_MODEL}) on a machine with network "
            "access and pass its path as --config.model.init")


def _check_file(path: str) -> None:
    """CheckpointError with the download instructions if ``path`` does not exist."""
    if not os.path.exists(path):
        raise CheckpointError(_missing_file_message(path))


def load_timm_safetensors(path: str) -> dict[str, np.ndarray]:
    """A timm state dict stored with safetensors (e.g. timm's ``model.safetensors``), as numpy."""
    from safetensors.numpy import load_file

    _check_file(path)
    try:
        return load_file(path)
    except Exception as e:  # safetensors raises its own error types for corrupt files
        raise CheckpointError(f"{path} is not a readable safetensors file: {e}") from e


def timm_to_ours(state_dict: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """timm state dict -> our layout, keyed by our dotted names (``blocks.0.attn.qkv.kernel``).

    Keys and layouts follow :func:`oneshui_jax.models.vit.timm_keys` and
    :func:`~oneshui_jax.models.vit.torch_axes` (Linear weights transposed to [in, out], the conv
    weight OIHW -> HWIO, LayerNorm weights become ``scale``). Keys that are not ViT parameters,
    and kernels of a rank no layer has, are kept under their timm name, so that
    :func:`load_pretrained` reports them as unexpected.
    """
    blocks = [int(m.group(1)) for key in state_dict if (m := re.match(r"blocks\.(\d+)\.", key))]
    table = vit.timm_keys(max(blocks, default=-1) + 1)
    out: dict[str, np.ndarray] = {}
    for key, value in state_dict.items():
        array, path = np.asarray(value), table.get(key)
        try:
            axes = None if path is None else vit.torch_axes(path, array.ndim)
        except ValueError:
            path = None  # a weight of the wrong rank: reported as unexpected
        if path is None:
            out[key] = array
        else:
            name = ".".join(map(str, path))
            out[name] = array if axes is None else np.transpose(array, np.argsort(axes))
    return out


def _google_block(w: dict[str, np.ndarray], prefix: str, naming: str, i: int
                  ) -> dict[str, np.ndarray]:
    """Block ``i`` of a Google checkpoint in our layout; consumes its keys from ``w``.

    q, k, v kernels [D, heads, head_dim] are flattened to [D, D] and concatenated in that order
    into the fused qkv kernel [D, 3D] (timm's ``[3, heads, head_dim]`` output order); the output
    kernel [heads, head_dim, D] becomes [D, D]. Absent entries are left out (reported missing).
    """
    norm1, norm2, attn, mlp = _NAMINGS[naming]
    src = f"{prefix}Transformer/encoderblock_{i}/"
    out: dict[str, np.ndarray] = {}
    ours = f"blocks.{i}."
    for name, module in (("norm1", norm1), ("norm2", norm2)):
        for leaf in ("scale", "bias"):
            if f"{src}{module}/{leaf}" in w:
                out[f"{ours}{name}.{leaf}"] = w.pop(f"{src}{module}/{leaf}")
    for leaf in ("kernel", "bias"):
        parts = [f"{src}{attn}/{p}/{leaf}" for p in ("query", "key", "value")]
        if all(p in w for p in parts):
            arrays = [w.pop(p) for p in parts]
            flat = [a.reshape(a.shape[0], -1) if leaf == "kernel" else a.reshape(-1)
                    for a in arrays]
            out[f"{ours}attn.qkv.{leaf}"] = np.concatenate(flat, axis=-1)
        key = f"{src}{attn}/out/{leaf}"
        if key in w:
            array = w.pop(key)
            out[f"{ours}attn.proj.{leaf}"] = (array.reshape(-1, array.shape[-1])
                                             if leaf == "kernel" else array)
        for r in range(2):
            key = f"{src}{mlp}/Dense_{r}/{leaf}"
            if key in w:
                out[f"{ours}mlp.fc{r + 1}.{leaf}"] = w.pop(key)
    return out


def load_google_npz(path: str) -> dict[str, np.ndarray]:
    """A Google ViT ``.npz`` checkpoint in our layout, keyed by our dotted names.

    Reads vision_transformer naming (``MultiHeadDotProductAttention_1``, ``LayerNorm_2`` for
    norm2, ``MlpBlock_3``, ``Transformer/posembed_input/pos_embedding``) and big_vision naming
    (``MultiHeadDotProductAttention_0``, ``LayerNorm_1``, ``MlpBlock_0``, position embedding at
    ``pos_embedding`` or under ``Transformer/posembed_input``), detected from the file, under the
    prefixes timm accepts (none, ``opt/target/``, ``params/``, ``params/img/``). Entries that are
    not ViT parameters are kept under their own names (reported as unexpected by
    :func:`load_pretrained`). A ``pre_logits`` layer is refused with a CheckpointError.
    """
    _check_file(path)
    expected = "expected a zip archive of arrays (numpy.savez), as Google's ViT checkpoints are"
    if not zipfile.is_zipfile(path):  # numpy would read it as a pickle and suggest unpickling
        raise CheckpointError(f"{path} is not a readable .npz file: {expected}")
    try:
        with np.load(path) as data:
            w = {key: np.asarray(data[key]) for key in data.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
        raise CheckpointError(f"{path} is not a readable .npz file ({e}): {expected}") from e
    prefix = next((p for p in _GOOGLE_PREFIXES if f"{p}embedding/kernel" in w), None)
    if prefix is None:
        raise CheckpointError(
            f"{path} is not a Google ViT checkpoint: no embedding/kernel under any of the "
            f"prefixes {list(_GOOGLE_PREFIXES)} (keys: {checkpoints.short_list(sorted(w))})")
    pre_logits = sorted(k for k in w if k.startswith(f"{prefix}pre_logits/"))
    if pre_logits:
        raise CheckpointError(
            f"{path} has a pre_logits representation layer ({', '.join(pre_logits)}); our ViT "
            "has none, so converting it would be lossy. Use a checkpoint without one (e.g. "
            f"timm's {TIMM_MODEL})")
    naming = ("big_vision"
              if f"{prefix}Transformer/encoderblock_0/MultiHeadDotProductAttention_0/query/kernel"
              in w else "vision_transformer")
    direct = {
        "embedding/kernel": "patch_embed.proj.kernel", "embedding/bias": "patch_embed.proj.bias",
        "cls": "cls_token", "Transformer/posembed_input/pos_embedding": "pos_embed",
        "Transformer/encoder_norm/scale": "norm.scale",
        "Transformer/encoder_norm/bias": "norm.bias",
        "head/kernel": "head.kernel", "head/bias": "head.bias",
    }
    if naming == "big_vision":
        direct["pos_embedding"] = "pos_embed"
    out = {ours: w.pop(f"{prefix}{src}") for src, ours in direct.items() if f"{prefix}{src}" in w}
    blocks = sorted({int(m.group(1)) for k in w
                     if (m := re.match(rf"{re.escape(prefix)}Transformer/encoderblock_(\d+)/", k))})
    for i in blocks:
        out.update(_google_block(w, prefix, naming, i))
    out.update(w)  # whatever is left over is not part of a ViT
    return out


def read_weights(path: str) -> dict[str, np.ndarray]:
    """The weights at ``path`` in our layout, keyed by our dotted names (no shape is checked).

    ``.safetensors``: a timm state dict; ``.npz``: a Google checkpoint; a directory: a run
    directory of ours. A missing path raises the CheckpointError saying which file to obtain.
    """
    _check_file(path)
    if os.path.isdir(path):
        params = checkpoints.load_params(path)
        return {name: np.asarray(leaf) for name, leaf in checkpoints.named_leaves(params)}
    if path.endswith(".safetensors"):
        return timm_to_ours(load_timm_safetensors(path))
    if path.endswith(".npz"):
        return load_google_npz(path)
    raise CheckpointError(f"{path}: unknown weights format; expected a timm .safetensors file, "
                          "a Google ViT .npz checkpoint or a run directory of oneshui_jax")


def resize_pos_embed(pos_embed: np.ndarray, grid: int) -> np.ndarray:
    """[1, 1 + g*g, D] -> [1, 1 + grid*grid, D]: class token kept, patch grid resized bilinearly.

    The [g, g, D] grid is resized with ``jax.image.resize(method="bilinear", antialias=False)``
    (half-pixel centres, edges clamped: torch's ``F.interpolate(mode="bilinear",
    align_corners=False)``, the interpolation timm uses for Google checkpoints).
    """
    g = math.isqrt(pos_embed.shape[1] - 1)
    width = pos_embed.shape[-1]
    patches = jnp.asarray(pos_embed[0, 1:].reshape(g, g, width), jnp.float32)
    resized = jax.image.resize(patches, (grid, grid, width), method="bilinear", antialias=False)
    return np.concatenate([pos_embed[:, :1], np.asarray(resized).reshape(1, grid * grid, width)],
                          axis=1)


def source_grid(pos_embed_shape: tuple[int, ...]) -> int | None:
    """Patch-grid side of a position embedding [1, 1 + g*g, D]; None if it is not one."""
    if len(pos_embed_shape) != 3 or pos_embed_shape[0] != 1 or pos_embed_shape[1] < 2:
        return None
    g = math.isqrt(pos_embed_shape[1] - 1)
    return g if g * g == pos_embed_shape[1] - 1 else None


def infer_architecture(weights: Mapping[str, np.ndarray], path: str) -> dict[str, int | float]:
    """The architecture of ViT weights in our layout (:func:`read_weights`), from their shapes.

    ``patch_size``, ``in_chans`` and ``width`` from the patch projection [p, p, C, D];
    ``image_size`` from the position embedding [1, (image / patch)^2 + 1, D] (one class token);
    ``depth`` from the blocks ``blocks.{i}``; ``mlp_ratio`` from ``blocks.0.mlp.fc1.kernel``
    [D, H] (``int(D * mlp_ratio) == H``); ``num_classes`` from the head [D, C]. ``num_heads`` is
    not in the shapes (the qkv projection is fused). Tensors that are not a ViT's raise one
    CheckpointError naming ``path``; the remaining tensors are checked by :func:`load_pretrained`.
    """
    def shape(name: str) -> tuple[int, ...] | None:
        return tuple(int(n) for n in weights[name].shape) if name in weights else None

    patch = shape("patch_embed.proj.kernel")
    if patch is None or len(patch) != 4 or patch[0] != patch[1]:
        raise CheckpointError(
            f"{path} is not a ViT: expected a square patch projection patch_embed.proj "
            f"([p, p, C, D] here, timm's [D, C, p, p]), got {patch} (tensors: "
            f"{checkpoints.short_list(sorted(weights))})")
    p, _, in_chans, width = patch
    pos = shape("pos_embed")
    grid = source_grid(pos) if pos is not None else None
    if grid is None or pos[2] != width:
        raise CheckpointError(
            f"{path} is not a ViT with one class token: pos_embed is {pos}, expected "
            f"[1, (image / patch)^2 + 1, {width}]")
    blocks = {int(m.group(1)) for key in weights if (m := re.match(r"blocks\.(\d+)\.", key))}
    fc1 = shape("blocks.0.mlp.fc1.kernel")
    if not blocks or fc1 is None or len(fc1) != 2 or fc1[0] != width:
        raise CheckpointError(f"{path} is not a ViT: expected blocks.0.mlp.fc1 of shape "
                              f"[{width}, hidden] here ([hidden, {width}] in timm), got {fc1}")
    head = shape("head.kernel")
    if head is None or len(head) != 2 or head[0] != width:
        raise CheckpointError(f"{path} is not a ViT with a classification head: expected head "
                              f"of shape [{width}, classes] here ([classes, {width}] in timm), "
                              f"got {head}")
    mlp_ratio = fc1[1] / width
    if int(width * mlp_ratio) != fc1[1]:  # rounding: the next float up gives the hidden width
        mlp_ratio = float(np.nextafter(mlp_ratio, np.inf))
    return {"width": width, "depth": max(blocks) + 1, "patch_size": p, "image_size": grid * p,
            "mlp_ratio": mlp_ratio, "num_classes": head[1], "in_chans": in_chans}


def _adapt(weights: dict[str, np.ndarray], expected: dict[str, tuple[int, ...]], cfg: ViTConfig,
           rng: jax.Array, report: list[str]) -> list[str]:
    """Resizes ``pos_embed`` and replaces the head in place; returns the remaining problems."""
    pos = weights.get("pos_embed")
    if pos is not None and pos.shape != expected["pos_embed"]:
        g = source_grid(pos.shape)
        if g is not None and pos.shape[2] == cfg.width:
            weights["pos_embed"] = resize_pos_embed(pos, cfg.grid_size)
            report.append(f"pos_embed resized from grid {g}x{g} to {cfg.grid_size}x"
                          f"{cfg.grid_size} (bilinear, class token kept)")
    head = ("head.kernel", "head.bias")
    if (all(k in weights for k in head)
            and any(weights[k].shape != expected[k] for k in head)):
        source = weights["head.kernel"].shape
        weights["head.kernel"] = np.asarray(timm_trunc_normal(0.02)(
            rng, expected["head.kernel"], jnp.float32))
        weights["head.bias"] = np.zeros(expected["head.bias"], np.float32)
        report.append(f"head re-initialised: the source head {source} does not fit "
                      f"{cfg.num_classes} classes (timm's trunc_normal_(std=.02), zero bias)")
    missing = [name for name in expected if name not in weights]
    unexpected = [name for name in weights if name not in expected]
    mis_shaped = [f"{name} {tuple(weights[name].shape)} (expected {expected[name]})"
                  for name in expected if name in weights and weights[name].shape != expected[name]]
    parts = (("missing", missing), ("unexpected", unexpected), ("mis-shaped", mis_shaped))
    return [f"{label}: {checkpoints.short_list(items)}" for label, items in parts if items]


def load_pretrained(path: str, cfg: ViTConfig, *, rng: jax.Array,
                    report: list[str] | None = None) -> Params:
    """Pretrained weights at ``path`` (see :func:`read_weights`) as float32 params for ``cfg``.

    Adaptations, as timm makes them when it loads pretrained weights into another config:

    * ``pos_embed`` of another patch grid is resized (:func:`resize_pos_embed`: bilinear on the
      [g, g, D] grid, class token kept);
    * a head whose shape does not fit ``cfg.num_classes`` is dropped and a new one initialised
      as timm does and as :func:`~oneshui_jax.models.vit.init_params` does (timm's
      ``trunc_normal_(std=.02)`` kernel from ``rng``, zero bias); a fitting head is
      kept.

    Each adaptation is logged and appended to ``report`` (if given). Any other missing,
    unexpected or mis-shaped entry raises one CheckpointError (a ``ValueError``) naming the file
    and listing every problem (names are ours, dotted; unknown entries keep their file names).
    """
    weights = read_weights(path)
    abstract = jax.eval_shape(functools.partial(init_params, cfg), jax.random.key(0))
    expected = {name: tuple(leaf.shape) for name, leaf in checkpoints.named_leaves(abstract)}
    adaptations: list[str] = []
    problems = _adapt(weights, expected, cfg, rng, adaptations)
    if problems:
        raise CheckpointError(f"weights at {path} do not fit {cfg}: " + "; ".join(problems))
    params: Params = {}
    for name in expected:
        path_keys = tuple(int(p) if p.isdigit() else p for p in name.split("."))
        set_path(params, path_keys, jnp.asarray(weights[name], jnp.float32))
    for line in adaptations:
        log.info("%s: %s", path, line)
    if report is not None:
        report.extend(adaptations)
    return params
