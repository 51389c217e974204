"""One entry point to a dataset: its records, identity annotations and task.

``load(dataset, data_cfg)`` returns a ``Dataset`` whose ``source`` is a random-access sequence of
records (``image`` uint8 HWC, ``label``, ``identity``, ``index``) read from the dataset's built
array_record files, and whose ``annotations`` are the reference's identity numbering (for splits).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from typing import Any

from oneshui_jax.data.annotations import IdentityAnnotations, read_identities
from oneshui_jax.errors import DataError


@dataclasses.dataclass(frozen=True)
class Dataset:
    name: str
    task: str  # "multilabel" | "classification"
    label_names: tuple[str, ...]
    source: Sequence[dict[str, Any]]
    annotations: IdentityAnnotations

    @property
    def num_classes(self) -> int:
        return len(self.label_names)


def _check_records(name: str, source, ann: IdentityAnnotations) -> None:
    if len(source) != ann.num_images:
        raise DataError(
            f"{name}: the built records hold {len(source)} images but the annotations list "
            f"{ann.num_images}; delete the built dataset folder and build it again.")
    for i in (0, len(source) - 1):
        record = source[i]
        if int(record["identity"]) != int(ann.identities[i]):
            raise DataError(
                f"{name}: record {i} has identity {int(record['identity'])} but the annotations "
                f"say {int(ann.identities[i])}; the built dataset is stale, build it again.")


def load(dataset: str, data_cfg) -> Dataset:
    """Builds (once) and opens ``dataset``; ``data_cfg`` is the config's ``data`` block."""
    tfds_dir = os.path.expanduser(data_cfg.tfds_dir)
    if dataset == "synthfaces":
        from oneshui_jax.data import synthfaces
        from oneshui_jax.data.tfds_builders.synthfaces import build_synthfaces

        source = build_synthfaces(tfds_dir, data_cfg.synthfaces_config)
        ann = read_identities("synthfaces", synthfaces_config=data_cfg.synthfaces_config)
        _check_records(dataset, source, ann)
        return Dataset(dataset, "multilabel", tuple(synthfaces.ATTRIBUTE_NAMES), source, ann)
    if dataset in ("celeba", "celebahq", "mufac"):
        raise DataError(
            f"dataset {dataset!r}: reading images needs its tensorflow-datasets builder, which is "
            "not part of this release yet; its identity splits work already "
            "(python -m oneshui_jax.splits).")
    raise DataError(f"unknown dataset {dataset!r}; expected synthfaces, celeba, celebahq, mufac")
