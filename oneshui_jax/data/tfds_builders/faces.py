"""TFDS builders of the paper's real datasets: CelebA, CelebA-HQ and MUFAC (SPEC.md 1).

Each builder reads the original files under one ``data_dir`` (passed to TFDS as the manual
directory), in the reference's image order and identity numbering
(:mod:`oneshui_jax.data.annotations`), and writes one ordered ``train`` split of ``array_record``
files; nothing needs TensorFlow. A record holds:

* ``image``: the image file's original bytes (JPEG; read by ``images.read_bytes``: regular
  files within its byte cap), decoded at read time by ``datasets.decode_image``
  (``images.decode``), for 8-bit images exactly the reference's ``__getitem__``
  (``convert("RGB")``);
* ``label``: uint8 multi-hot ``[40]`` (CelebA, CelebA-HQ) or the age class 0..7 (MUFAC);
* ``identity``: the reference's identity id (raw labels, even with ``dedup=merge``);
* ``index``: the position in the dataset; ``file_name``: the path relative to ``data_dir``.

The builder config is named after a fingerprint of the image bytes, identities and labels
(``fingerprint``), so a build always matches the files it was made from: changed files make a new
build instead of silently reusing a stale one. TFDS writes into an ``incomplete.*`` folder and
renames it when the build is complete, so an interrupted build leaves no half-written dataset;
leftovers of a killed build are removed before the next attempt.

Importing this module imports ``tensorflow_datasets`` and registers the builders ``celeba``,
``celebahq`` and ``mufac``.
"""

from __future__ import annotations

import dataclasses
import glob
import hashlib
import os
import shutil
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import tensorflow_datasets as tfds
from absl import logging

from oneshui_jax.data import annotations as annotations_lib
from oneshui_jax.data import audit as audit_lib
from oneshui_jax.data import images
from oneshui_jax.data.tfds_builders.local import LocalBuild
from oneshui_jax.errors import DataError

SPLIT = "train"
FILE_FORMAT = "array_record"


@dataclasses.dataclass(frozen=True)
class FaceTable:
    """Everything a build writes, read and audited beforehand."""

    dataset: str
    data_dir: str
    files: tuple[str, ...]
    identities: np.ndarray
    labels: annotations_lib.Labels
    sha256: tuple[str, ...]  # content hash of every file (from the audit)

    def fingerprint(self) -> str:
        h = audit_lib.content_hash(self.files, self.sha256)
        h.update(np.ascontiguousarray(self.identities, np.int64).tobytes())
        h.update(np.ascontiguousarray(self.labels.values).tobytes())
        h.update("\n".join(self.labels.names).encode())
        return h.hexdigest()


