"""Convert pretrained ViT weights (SPEC.md section 3: timm ``vit_base_patch16_224``,
``augreg2_in21k_ft_in1k``) into a run directory of ours, once, offline::

    python -m oneshui_jax.models.convert model.safetensors OUT [--num_classes C]
        [--image_size S] [--num_heads H] [--model NAME]

IN is a timm ``.safetensors`` state dict, a Google ViT ``.npz`` or a run directory
(:func:`oneshui_jax.models.pretrained.read_weights`); OUT is written with
``checkpoints.save_params`` and is readable by ``checkpoints.load_params``. :func:`convert` does
the work for a :class:`Conversion`; the command line is ``oneshui_jax/cli/convert.py``.

The architecture is read from the tensor shapes
(:func:`oneshui_jax.models.pretrained.infer_architecture`), so any timm ViT converts without
flags: width, patch size and input channels from the patch projection, image size from the
position embedding (tokens = (image / patch)^2 + 1 class token), depth from the number of blocks,
MLP ratio from the MLP kernel, classes from the head. The number of heads is not in the shapes:
it is width / 64 (timm's ViTs: head dimension 64) unless ``--num_heads`` says otherwise. The
output's first line says what was inferred and from where.

Flags are explicit overrides: ``--width``, ``--depth``, ``--patch_size`` and ``--mlp_ratio`` (and
those of a ``--model`` preset) must agree with the file, ``--num_heads`` must divide the width.
Nothing is lost silently: the source head and image size are kept; a new head or a resized
position embedding needs ``--num_classes`` / ``--image_size`` and is printed. The run's model
name is ``--model`` (a preset), else the preset with this architecture, else
``vit_<width>w_<depth>d_patch<p>_<S>``.
Any error (a flag that contradicts the file, a file that is not a ViT, an OUT inside the run
directory IN) prints one ``error: ...`` line, exits with status 2 and writes nothing.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import shutil
import sys
from typing import Any

import jax
import numpy as np

from oneshui_jax import checkpoints
from oneshui_jax.errors import ConfigError
from oneshui_jax.files import cannot_create
from oneshui_jax.models import pretrained, vit
from oneshui_jax.models.vit import ViTConfig, count_params

_ARCH_FIELDS = (("width", int), ("depth", int), ("num_heads", int), ("patch_size", int),
                ("mlp_ratio", float))
_FIXED = ("width", "depth", "patch_size", "mlp_ratio")
"""Fields the tensor shapes determine: an explicit value must agree with the file."""

HEAD_DIM = 64
"""Head dimension of timm's ViTs: ``num_heads`` is width / 64 unless given."""


@dataclasses.dataclass(frozen=True)
class Conversion:
    """What to convert: IN and OUT, and the explicit settings (None: from the file; the command
    line's flags, ``oneshui_jax/cli/convert.py``)."""

    input: str
    output: str
    model: str | None = None
    width: int | None = None
    depth: int | None = None
    num_heads: int | None = None
    patch_size: int | None = None
    mlp_ratio: float | None = None
    num_classes: int | None = None
    image_size: int | None = None


def _requested(args: Conversion) -> dict[str, tuple[Any, str]]:
    """Explicit architecture fields -> (value, where it comes from): flags over the preset."""
    requested: dict[str, tuple[Any, str]] = {}
    if args.model is not None:  # an unknown name is refused by ViTConfig.preset
        preset = dataclasses.asdict(ViTConfig.preset(args.model))
        requested = {name: (preset[name], f"--model {args.model}") for name, _ in _ARCH_FIELDS}
    for name, _ in _ARCH_FIELDS:
        if getattr(args, name) is not None:
            requested[name] = (getattr(args, name), f"--{name}")
    return requested


def _model_name(cfg: ViTConfig) -> str:
    """The preset with ``cfg``'s architecture (head aside), else a descriptive name."""
    for name in vit._PRESETS:
        if dataclasses.replace(ViTConfig.preset(name), num_classes=cfg.num_classes) == cfg:
            return name
    return f"vit_{cfg.width}w_{cfg.depth}d_patch{cfg.patch_size}_{cfg.image_size}"


