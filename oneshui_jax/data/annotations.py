"""Identity annotations of the 1-SHUI datasets, read exactly as the reference code reads them.

The reference (``method/dataset/dataset_classes.py``) numbers images and identities per dataset:

* CelebA: ``<data_dir>/celeba/identity_CelebA.txt``, rows ``<file> <id>`` in file order
  (000001.jpg .. 202599.jpg). Identity ids are CelebA's own (1..10177). ``identity_to_images``
  is a *dict* in first-appearance order.
* CelebA-HQ: ``<data_dir>/CelebAMask-HQ/CelebA-HQ-identity.txt``, rows ``<k>.jpg <person_id>``;
  image ``k`` is at position ``k``. The number of images is the first line of
  ``CelebAMask-HQ-attribute-anno.txt`` when that file exists. ``identity_to_images`` is a *list*
  of length ``max(id) + 1``.
* MUFAC: ``<data_dir>/mufac/custom_{train,val,test}_dataset.csv`` merged in that order; identity =
  ``family_id + "_" + person_id``, numbered by first appearance. A list, like CelebA-HQ.
* SynthFaces (the embedded default): ids 0..K-1 from the generator, a list.

``read_identities`` reads only identities (all the splits need). ``read_labels`` reads the task
labels the dataset builders store next to every image, decoded as the reference decodes them.

What the reference trusts is checked, each refusal one DataError naming the file and line: an
image path that leaves its image folder (absolute, or ``..`` climbing out), an image listed twice
in one file (both lines named). Text is UTF-8; a byte-order mark at the start of a file is read
(spreadsheet programs write one), a UTF-16 file is named as such.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import os
from collections.abc import Iterator, Sequence
from typing import IO, Literal

import numpy as np
from absl import logging

from oneshui_jax.data import catalog
from oneshui_jax.errors import DataError

CELEBA_LAYOUT = "<data_dir>/celeba/identity_CelebA.txt with rows '<000001.jpg> <identity id>'"
CELEBAHQ_LAYOUT = (
    "<data_dir>/CelebAMask-HQ/CelebA-HQ-identity.txt with rows '<k>.jpg <person id>' "
    "(and optionally CelebAMask-HQ-attribute-anno.txt whose first line is the image count)"
)
MUFAC_LAYOUT = (
    "<data_dir>/mufac/custom_{train,val,test}_dataset.csv with header "
    "'family_id,person_id,age_class,image_path' and images in <data_dir>/mufac/{split}_images/"
)
CELEBA_MD5 = {  # what torchvision checks before it reads CelebA (the reference's loader)
    "identity_CelebA.txt": "32bd1bd63d3c78cd57e08160ec5ed1e2",
    "list_attr_celeba.txt": "75e246fa4810816ffd6ee81facbd244c",
    "list_eval_partition.txt": "d32c9cbf5e040fd4025c592c306e6668",
}
MUFAC_SPLITS = ("train", "val", "test")
MUFAC_COLUMNS = ("family_id", "person_id", "age_class", "image_path")
MUFAC_AGE_CLASSES = ("0-6 years old", "7-12 years old", "13-19 years old", "20-30 years old",
                     "31-45 years old", "46-55 years old", "56-66 years old", "67-80 years old")
MUFAC_AGE_MAP = {letter: i for i, letter in enumerate("abcdefgh")}  # the reference's age_map
CELEBA_ATTR_LAYOUT = (
    "<data_dir>/celeba/list_attr_celeba.txt: line 1 the image count, line 2 the 40 attribute "
    "names, then rows '<000001.jpg> v1 .. v40' with values -1 or 1; and "
    "<data_dir>/celeba/list_eval_partition.txt with rows '<000001.jpg> <0|1|2>' (its row order is "
    "the dataset order)"
)
CELEBAHQ_ATTR_LAYOUT = (
    "<data_dir>/CelebAMask-HQ/CelebAMask-HQ-attribute-anno.txt: line 1 the image count, line 2 "
    "the 40 attribute names, then rows '<k>.jpg a1 .. a40' with values -1 or 1"
)


@dataclasses.dataclass(frozen=True)
class IdentityAnnotations:
    """Which identity each image of a dataset shows, in the reference's dataset order.

    Attributes:
      dataset: one of ``catalog.DATASETS``.
      identities: int64 array, the identity id of every image (dataset order).
      files: the image file of every image, relative to ``data_dir``.
      keyed: ``"dict"`` when the reference keeps ``identity_to_images`` as a dict (CelebA), else
        ``"list"`` (its length is then ``max(id) + 1`` and ids index it directly).
    """

    dataset: str
    identities: np.ndarray
    files: tuple[str, ...]
    keyed: Literal["dict", "list"]

    def __post_init__(self):
        if len(self.files) != len(self.identities):
            raise ValueError(
                f"{self.dataset}: {len(self.files)} files but {len(self.identities)} identities"
            )

    @property
    def num_images(self) -> int:
        return len(self.identities)

    def identity_ids(self) -> list[int]:
        """All identity ids in the reference's order (before any shuffle)."""
        if self.keyed == "dict":
            _, first = np.unique(self.identities, return_index=True)
            return [int(i) for i in self.identities[np.sort(first)]]
        return list(range(int(self.identities.max()) + 1))

    def identity_to_images(self) -> dict[int, list[int]] | list[list[int]]:
        """The reference's ``get_identity_to_images()``: image indices per identity."""
        ids = self.identities.tolist()
        if self.keyed == "dict":
            out: dict[int, list[int]] = {}
            for i, identity in enumerate(ids):
                out.setdefault(identity, []).append(i)
            return out
        table: list[list[int]] = [[] for _ in range(max(ids) + 1)]
        for i, identity in enumerate(ids):
            table[identity].append(i)  # identity -1 (no annotation) lands in the last list
        return table


