"""One entry point to a dataset: its records, identity annotations, task and integrity audit.

``load(dataset, data_cfg)`` returns a ``Dataset`` whose ``source`` is a random-access sequence of
records (``image`` uint8 HWC, ``label``, ``identity``, ``index``) read from the dataset's built
array_record files, and whose ``annotations`` are the reference's identity numbering (for splits).

For the real datasets (CelebA, CelebA-HQ, MUFAC) it first reads the annotation files under
``data_cfg.data_dir`` and audits every image (``oneshui_jax.data.audit``): missing or unreadable
images stop the run with one message naming them; byte-identical images are reported, and with
``data_cfg.dedup == "merge"`` the identities sharing them are merged before splitting. Then it
builds the dataset once (``tfds_builders.faces``) and opens it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections.abc import Sequence
from typing import Any

import numpy as np
from absl import logging

from oneshui_jax import files
from oneshui_jax.data import annotations as annotations_lib
from oneshui_jax.data import audit as audit_lib
from oneshui_jax.data import catalog, images
from oneshui_jax.data.annotations import IdentityAnnotations, read_identities
from oneshui_jax.errors import DataError

DEDUP_OPTIONS = ("none", "merge")


@dataclasses.dataclass(frozen=True)
class Dataset:
    name: str
    task: str  # "multilabel" | "classification"
    label_names: tuple[str, ...]
    source: Sequence[dict[str, Any]]
    annotations: IdentityAnnotations
    audit: audit_lib.Audit | None = None  # real datasets only
    merged_identities: int = 0  # identities removed by dedup=merge
    # sha256 of what the records and identities hold (images, labels, identities after dedup):
    # equal fingerprints, equal data. Stages key reuse and resume on it (study/reuse.py).
    fingerprint: str = ""

    @property
    def num_classes(self) -> int:
        return len(self.label_names)


def decode_image(data: bytes, name: str = "image record") -> np.ndarray:
    """An image file's bytes as uint8 HWC RGB, as shown (``images.decode``); ``name`` names the
    record in errors (one DataError).

    For 8-bit RGB and greyscale images without transparency this is the reference's
    ``Image.open(p).convert("RGB")`` bit for bit; EXIF orientation is applied, and no MUFAC
    image carries one (``images``' docstring), so MUFAC decodes exactly as in the reference.
    """
    return images.decode(data, name)


def _record_name(dataset: str, index: int, record: dict[str, Any]) -> str:
    file_name = record.get("file_name", b"")
    if isinstance(file_name, bytes):
        file_name = file_name.decode("utf-8", "replace")
    return f"{dataset} record {index}" + (f" ({file_name})" if file_name else "")


class DecodedSource(Sequence):
    """Records of a built real dataset with the image decoded and the identity of ``identities``
    (the annotations': raw, or merged with ``dedup=merge``); ``name`` (the dataset) names a
    record that cannot be decoded."""

    def __init__(self, source: Sequence[dict[str, Any]], identities: np.ndarray,
                 name: str = "dataset"):
        self.source = source
        self.identities = identities
        self.name = name

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index):
        if not isinstance(index, (int, np.integer)):
            raise TypeError(f"records are read one index at a time, got {type(index).__name__}")
        record = self.source[int(index)]
        try:
            image = decode_image(record["image"])
        except images.ImageError as e:  # name the record (and its file) instead
            raise images.ImageError(_record_name(self.name, int(index), record), e.reason
                                    ) from None
        return {"image": image, "label": record["label"],
                "identity": self.identities[int(index)], "index": record["index"]}


class InMemorySource(Sequence):
    """Every record of ``source`` read (and decoded) once and held in memory
    (``config.data.in_memory``).

    A small dataset is otherwise decoded again on every epoch: for SynthFaces the PNG decode is
    about half of the input pipeline's work, and on two CPU cores the pipeline competes with the
    training step for them. The records are the same arrays the wrapped source returns, so every
    result is bit-identical with and without it.
    """

    def __init__(self, source: Sequence[dict[str, Any]], num_threads: int = 2,
                 desc: str | None = None):
        from concurrent.futures import ThreadPoolExecutor

        from tqdm.auto import tqdm

        def read(index: int) -> dict[str, Any]:
            return {k: np.asarray(v) for k, v in source[index].items()}

        with ThreadPoolExecutor(max(1, num_threads)) as pool:
            self.records = list(tqdm(pool.map(read, range(len(source))), total=len(source),
                                     desc=desc, unit="image", disable=desc is None,
                                     leave=False, dynamic_ncols=True))
        self.nbytes = sum(v.nbytes for r in self.records for v in r.values())

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index):
        if not isinstance(index, (int, np.integer)):
            raise TypeError(f"records are read one index at a time, got {type(index).__name__}")
        return self.records[int(index)]


def _in_memory(dataset: Dataset, data_cfg, progress: bool) -> Dataset:
    """``dataset`` with its source held in memory when ``data_cfg.in_memory`` is set."""
    in_memory = data_cfg.get("in_memory", False)
    if not isinstance(in_memory, bool):
        raise DataError(f"config.data.in_memory is {in_memory!r}; expected True or False")
    if not in_memory:
        return dataset
    source = InMemorySource(dataset.source, data_cfg.get("num_threads", 2),
                            desc=f"{dataset.name}: reading into memory" if progress else None)
    logging.info("%s: %d records held in memory (%.0f MB)", dataset.name, len(source),
                 source.nbytes / 2**20)
    return dataclasses.replace(dataset, source=source)


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


def audit_cache_path(tfds_dir: str, dataset: str, data_dir: str) -> str:
    """Where the per-file audit results of ``data_dir`` are cached (one file per data_dir)."""
    key = hashlib.sha256(os.path.abspath(data_dir).encode()).hexdigest()[:12]
    return os.path.join(tfds_dir, "oneshui_audit", f"{dataset}-{key}.jsonl")


def _fingerprint(build: str, ann: IdentityAnnotations) -> str:
    """The data fingerprint: the build's (content, or generator config) and the identities."""
    digest = hashlib.sha256(build.encode())
    digest.update(np.ascontiguousarray(ann.identities, np.int64).tobytes())
    return digest.hexdigest()


def _load_real(dataset: str, data_cfg, tfds_dir: str, progress: bool) -> Dataset:
    dedup = data_cfg.get("dedup", "none")
    if dedup not in DEDUP_OPTIONS:
        raise DataError(f"config.data.dedup is {dedup!r}; expected one of {DEDUP_OPTIONS}")
    data_dir = os.path.expanduser(data_cfg.get("data_dir") or "")
    _check_data_dir(dataset, data_cfg.get("data_dir") or "", data_dir)
    ann = read_identities(dataset, data_dir)
    labels = annotations_lib.read_labels(dataset, data_dir, ann)
    if dataset == "celeba":
        for path in annotations_lib.celeba_md5_mismatches(data_dir):
            logging.warning("%s is not the official file (its md5 differs from the one "
                            "torchvision verifies); the reference would refuse it", path)
    audit = audited(dataset, data_dir, ann, audit_cache_path(tfds_dir, dataset, data_dir),
                    num_threads=max(2, data_cfg.get("num_threads", 2)), progress=progress)
    from oneshui_jax.data.tfds_builders import faces

    table = faces.FaceTable(dataset, data_dir, ann.files, ann.identities, labels,
                            tuple(c.sha256 for c in audit.checks))
    with files.naming(tfds_dir):
        records = faces.build(table, tfds_dir)
    _check_records(dataset, records, ann)
    removed = 0
    if dedup == "merge":
        ann, removed = audit_lib.merge_identities(ann, audit.duplicate_groups)
    return Dataset(dataset, labels.task, labels.names,
                   DecodedSource(records, ann.identities, dataset), ann, audit, removed,
                   _fingerprint(table.fingerprint(), ann))


DATA_FOLDERS = {"celeba": "celeba", "celebahq": "CelebAMask-HQ", "mufac": "mufac"}
"""The folder of each real dataset under ``data_dir`` (README, Real data)."""


def _check_data_dir(dataset: str, given: str, data_dir: str) -> None:
    """One DataError naming ``--config.data.data_dir`` and the layout, unless ``data_dir`` holds
    the dataset's folder."""
    layout = f"expected the folder holding {_layout(dataset)} (README, Real data)"
    if not given:
        raise DataError(f"dataset {dataset!r} needs its files: --config.data.data_dir is not set;"
                        f" {layout}")
    if not os.path.isdir(data_dir):
        what = "is a file" if os.path.exists(data_dir) else "not found"
        raise DataError(f"Data directory {what}: --config.data.data_dir {given}; {layout}")
    folder = os.path.join(data_dir, DATA_FOLDERS[dataset])
    if not os.path.isdir(folder):
        raise DataError(f"--config.data.data_dir {given} has no {DATA_FOLDERS[dataset]}/ folder "
                        f"(Data directory not found: {folder}); {layout}")


def audited(dataset: str, data_dir: str, ann: IdentityAnnotations, cache_path: str | None = None,
            num_threads: int = 8, progress: bool = False) -> audit_lib.Audit:
    """The audit of ``ann``'s images; one DataError naming every missing or unreadable image."""
    audit = audit_lib.audit(dataset, data_dir, ann, cache_path, num_threads, progress)
    problems = audit.problems()
    if problems:
        raise DataError(f"{dataset} under {data_dir}: {problems}. Restore these files (expected "
                        f"layout: {_layout(dataset)}); nothing was built.")
    return audit


def _layout(dataset: str) -> str:
    return {"celeba": annotations_lib.CELEBA_LAYOUT, "celebahq": annotations_lib.CELEBAHQ_LAYOUT,
            "mufac": annotations_lib.MUFAC_LAYOUT}[dataset]


def load(dataset: str, data_cfg, progress: bool = False) -> Dataset:
    """Builds (once) and opens ``dataset``; ``data_cfg`` is the config's ``data`` block. With
    ``data_cfg.in_memory`` the records are read once and held in memory (``InMemorySource``)."""
    return _in_memory(_open(dataset, data_cfg, progress), data_cfg, progress)


def _open(dataset: str, data_cfg, progress: bool) -> Dataset:
    tfds_dir = os.path.expanduser(data_cfg.tfds_dir)
    if dataset == "synthfaces":
        from oneshui_jax.data import synthfaces
        from oneshui_jax.data.tfds_builders.synthfaces import SynthFaces, build_synthfaces

        with files.naming(tfds_dir):
            source = build_synthfaces(tfds_dir, data_cfg.synthfaces_config)
        ann = read_identities("synthfaces", synthfaces_config=data_cfg.synthfaces_config)
        _check_records(dataset, source, ann)
        generator = json.dumps(
            {"builder": f"{SynthFaces.name}/{SynthFaces.VERSION}",
             **dataclasses.asdict(synthfaces.named_config(data_cfg.synthfaces_config))},
            sort_keys=True)
        return Dataset(dataset, catalog.spec(dataset).task, tuple(synthfaces.ATTRIBUTE_NAMES),
                       source, ann, fingerprint=_fingerprint(generator, ann))
    if dataset in catalog.names(real=True):
        return _load_real(dataset, data_cfg, tfds_dir, progress)
    raise DataError(f"unknown dataset {dataset!r}; expected one of {', '.join(catalog.DATASETS)}")