class _FaceBuilder(LocalBuild, tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Shared builder: one ordered split of (image bytes, label, identity, index, file name)."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release: original image bytes, reference order."}
    LAYOUT = ""

    def __init__(self, *, table: FaceTable | None = None, **kwargs):
        self._table = table
        super().__init__(**kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        table = self._table
        if table is None:
            raise DataError(f"the {self.name} builder needs the annotation table to describe "
                            "its features; use oneshui_jax.data.datasets.load")
        if table.labels.task == "classification":
            label = tfds.features.ClassLabel(names=list(table.labels.names))
        else:
            label = tfds.features.Tensor(shape=(len(table.labels.names),), dtype=np.uint8)
        features = tfds.features.FeaturesDict({
            "image": tfds.features.Tensor(shape=(), dtype=np.object_),  # the file's bytes
            "label": label,
            "identity": tfds.features.Scalar(dtype=np.int64),
            "index": tfds.features.Scalar(dtype=np.int64),
            "file_name": tfds.features.Text(),
        })
        return tfds.core.DatasetInfo(
            builder=self, description=self.__doc__, features=features,
            metadata=tfds.core.MetadataDict(label_names=list(table.labels.names),
                                            task=table.labels.task),
            disable_shuffling=True)  # keep the dataset order: record i has index i

    def _split_generators(self, dl_manager: tfds.download.DownloadManager) -> dict[str, Any]:
        return {SPLIT: self._generate_examples(os.fspath(dl_manager.manual_dir))}

    def _generate_examples(self, data_dir: str) -> Iterator[tuple[int, dict[str, Any]]]:
        table = self._table
        labels = table.labels.values
        for i, rel in enumerate(table.files):
            path = os.path.join(data_dir, rel)
            try:  # a regular file within the byte cap, as the audit found it
                data = images.read_bytes(path, name=path)
            except images.ImageError as e:
                raise DataError(f"{path}: cannot be read while building {self.name} "
                                f"({e.reason}). Expected {self.LAYOUT}.") from None
            if hashlib.sha256(data).hexdigest() != table.sha256[i]:
                raise DataError(f"{path} changed while {self.name} was being built; run again.")
            yield i, {"image": data, "label": labels[i], "identity": int(table.identities[i]),
                      "index": i, "file_name": rel}


class CelebA(_FaceBuilder):
    """CelebA (202,599 aligned 178x218 images, 10,177 identities, 40 binary attributes), in
    ``list_eval_partition.txt`` order with torchvision's attribute decoding ``(v + 1) // 2``."""

    name = "celeba"
    LAYOUT = annotations_lib.CELEBA_ATTR_LAYOUT
    MANUAL_DOWNLOAD_INSTRUCTIONS = (
        "Put CelebA's img_align_celeba/ folder and its annotation files (identity_CelebA.txt, "
        "list_attr_celeba.txt, list_eval_partition.txt) under <data_dir>/celeba/.")


class CelebAHQ(_FaceBuilder):
    """CelebA-HQ (30,000 images at 1024x1024, 6,217 identities, 40 binary attributes); image
    ``k.jpg`` is record ``k``; an attribute is on when its value is not -1."""

    name = "celebahq"
    LAYOUT = annotations_lib.CELEBAHQ_ATTR_LAYOUT
    MANUAL_DOWNLOAD_INSTRUCTIONS = (
        "Put CelebAMask-HQ's CelebA-HQ-img/ folder, CelebAMask-HQ-attribute-anno.txt and "
        "CelebA-HQ-identity.txt under <data_dir>/CelebAMask-HQ/.")


class MUFAC(_FaceBuilder):
    """MUFAC (13,068 128x128 face images of 1,216 identities, 8 age classes); the train, val and
    test CSVs merged in that order, identities ``family_person`` numbered by first appearance."""

    name = "mufac"
    LAYOUT = annotations_lib.MUFAC_LAYOUT
    MANUAL_DOWNLOAD_INSTRUCTIONS = (
        "Put MUFAC's custom_{train,val,test}_dataset.csv and {train,val,test}_images/ under "
        "<data_dir>/mufac/.")


BUILDERS: Mapping[str, type[_FaceBuilder]] = {"celeba": CelebA, "celebahq": CelebAHQ,
                                              "mufac": MUFAC}


def face_builder(table: FaceTable, tfds_dir: str) -> _FaceBuilder:
    """The builder of ``table``'s dataset, its config named after the table's fingerprint."""
    if table.dataset not in BUILDERS:
        raise DataError(f"no image builder for dataset {table.dataset!r}; expected one of "
                        f"{', '.join(BUILDERS)}")
    config = tfds.core.BuilderConfig(
        name=f"fp{table.fingerprint()[:16]}",
        description=f"built from {os.path.abspath(table.data_dir)}")
    return BUILDERS[table.dataset](table=table, data_dir=tfds_dir, config=config,
                                   file_format=FILE_FORMAT)


def build(table: FaceTable, tfds_dir: str) -> Sequence[Mapping[str, Any]]:
    """Builds ``table`` into ``tfds_dir`` once (reused afterwards); returns its data source."""
    builder = face_builder(table, tfds_dir)
    if not builder.is_prepared():
        config_dir = os.path.dirname(os.fspath(builder.data_dir))
        for stale in glob.glob(os.path.join(config_dir, "incomplete.*")):
            logging.warning("removing the leftovers of an interrupted build: %s", stale)
            shutil.rmtree(stale, ignore_errors=True)
        logging.info("building %s (%d images) into %s", table.dataset, len(table.files),
                     builder.data_dir)
        builder.download_and_prepare(
            file_format=FILE_FORMAT,
            download_config=tfds.download.DownloadConfig(manual_dir=table.data_dir))
    return builder.as_data_source(split=SPLIT)