def _require_file(path: str, layout: str) -> None:
    if not os.path.isdir(os.path.dirname(path) or "."):
        raise DataError(f"Data directory not found: {os.path.dirname(path)}. Expected {layout}.")
    if not os.path.isfile(path):
        raise DataError(f"Annotation file not found: {path}. Expected {layout}.")


_UTF16_BOMS = (b"\xff\xfe", b"\xfe\xff")


@contextlib.contextmanager
def _open_text(path: str, layout: str, newline: str | None = None) -> Iterator[IO[str]]:
    """``path`` opened as UTF-8 text; a UTF-8 byte-order mark at its start (as some editors and
    spreadsheet programs write) is read and dropped. Bytes that are not UTF-8, wherever they are
    read in the block, are a DataError naming the file and the layout expected (and the UTF-16
    byte-order mark, when the file starts with one)."""
    try:
        with open(path, encoding="utf-8-sig", newline=newline) as f:
            yield f
    except UnicodeDecodeError as e:
        hint = ""
        if e.start < 2 and bytes(e.object[:2]) in _UTF16_BOMS:
            hint = "; it starts with a UTF-16 byte-order mark: save it as UTF-8"
        raise DataError(f"{path} is not UTF-8 text (byte 0x{e.object[e.start]:02x}: {e.reason}"
                        f"{hint}). Expected {layout}.") from None


def _image_path(name: str, path: str, lineno: int, folder: str, layout: str) -> str:
    """``name``, an image file named on line ``lineno`` of the annotation file ``path``, checked
    to stay inside the image folder ``folder`` it is read from: an absolute path or one whose
    ``..`` climbs out of it is a DataError naming the file and line. (Symbolic links inside
    the folder are followed as they are: linking images into a data folder is a way to build
    one; only the text of the annotation is checked.)"""
    if "\x00" in name:
        raise DataError(f"{path}, line {lineno}: image path {name!r} holds a NUL byte; expected "
                        f"a file name inside {folder}/. Expected {layout}.")
    normal = os.path.normpath(name)
    if os.path.isabs(name) or normal == os.pardir or normal.startswith(os.pardir + os.sep):
        raise DataError(f"{path}, line {lineno}: image path {name!r} leaves the image folder "
                        f"{folder}/ (an absolute path, or '..' climbing out of it); expected a "
                        f"path inside it. Expected {layout}.")
    return name