def _config(args: Conversion) -> tuple[ViTConfig, str]:
    """The target config and a summary of what was inferred.

    Architecture from the file's shapes, explicit values checked against them; heads width / 64
    unless given; head and image size from the source unless ``--num_classes`` / ``--image_size``.
    """
    found = pretrained.infer_architecture(pretrained.read_weights(args.input), args.input)
    requested = _requested(args)
    hidden = int(found["width"] * found["mlp_ratio"])
    contradictions = [
        f"{where} gives {name} {value} but the tensors of {args.input} give {found[name]}"
        for name, (value, where) in requested.items() if name in _FIXED and (
            int(found["width"] * value) != hidden if name == "mlp_ratio"
            else value != found[name])]
    for name, (value, _) in requested.items():
        if not value > 0:  # ViTConfig's error, naming the field, before any contradiction
            ViTConfig(**{**found, "num_heads": 1, name: value})
    if contradictions:
        raise ConfigError("; ".join(contradictions))
    fields = {**found, **{name: value for name, (value, _) in requested.items()}}
    source = {name: "from the file" for name in found}
    source |= {name: where for name, (_, where) in requested.items()}
    if "num_heads" not in requested:
        if found["width"] % HEAD_DIM:
            raise ConfigError(f"cannot infer num_heads: width {found['width']} is not a multiple "
                              f"of {HEAD_DIM} (heads = width / {HEAD_DIM}); pass --num_heads")
        fields["num_heads"] = found["width"] // HEAD_DIM
        source["num_heads"] = f"width / {HEAD_DIM}, not in the file"
    for name in ("num_classes", "image_size"):  # adaptations, printed by convert
        if getattr(args, name) is not None:
            fields[name] = getattr(args, name)
            source[name] = f"--{name}, the file has {found[name]}"
    cfg = ViTConfig(**fields)
    summary = ", ".join(f"{name} {getattr(cfg, name)} ({source[name]})"
                        for name in ("width", "depth", "num_heads", "patch_size", "image_size",
                                     "mlp_ratio", "num_classes", "in_chans"))
    return cfg, summary


def _source_hash(path: str) -> str:
    """sha256 of a weights file; for a run directory, the params hash it records."""
    if os.path.isdir(path):
        return checkpoints.read_metadata(path)["params_hash"]
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def nonfinite_tensors(params: Any) -> list[str]:
    """One line per tensor of ``params`` holding NaN or infinite values (a damaged download or a
    diverged run): converted as they are, but a model that starts from them cannot train."""
    lines = []
    for name, leaf in checkpoints.named_leaves(params):
        array = np.asarray(leaf)
        if np.issubdtype(array.dtype, np.floating) and not np.isfinite(array).all():
            nan, inf = int(np.isnan(array).sum()), int(np.isinf(array).sum())
            lines.append(f"{name} has {nan} NaN and {inf} infinite values of {array.size}")
    return lines


def convert(args: Conversion) -> tuple[str, int, int, list[str], ViTConfig, str]:
    """Writes OUT (via a temporary sibling, renamed when complete).

    Returns ``(params hash, tensors, parameters, adaptations, config, summary)``.
    """
    if os.path.lexists(args.output):
        raise checkpoints.CheckpointError(f"{args.output} already exists; choose a new OUT")
    if os.path.isdir(args.input):  # a run directory: OUT may not be written inside it
        checkpoints.check_apart(args.output, (("the input run IN", args.input),), flag="OUT")
    problem = cannot_create(args.output)  # refused before the weights are read
    if problem:
        raise checkpoints.CheckpointError(f"OUT {args.output} cannot be created: {problem}")
    if not os.path.exists(args.input):  # not the study's --config.model.init advice
        raise checkpoints.CheckpointError(
            f"IN {args.input} not found; expected a timm .safetensors file (such as "
            f"model.safetensors of Hugging Face timm/{pretrained.TIMM_MODEL}), a Google ViT "
            ".npz checkpoint or a run directory of oneshui_jax")
    cfg, summary = _config(args)
    name = args.model or _model_name(cfg)
    adaptations: list[str] = []
    params = pretrained.load_pretrained(args.input, cfg, rng=jax.random.key(0),
                                        report=adaptations)
    for line in nonfinite_tensors(params):
        print(f"warning: {args.input}: {line}", file=sys.stderr)
    metadata = {
        "config": {"dataset": "imagenet", "model": {"name": name,
                                                    **dataclasses.asdict(cfg)},
                   "num_identities": 0, "seed": 0},
        "splits": {},
        "source_file": os.path.abspath(args.input),
        "source_sha256": _source_hash(args.input),
        "adaptations": adaptations,
    }
    tmp = f"{os.path.abspath(args.output)}.tmp-{os.getpid()}"
    try:
        digest = checkpoints.save_params(tmp, params, metadata)
        os.rename(tmp, args.output)
    except OSError as e:  # name OUT, not the temporary sibling the error is about
        raise checkpoints.CheckpointError(
            f"OUT {args.output} cannot be created: {e.strerror or e}") from e
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    leaves = jax.tree.leaves(params)
    return digest, len(leaves), count_params(params), adaptations, cfg, summary


if __name__ == "__main__":  # python -m oneshui_jax.models.convert: an alias of the command
    import runpy  # line, run, not imported: this library module stays below the command lines

    runpy.run_module("oneshui_jax.cli.convert", run_name="__main__")
