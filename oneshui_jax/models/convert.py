"""Convert pretrained ViT weights (SPEC.md section 3: timm ``vit_base_patch16_224``,
``augreg2_in21k_ft_in1k``) into a run directory of ours, once, offline::

    python -m oneshui_jax.models.convert model.safetensors OUT [--num_classes C]
        [--image_size S] [--model vit_base_patch16_224]

IN is a timm ``.safetensors`` state dict, a Google ViT ``.npz`` or a run directory
(:func:`oneshui_jax.models.pretrained.read_weights`); OUT is written with
``checkpoints.save_params`` and is readable by ``checkpoints.load_params``. Nothing is lost
silently: by default the source head (its number of classes) and the source image size are
kept; a new head or a resized position embedding needs ``--num_classes`` / ``--image_size``
and is printed. The architecture is that of ``--model`` (a ViT preset), each field overridable
(``--width``, ``--depth``, ``--num_heads``, ``--patch_size``, ``--mlp_ratio``). Any error prints
one ``error: ...`` line, exits with status 2 and writes nothing.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import os
import shutil
import sys
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np

from oneshui_jax import checkpoints
from oneshui_jax.files import cannot_create
from oneshui_jax.models import pretrained
from oneshui_jax.models.vit import ViTConfig, count_params

_ARCH_FIELDS = (("width", int), ("depth", int), ("num_heads", int), ("patch_size", int),
                ("mlp_ratio", float))


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m oneshui_jax.models.convert",
        description="Convert pretrained ViT weights (timm .safetensors, Google .npz or a run "
                    "directory) into a oneshui_jax run directory.")
    parser.add_argument("input", metavar="IN", help="weights file or run directory")
    parser.add_argument("output", metavar="OUT", help="run directory to create (must not exist)")
    parser.add_argument("--model", default="vit_base_patch16_224",
                        help="ViT preset giving the architecture (default: %(default)s)")
    for name, kind in _ARCH_FIELDS:
        parser.add_argument(f"--{name}", type=kind, help=f"override the preset's {name}")
    parser.add_argument("--num_classes", type=int,
                        help="new head of this many classes (default: keep the source head)")
    parser.add_argument("--image_size", type=int,
                        help="resize pos_embed to this image size (default: the source's)")
    return parser.parse_args(argv)


def _config(args: argparse.Namespace) -> ViTConfig:
    """The target config: preset + overrides; head and image size from the source by default."""
    fields: dict[str, Any] = {name: getattr(args, name) for name, _ in _ARCH_FIELDS
                              if getattr(args, name) is not None}
    base = ViTConfig.preset(args.model, **fields)
    weights = pretrained.read_weights(args.input)
    head = weights.get("head.bias")
    grid = pretrained.source_grid(weights["pos_embed"].shape) if "pos_embed" in weights else None
    if args.num_classes is not None:  # 0 or less is refused by ViTConfig, not ignored
        num_classes = args.num_classes
    else:
        num_classes = head.shape[0] if head is not None and head.ndim == 1 else base.num_classes
    if args.image_size is not None:
        image_size = args.image_size
    else:
        image_size = grid * base.patch_size if grid else base.image_size
    return dataclasses.replace(base, num_classes=int(num_classes), image_size=int(image_size))


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


def convert(args: argparse.Namespace) -> tuple[str, int, int, list[str], ViTConfig]:
    """Writes OUT (via a temporary sibling, renamed when complete).

    Returns ``(params hash, tensors, parameters, adaptations, config)``.
    """
    if os.path.lexists(args.output):
        raise checkpoints.CheckpointError(f"{args.output} already exists; choose a new OUT")
    problem = cannot_create(args.output)  # refused before the weights are read
    if problem:
        raise checkpoints.CheckpointError(f"OUT {args.output} cannot be created: {problem}")
    if not os.path.exists(args.input):  # not the study's --config.model.init advice
        raise checkpoints.CheckpointError(
            f"IN {args.input} not found; expected a timm .safetensors file (such as "
            f"model.safetensors of Hugging Face timm/{pretrained.TIMM_MODEL}), a Google ViT "
            ".npz checkpoint or a run directory of oneshui_jax")
    cfg = _config(args)
    adaptations: list[str] = []
    params = pretrained.load_pretrained(args.input, cfg, rng=jax.random.key(0),
                                        report=adaptations)
    for line in nonfinite_tensors(params):
        print(f"warning: {args.input}: {line}", file=sys.stderr)
    metadata = {
        "config": {"dataset": "imagenet", "model": {"name": args.model,
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
    return digest, len(leaves), count_params(params), adaptations, cfg


def main(argv: Sequence[str] | None = None) -> int:
    """The command line; returns the exit status (2: nothing was written)."""
    args = parse_args(argv)
    try:
        digest, tensors, count, adaptations, cfg = convert(args)
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {args.output}: {cfg}")
    print(f"{tensors} tensors, {count:,} parameters")
    for line in adaptations or ["no adaptation: source head and image size kept"]:
        print(f"adapted: {line}" if adaptations else line)
    print(f"params hash: {digest}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