def _refuse_duplicates(path: str, keys: Sequence[tuple[int, str]], what: str,
                       layout: str) -> None:
    """DataError naming both lines when two rows of the annotation file ``path`` name the same
    image (``keys``: ``(line, image)`` per row)."""
    first: dict[str, int] = {}
    for lineno, key in keys:
        if key in first:
            raise DataError(f"{path}, lines {first[key]} and {lineno}: {what} {key!r} is listed "
                            f"twice; expected each image once. Expected {layout}.")
        first[key] = lineno


def _read_rows(path: str, layout: str, num_fields: int) -> list[tuple[int, list[str]]]:
    """Whitespace-separated rows of ``path`` with ``num_fields`` or more fields (line numbers)."""
    _require_file(path, layout)
    rows = []
    with _open_text(path, layout) as f:
        for lineno, line in enumerate(f, start=1):
            fields = line.split()
            if not fields:
                continue
            if len(fields) < num_fields:
                raise DataError(
                    f"{path}, line {lineno}: expected {num_fields} fields, got {line.strip()!r}. "
                    f"Expected {layout}."
                )
            rows.append((lineno, fields))
    if not rows:
        raise DataError(f"{path} is empty. Expected {layout}.")
    return rows


def _parse_int(value: str, path: str, lineno: int, what: str, layout: str) -> int:
    try:
        return int(value)
    except ValueError:
        raise DataError(
            f"{path}, line {lineno}: {what} {value!r} is not an integer. Expected {layout}."
        ) from None


def read_celeba(data_dir: str) -> IdentityAnnotations:
    """CelebA identities from ``identity_CelebA.txt`` (file order = torchvision's order)."""
    path = os.path.join(data_dir, "celeba", "identity_CelebA.txt")
    folder = os.path.join("celeba", "img_align_celeba")
    files, ids, names = [], [], []
    for lineno, (name, identity, *_) in _read_rows(path, CELEBA_LAYOUT, 2):
        files.append(os.path.join(folder, _image_path(name, path, lineno, folder, CELEBA_LAYOUT)))
        names.append((lineno, os.path.normpath(name)))
        ids.append(_parse_int(identity, path, lineno, "identity", CELEBA_LAYOUT))
    _refuse_duplicates(path, names, "image", CELEBA_LAYOUT)
    return IdentityAnnotations("celeba", np.asarray(ids, np.int64), tuple(files), "dict")


def read_celebahq(data_dir: str) -> IdentityAnnotations:
    """CelebA-HQ identities; image ``k.jpg`` sits at index ``k``, unannotated images get -1."""
    folder = os.path.join(data_dir, "CelebAMask-HQ")
    path = os.path.join(folder, "CelebA-HQ-identity.txt")
    rows = _read_rows(path, CELEBAHQ_LAYOUT, 2)
    entries, numbers = [], []
    for lineno, (name, person, *_) in rows:
        _image_path(name, path, lineno, os.path.join("CelebAMask-HQ", "CelebA-HQ-img"),
                    CELEBAHQ_LAYOUT)
        stem = name.split(".")[0]
        k = _parse_int(stem, path, lineno, "image number", CELEBAHQ_LAYOUT)
        entries.append((k, _parse_int(person, path, lineno, "person id", CELEBAHQ_LAYOUT)))
        numbers.append((lineno, f"{k}.jpg"))
    _refuse_duplicates(path, numbers, "image", CELEBAHQ_LAYOUT)
    attr_path = os.path.join(folder, "CelebAMask-HQ-attribute-anno.txt")
    if os.path.isfile(attr_path):
        with _open_text(attr_path, CELEBAHQ_LAYOUT) as f:
            first = f.readline().strip()
        num_images = _parse_int(first, attr_path, 1, "image count", CELEBAHQ_LAYOUT)
    else:
        num_images = max(k for k, _ in entries) + 1
    identities = np.full(num_images, -1, np.int64)
    for k, person in entries:
        if not 0 <= k < num_images:
            raise DataError(
                f"{path}: image {k}.jpg is outside 0..{num_images - 1} (the image count in "
                f"{attr_path}). Expected {CELEBAHQ_LAYOUT}."
            )
        identities[k] = person
    files = tuple(os.path.join("CelebAMask-HQ", "CelebA-HQ-img", f"{k}.jpg")
                  for k in range(num_images))
    return IdentityAnnotations("celebahq", identities, files, "list")


