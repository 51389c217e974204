"""Convert pretrained ViT weights (SPEC.md section 3: timm ``vit_base_patch16_224``,
``augreg2_in21k_ft_in1k``; a Google ViT ``.npz``; a run directory) into a run directory of ours,
once, offline (the work is ``oneshui_jax/models/convert.py``).

    python -m oneshui_jax.models.convert IN OUT [--num_classes C] [--image_size S]
        [--num_heads H] [--model NAME] [--width W] [--depth D] [--patch_size P]
        [--mlp_ratio R]

The architecture is read from the tensor shapes (heads: width / 64 unless ``--num_heads``); the
flags are explicit overrides, checked against the file. The output's first line says what was
inferred and from where. Any error (a flag that contradicts the file, a file that is not a ViT,
an OUT inside the run directory IN, a malformed command line) prints one ``error: ...`` line,
exits with status 2 and writes nothing.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from absl import flags

from oneshui_jax.cli import common
from oneshui_jax.models import convert as convert_lib

FLAGS = common.command_flags()
_MODEL = flags.DEFINE_string(
    "model", None, "ViT preset naming the run's model; its architecture must agree with the "
    "file (default: the matching preset, if any)", flag_values=FLAGS)
_ARCH = {
    "width": flags.DEFINE_integer("width", None, "width (default: the file's; must match)",
                                  flag_values=FLAGS),
    "depth": flags.DEFINE_integer("depth", None, "depth (default: the file's; must match)",
                                  flag_values=FLAGS),
    "num_heads": flags.DEFINE_integer(
        "num_heads", None, f"num_heads (default: width / {convert_lib.HEAD_DIM})",
        flag_values=FLAGS),
    "patch_size": flags.DEFINE_integer(
        "patch_size", None, "patch_size (default: the file's; must match)", flag_values=FLAGS),
    "mlp_ratio": flags.DEFINE_float(
        "mlp_ratio", None, "mlp_ratio (default: the file's; must match)", flag_values=FLAGS),
}
_NUM_CLASSES = flags.DEFINE_integer(
    "num_classes", None, "new head of this many classes (default: keep the source head)",
    flag_values=FLAGS)
_IMAGE_SIZE = flags.DEFINE_integer(
    "image_size", None, "resize pos_embed to this image size (default: the source's)",
    flag_values=FLAGS)

POSITIONAL = ("IN", "OUT")
EXPECTED = ("expected IN OUT: the weights file (or run directory) to convert and the run "
            "directory to create (must not exist)")


def _conversion(argv: Sequence[str] | None) -> convert_lib.Conversion:
    """The command line as a :class:`Conversion`; IN and OUT are positional."""
    paths = common.parse(FLAGS, argv, __doc__)
    if len(paths) < len(POSITIONAL):
        common.fail(f"the following arguments are required: "
                    f"{', '.join(POSITIONAL[len(paths):])}; {EXPECTED}")
    if len(paths) > len(POSITIONAL):
        common.fail(f"unexpected arguments {paths[len(POSITIONAL):]}; {EXPECTED}")
    return convert_lib.Conversion(
        *paths, model=_MODEL.value, num_classes=_NUM_CLASSES.value,
        image_size=_IMAGE_SIZE.value, **{name: holder.value for name, holder in _ARCH.items()})


def main(argv: Sequence[str] | None = None) -> int:
    """The command line on ``argv`` (default ``sys.argv[1:]``); returns the exit status (2:
    nothing was written). A malformed command line raises ``SystemExit(2)`` after its one
    line, ``--help`` ``SystemExit(0)``."""
    args = _conversion(argv)
    try:
        digest, tensors, count, adaptations, cfg, summary = convert_lib.convert(args)
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"architecture: {summary}")
    print(f"wrote {args.output}: {cfg}")
    print(f"{tensors} tensors, {count:,} parameters")
    for line in adaptations or ["no adaptation: source head and image size kept"]:
        print(f"adapted: {line}" if adaptations else line)
    print(f"params hash: {digest}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
