"""Export a reference-exact 1-SHUI identity split as JSON (SPEC.md section 2: train / val / test
identities, the forget identities with their support images, the retain set; the work is
``oneshui_jax/splits.py``).

    python -m oneshui_jax.splits --dataset mufac --data_dir ../shared/data \\
        --num_identities 10 --seed 0 --out split.json

The JSON holds the identity lists, the support images' indices and files, and image counts.
``--dedup merge`` first merges the identities that share byte-identical images (an audit of the
images; a deviation from the reference). Bad input, a malformed command line included, prints
one ``error: ...`` line on stderr, writes nothing and exits with status 2.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Sequence

from absl import flags

from oneshui_jax import ranges
from oneshui_jax.cli import common
from oneshui_jax.data import catalog
from oneshui_jax.data.annotations import read_identities
from oneshui_jax.errors import ConfigError, DataError
from oneshui_jax.files import cannot_create, save_json
from oneshui_jax.splits import export, make_splits

FLAGS = common.command_flags()
_DATASET = flags.DEFINE_enum("dataset", None, tuple(catalog.DATASETS), "the dataset",
                             flag_values=FLAGS, required=True)
_DATA_DIR = flags.DEFINE_string(
    "data_dir", None, "folder holding celeba/, CelebAMask-HQ/ or mufac/ (not synthfaces)",
    flag_values=FLAGS)
_SYNTHFACES_CONFIG = flags.DEFINE_enum(
    "synthfaces_config", "medium", ("medium", "large", "small"), "the size of synthfaces",
    flag_values=FLAGS)
_NUM_IDENTITIES = flags.DEFINE_integer(
    "num_identities", None, "N, the number of identities to forget", flag_values=FLAGS,
    required=True)
_SEED = flags.DEFINE_integer("seed", 0, "the seed of the split", flag_values=FLAGS)
_OUT = flags.DEFINE_string("out", None, "the JSON file to write", flag_values=FLAGS,
                           required=True)
_DEDUP = flags.DEFINE_enum(
    "dedup", "none", ("none", "merge"), "merge: identities sharing byte-identical images "
    "become one before splitting (audits the images; a deviation from the reference)",
    flag_values=FLAGS)


def main(argv: Sequence[str] | None = None) -> None:
    """The command line on ``argv`` (default ``sys.argv[1:]``): writes the split, or prints one
    ``error:`` line and raises ``SystemExit(2)``; ``--help`` raises ``SystemExit(0)``."""
    common.no_arguments(common.parse(FLAGS, argv, __doc__))
    dataset, data_dir, out = _DATASET.value, _DATA_DIR.value, _OUT.value
    seed, num_identities = _SEED.value, _NUM_IDENTITIES.value
    try:
        ranges.SEED.check("--seed", seed)
        problem = ("it is a directory" if os.path.isdir(out)
                   else cannot_create(out))  # refused before any work
        if problem:
            raise ConfigError(f"--out {out} cannot be written: {problem}; expected a JSON "
                              "file in a writable folder")
        ann = read_identities(dataset, data_dir, _SYNTHFACES_CONFIG.value)
        if _DEDUP.value == "merge":
            from oneshui_jax.data import audit, datasets

            if dataset == "synthfaces":
                raise DataError("--dedup merge needs a real dataset's image files")
            checked = datasets.audited(dataset, data_dir, ann)
            ann, removed = audit.merge_identities(ann, checked.duplicate_groups)
            print(f"dedup=merge: {removed} identities merged into others")
        start = time.perf_counter()
        splits = make_splits(ann, num_identities, seed)
        seconds = time.perf_counter() - start
        record = export(ann, splits, seed, num_identities)
    except (DataError, ConfigError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    try:
        save_json(record, out)
    except OSError as e:  # the check above passed, yet writing failed (a race, a full disk)
        print(f"error: --out {out} cannot be written: {e.strerror or e}; expected a JSON "
              "file in a writable folder", file=sys.stderr)
        sys.exit(2)
    n = record["num_images"]
    print(f"{dataset} seed {seed} N={num_identities}: identities "
          f"train/val/test {len(splits.train)}/{len(splits.val)}/{len(splits.test)}, images "
          f"{n['train']}/{n['val']}/{n['test']}, forget {len(splits.forget)} "
          f"({n['forget']} images), split in {seconds:.3f}s -> {out}")


if __name__ == "__main__":
    main()