def read_mufac_rows(data_dir: str) -> list[tuple[str, str, int, list[str]]]:
    """MUFAC CSV rows as ``(split, csv_path, line, row)``, train then val then test, header
    checked."""
    rows, empty = [], []
    for split in MUFAC_SPLITS:
        path = os.path.join(data_dir, "mufac", f"custom_{split}_dataset.csv")
        _require_file(path, MUFAC_LAYOUT)
        with _open_text(path, MUFAC_LAYOUT, newline="") as f:
            reader = csv.reader(f)
            header = next(reader, None)
            if header is None or tuple(h.strip() for h in header[:4]) != MUFAC_COLUMNS:
                raise DataError(
                    f"{path}, line 1: header {header!r} does not start with the columns "
                    f"{','.join(MUFAC_COLUMNS)}. Expected {MUFAC_LAYOUT}."
                )
            before, images = len(rows), []
            folder = os.path.join("mufac", f"{split}_images")
            for lineno, row in enumerate(reader, start=2):
                if not row:
                    continue
                if len(row) < 4 or not all(row[:4]):
                    raise DataError(
                        f"{path}, line {lineno}: expected 4 non-empty columns "
                        f"({','.join(MUFAC_COLUMNS)}), got {row!r}."
                    )
                _image_path(row[-1], path, lineno, folder, MUFAC_LAYOUT)
                images.append((lineno, os.path.normpath(row[-1])))
                rows.append((split, path, lineno, row))
            _refuse_duplicates(path, images, "image_path", MUFAC_LAYOUT)
        if len(rows) == before:
            empty.append((split, path))
    for split, path in empty:  # once every file is read: no warning before an error
        warn_no_rows(path, f"the MUFAC {split} split has no images")
    return rows


_WARNED_NO_ROWS: set[str] = set()


def warn_no_rows(path: str, consequence: str) -> None:
    """Warns (once per file and process) that the annotation file ``path`` has a header and no
    rows: not an error (an empty split can be meant), but rarely what was meant."""
    if path not in _WARNED_NO_ROWS:
        _WARNED_NO_ROWS.add(path)
        logging.warning("%s has a header but no rows: %s; is the file complete?", path,
                        consequence)


def read_mufac(data_dir: str) -> IdentityAnnotations:
    """MUFAC identities ``family_person`` numbered by first appearance over train, val, test."""
    seen: dict[str, int] = {}
    ids, files = [], []
    for split, _, _, row in read_mufac_rows(data_dir):
        key = "_".join(row[:2])
        ids.append(seen.setdefault(key, len(seen)))
        files.append(os.path.join("mufac", f"{split}_images", row[-1]))
    return IdentityAnnotations("mufac", np.asarray(ids, np.int64), tuple(files), "list")


def read_synthfaces(config_name: str = "medium") -> IdentityAnnotations:
    """SynthFaces identities, computed from the generator without rendering an image."""
    from oneshui_jax.data import synthfaces

    cfg = synthfaces.named_config(config_name)
    ids = synthfaces.identity_table(cfg)
    files = tuple(synthfaces.file_name(int(i), int(k)) for i, k in _within_identity(ids))
    return IdentityAnnotations("synthfaces", ids.astype(np.int64), files, "list")


def _within_identity(ids: np.ndarray) -> Sequence[tuple[int, int]]:
    """(identity, k-th image of that identity) for every image of a contiguous identity table."""
    out, last, k = [], None, 0
    for i in ids.tolist():
        k = k + 1 if i == last else 0
        out.append((i, k))
        last = i
    return out


def read_identities(dataset: str, data_dir: str | None = None,
                    synthfaces_config: str = "medium") -> IdentityAnnotations:
    """Identity annotations of ``dataset`` under ``data_dir`` (unused for SynthFaces)."""
    if dataset == "synthfaces":
        return read_synthfaces(synthfaces_config)
    readers = {"celeba": read_celeba, "celebahq": read_celebahq, "mufac": read_mufac}
    if dataset not in readers:
        raise DataError(f"Unknown dataset {dataset!r}; expected one of "
                        f"{', '.join(catalog.DATASETS)}.")
    layout = {"celeba": CELEBA_LAYOUT, "celebahq": CELEBAHQ_LAYOUT, "mufac": MUFAC_LAYOUT}[dataset]
    if not data_dir:
        raise DataError(f"Dataset {dataset!r} needs a data_dir; none was given. Expected the "
                        f"folder holding {layout}.")
    if not os.path.isdir(data_dir):
        raise DataError(f"Data directory not found: {data_dir}. Expected the folder holding "
                        f"{layout}.")
    return readers[dataset](data_dir)


@dataclasses.dataclass(frozen=True)
class Labels:
    """The task labels of a dataset, in the order of its ``IdentityAnnotations``.

    Attributes:
      task: ``"multilabel"`` (CelebA, CelebA-HQ: 40 attributes) or ``"classification"`` (MUFAC).
      names: the class or attribute names.
      values: uint8 multi-hot ``[n, C]`` (multi-label) or int64 class indices ``[n]``.
    """

    task: str
    names: tuple[str, ...]
    values: np.ndarray


def _attribute_file(path: str, layout: str) -> tuple[list[str], list[tuple[int, list[str]]]]:
    """Line 1: image count; line 2: attribute names; then ``name v1 .. vC`` rows, checked."""
    _require_file(path, layout)
    with _open_text(path, layout) as f:
        lines = f.read().splitlines()
    if len(lines) < 2:
        raise DataError(f"{path}: expected a count line and a names line. Expected {layout}.")
    count = _parse_int(lines[0].strip(), path, 1, "image count", layout)
    names = lines[1].split()
    rows = []
    for lineno, line in enumerate(lines[2:], start=3):
        fields = line.split()
        if not fields:
            continue
        if len(fields) != len(names) + 1:
            raise DataError(f"{path}, line {lineno}: expected a file name and {len(names)} values, "
                            f"got {len(fields)} fields. Expected {layout}.")
        rows.append((lineno, fields))
    if len(rows) != count:
        raise DataError(f"{path}: line 1 announces {count} images but {len(rows)} rows follow. "
                        f"Expected {layout}.")
    if not rows:
        warn_no_rows(path, "no image has attributes")
    return names, rows


def _plus_minus_one(fields: list[str], path: str, lineno: int, layout: str) -> list[int]:
    try:
        values = [int(v) for v in fields]
    except ValueError:
        values = None
    if values is None or any(v not in (-1, 1) for v in values):
        raise DataError(f"{path}, line {lineno}: attribute values must be -1 or 1, got "
                        f"{' '.join(fields)!r}. Expected {layout}.")
    return values


def read_celeba_labels(data_dir: str, ann: IdentityAnnotations) -> Labels:
    """CelebA's 40 attributes as torchvision reads them for ``split="all"``: ``(v + 1) // 2``.

    The dataset order is the row order of ``list_eval_partition.txt`` (the official partition
    itself is ignored, as in the reference); the identity and attribute files must list the same
    images in the same order.
    """
    folder = os.path.join(data_dir, "celeba")
    partition_path = os.path.join(folder, "list_eval_partition.txt")
    order = [fields[0] for _, fields in _read_rows(partition_path, CELEBA_ATTR_LAYOUT, 2)]
    attr_path = os.path.join(folder, "list_attr_celeba.txt")
    names, rows = _attribute_file(attr_path, CELEBA_ATTR_LAYOUT)
    expected = [os.path.basename(f) for f in ann.files]
    for path, listed in ((partition_path, order), (attr_path, [f[0] for _, f in rows])):
        if listed != expected:
            at = next((i for i, (a, b) in enumerate(zip(listed, expected, strict=False)) if a != b),
                      min(len(listed), len(expected)))
            raise DataError(
                f"{path} lists {len(listed)} images and identity_CelebA.txt {len(expected)}; they "
                f"first differ at row {at + 1} ({listed[at] if at < len(listed) else 'end'} vs "
                f"{expected[at] if at < len(expected) else 'end'}). Every CelebA annotation file "
                f"must list the same images in the same order. Expected {CELEBA_ATTR_LAYOUT}.")
    values = np.asarray([_plus_minus_one(f[1:], attr_path, n, CELEBA_ATTR_LAYOUT)
                         for n, f in rows], np.int64).reshape(len(rows), len(names))
    return Labels("multilabel", tuple(names), ((values + 1) // 2).astype(np.uint8))


def read_celebahq_labels(data_dir: str, ann: IdentityAnnotations) -> Labels:
    """CelebA-HQ's 40 attributes: image ``k.jpg`` has attribute ``j`` when its value is not -1."""
    path = os.path.join(data_dir, "CelebAMask-HQ", "CelebAMask-HQ-attribute-anno.txt")
    names, rows = _attribute_file(path, CELEBAHQ_ATTR_LAYOUT)
    values = np.zeros((ann.num_images, len(names)), np.uint8)
    seen = np.zeros(ann.num_images, bool)
    numbers = []
    for lineno, fields in rows:
        _image_path(fields[0], path, lineno, os.path.join("CelebAMask-HQ", "CelebA-HQ-img"),
                    CELEBAHQ_ATTR_LAYOUT)
        k = _parse_int(fields[0].split(".")[0], path, lineno, "image number", CELEBAHQ_ATTR_LAYOUT)
        numbers.append((lineno, f"{k}.jpg"))
        if not 0 <= k < ann.num_images:
            raise DataError(f"{path}, line {lineno}: image {fields[0]} is outside 0.."
                            f"{ann.num_images - 1}. Expected {CELEBAHQ_ATTR_LAYOUT}.")
        row = _plus_minus_one(fields[1:], path, lineno, CELEBAHQ_ATTR_LAYOUT)
        values[k] = np.asarray(row) != -1
        seen[k] = True
    _refuse_duplicates(path, numbers, "image", CELEBAHQ_ATTR_LAYOUT)
    if not seen.all():
        missing = np.flatnonzero(~seen)
        raise DataError(f"{path} has no row for {len(missing)} images (first: {missing[0]}.jpg). "
                        f"Expected {CELEBAHQ_ATTR_LAYOUT}.")
    return Labels("multilabel", tuple(names), values)


def read_mufac_labels(data_dir: str, ann: IdentityAnnotations) -> Labels:
    """MUFAC age classes: the ``age_class`` letter a..h as class 0..7."""
    values = []
    for _, path, lineno, row in read_mufac_rows(data_dir):
        if row[2] not in MUFAC_AGE_MAP:
            raise DataError(f"{path}, line {lineno}: age_class {row[2]!r} is not one of a..h. "
                            f"Expected {MUFAC_LAYOUT}.")
        values.append(MUFAC_AGE_MAP[row[2]])
    if len(values) != ann.num_images:
        raise DataError(f"{data_dir}/mufac: the CSVs changed while they were read; read again.")
    return Labels("classification", MUFAC_AGE_CLASSES, np.asarray(values, np.int64))


def celeba_md5_mismatches(data_dir: str) -> list[str]:
    """CelebA annotation files whose md5 differs from the official one torchvision verifies.

    The reference (through torchvision) refuses such files; we read them and warn, because a
    re-saved file (other line ends) can hold the same annotations.
    """
    import hashlib

    out = []
    for name, expected in CELEBA_MD5.items():
        path = os.path.join(data_dir, "celeba", name)
        if os.path.isfile(path):
            with open(path, "rb") as f:
                if hashlib.md5(f.read()).hexdigest() != expected:
                    out.append(path)
    return out


def read_labels(dataset: str, data_dir: str, ann: IdentityAnnotations) -> Labels:
    """The task labels of a real dataset, aligned with its identity annotations ``ann``."""
    readers = {"celeba": read_celeba_labels, "celebahq": read_celebahq_labels,
               "mufac": read_mufac_labels}
    if dataset not in readers:
        raise DataError(f"No labels to read for dataset {dataset!r}; expected one of "
                        f"{', '.join(readers)}.")
    return readers[dataset](data_dir, ann)
