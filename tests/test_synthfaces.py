"""Tests of SynthFaces, the embedded default dataset: generator and TFDS builder."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from oneshui_jax.data import synthfaces as sf

SMALL = sf.named_config("small")
LARGE = sf.named_config("large")
N_ID = len(sf.IDENTITY_ATTRIBUTES)
N_IMG = len(sf.IMAGE_ATTRIBUTES)
N_QUIRK = len(sf.QUIRK_ATTRIBUTES)


@pytest.fixture(scope="session")
def small_examples() -> list[sf.Example]:
    return list(sf.examples(SMALL))


@pytest.fixture(scope="session")
def small_labels(small_examples: list[sf.Example]) -> np.ndarray:
    return np.stack([e["label"] for e in small_examples])


@pytest.fixture(scope="session")
def small_ids(small_examples: list[sf.Example]) -> np.ndarray:
    return np.array([e["identity"] for e in small_examples])


@pytest.fixture(scope="session")
def tfds_dir(synthfaces_tfds: str) -> Path:
    return Path(synthfaces_tfds)


@pytest.fixture(scope="session")
def small_source(tfds_dir: Path):
    from oneshui_jax.data import tfds_builders  # not at the top: the generator must not need TFDS

    return tfds_builders.build_synthfaces(str(tfds_dir), "small")


def _digest(cfg: sf.SynthFacesConfig, indices: list[int]) -> str:
    sha = hashlib.sha256()
    for i in indices:
        image, labels, identity = sf.render(cfg, i)
        sha.update(image.tobytes() + labels.tobytes() + str(identity).encode())
    return sha.hexdigest()


# ---------------------------------------------------------------------------------- config


@pytest.mark.parametrize(
    "field, value",
    [
        ("num_identities", 0),
        ("min_images", 0),
        ("max_images", 1),
        ("image_size", 31),
        ("image_size", 65),
        ("seed", -1),
    ],
)
def test_bad_config_raises_naming_field(field: str, value: int) -> None:
    with pytest.raises(ValueError, match=field):
        sf.SynthFacesConfig(**{field: value})


def test_named_configs() -> None:
    assert LARGE == sf.SynthFacesConfig()
    assert (SMALL.num_identities, SMALL.image_size, SMALL.seed) == (150, 32, 0)
    medium = sf.named_config(sf.DEFAULT_CONFIG)
    assert (sf.DEFAULT_CONFIG, medium.num_identities, medium.image_size) == ("medium", 600, 48)
    with pytest.raises(ValueError, match="nope"):
        sf.named_config("nope")
    with pytest.raises(ValueError, match="'default' is now called 'large'"):
        sf.named_config("default")


# ---------------------------------------------------------------------------------- determinism


def test_same_seed_identical_across_processes() -> None:
    """A fresh interpreter (no caches, no shared state) renders identical images and labels."""
    indices = [0, 7, 500, sf.num_images(SMALL) - 1]
    code = (
        "import sys; from tests.test_synthfaces import SMALL, _digest; "
        f"print(_digest(SMALL, {indices})); "
        "assert 'tensorflow_datasets' not in sys.modules, 'generator must not import tfds'"
    )
    root = Path(__file__).resolve().parents[1]
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=root, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == _digest(SMALL, indices)


def test_different_seed_differs() -> None:
    other = sf.SynthFacesConfig(num_identities=150, image_size=32, seed=1)
    assert not np.array_equal(sf.identity_table(other), sf.identity_table(SMALL))
    assert not np.array_equal(sf.label_table(other)[:50], sf.label_table(SMALL)[:50])
    assert not np.array_equal(sf.render(other, 0)[0], sf.render(SMALL, 0)[0])


def test_random_access_equals_iterator(small_examples: list[sf.Example]) -> None:
    n = len(small_examples)
    assert n == sf.num_images(SMALL)
    for i in [0, 1, 2, 3, 57, 400, n // 2, n - 2, n - 1]:
        image, labels, identity = sf.render(SMALL, i)
        ex = small_examples[i]
        assert ex["index"] == i
        assert image.dtype == np.uint8 and image.shape == (32, 32, 3)
        np.testing.assert_array_equal(image, ex["image"])
        np.testing.assert_array_equal(labels, ex["label"])
        assert identity == ex["identity"]
    with pytest.raises(IndexError):
        sf.render(SMALL, n)


def test_tables_agree_with_rendered_examples(
    small_examples: list[sf.Example], small_labels: np.ndarray, small_ids: np.ndarray
) -> None:
    table = sf.identity_table(SMALL)
    assert table.dtype == np.int64
    np.testing.assert_array_equal(table, small_ids)
    np.testing.assert_array_equal(sf.label_table(SMALL), small_labels)
    np.testing.assert_array_equal(np.unique(table), np.arange(SMALL.num_identities))
    assert np.all(np.diff(table) >= 0)  # contiguous, identities in order
    names = [e["file_name"] for e in small_examples]
    assert len(set(names)) == len(names)
    assert names[:3] == ["00000_00.png", "00000_01.png", sf.file_name(int(table[2]), 2)]


@pytest.mark.parametrize("name", ["small", "medium"])
def test_fewer_identities_are_a_prefix_of_more(name) -> None:
    fewer = sf.named_config(name)
    counts = sf.images_per_identity(fewer)
    np.testing.assert_array_equal(counts, sf.images_per_identity(LARGE)[: len(counts)])
    n = int(counts.sum())
    np.testing.assert_array_equal(sf.label_table(fewer), sf.label_table(LARGE)[:n])



# ---------------------------------------------------------------------------------- spread


def test_images_per_identity_spread() -> None:
    counts = sf.images_per_identity(LARGE)
    assert LARGE.num_identities >= 1000 and len(counts) == LARGE.num_identities
    assert counts.min() >= 2 and counts.max() <= 30
    low, high = sf.MEAN_IMAGES_TARGET
    assert low <= counts.mean() <= high
    assert np.median(counts) < counts.mean()  # skewed: most identities have few images
    assert (counts <= 4).mean() > 0.3 and counts.max() >= 25  # ... and a long tail
    assert sf.num_images(LARGE) == counts.sum() == len(sf.identity_table(LARGE))


# ---------------------------------------------------------------------------------- attributes


def test_attribute_names() -> None:
    names = sf.ATTRIBUTE_NAMES
    assert names == sf.IDENTITY_ATTRIBUTES + sf.IMAGE_ATTRIBUTES + sf.QUIRK_ATTRIBUTES
    assert len(set(names)) == len(names) == 24


def test_labels_are_binary_and_consistent(small_labels: np.ndarray) -> None:
    assert small_labels.dtype == np.uint8 and small_labels.shape[1] == len(sf.ATTRIBUTE_NAMES)
    assert set(np.unique(small_labels)) <= {0, 1}
    col = {name: small_labels[:, j] for j, name in enumerate(sf.ATTRIBUTE_NAMES)}
    hair = col["Black_Hair"] + col["Brown_Hair"] + col["Blond_Hair"] + col["Gray_Hair"]
    assert hair.max() <= 1
    assert not np.any(col["Bald"] & col["Long_Hair"])
    rates = small_labels.mean(axis=0)
    assert np.all((rates > 0.03) & (rates < 0.97))


def test_identity_attributes_constant_within_identity(
    small_labels: np.ndarray, small_ids: np.ndarray
) -> None:
    for identity in range(SMALL.num_identities):
        rows = small_labels[small_ids == identity, :N_ID]
        assert np.all(rows == rows[0]), identity


def test_image_attributes_vary_within_identity(
    small_labels: np.ndarray, small_ids: np.ndarray
) -> None:
    image_cols = small_labels[:, N_ID : N_ID + N_IMG]
    counts = np.bincount(small_ids)
    for j, name in enumerate(sf.IMAGE_ATTRIBUTES):
        mixed = [0 < image_cols[small_ids == i, j].mean() < 1 for i in np.flatnonzero(counts >= 4)]
        assert np.mean(mixed) > 0.5, name


def test_quirks_follow_identity_not_pixels() -> None:
    labels = sf.label_table(LARGE).astype(np.float64)
    ids = sf.identity_table(LARGE)
    quirks, visible = labels[:, -N_QUIRK:], labels[:, :-N_QUIRK]
    per_identity = np.stack(
        [quirks[ids == i].mean(axis=0) >= 0.5 for i in range(LARGE.num_identities)]
    )
    flips = (quirks != per_identity[ids]).mean()
    assert 0.0 < flips <= 2 * sf.QUIRK_LABEL_NOISE  # nearly constant, small label noise
    assert np.all(np.abs(per_identity.mean(axis=0) - 0.5) < 0.1)  # balanced: chance is 50 %
    corr = np.corrcoef(np.c_[visible, quirks].T)[: visible.shape[1], visible.shape[1] :]
    assert np.abs(corr).max() < 0.15


# ---------------------------------------------------------------------------------- identity


def test_identity_is_recognisable(small_examples: list[sf.Example], small_ids: np.ndarray) -> None:
    """Nearest centroid on standardised 16x16 face crops, one held-out image per identity."""
    s = SMALL.image_size
    crop = slice(s // 4, s - s // 4)
    feats = np.stack(
        [
            np.asarray(Image.fromarray(e["image"][crop, crop]).resize((16, 16)), np.float32).ravel()
            for e in small_examples
        ]
    )
    feats = (feats - feats.mean(axis=1, keepdims=True)) / (feats.std(axis=1, keepdims=True) + 1e-6)
    held_out = np.r_[small_ids[1:] != small_ids[:-1], True]  # last image of each identity
    centroids = np.stack(
        [feats[(small_ids == i) & ~held_out].mean(axis=0) for i in range(SMALL.num_identities)]
    )
    dists = ((feats[held_out][:, None, :] - centroids[None]) ** 2).sum(axis=-1)
    accuracy = (dists.argmin(axis=1) == small_ids[held_out]).mean()
    assert accuracy > 10.0 / SMALL.num_identities


# ---------------------------------------------------------------------------------- TFDS


def test_tfds_round_trip(small_source, small_examples: list[sf.Example]) -> None:
    assert len(small_source) == len(small_examples)
    for i in range(len(small_source)):
        record, ex = small_source[i], small_examples[i]
        assert record["index"] == i
        assert record["identity"] == ex["identity"]
        np.testing.assert_array_equal(record["label"], ex["label"])
        if i % 97 == 0 or i == len(small_source) - 1:
            assert record["image"].dtype == np.uint8 and record["image"].shape == (32, 32, 3)
            np.testing.assert_array_equal(record["image"], ex["image"])  # PNG is lossless
            assert record["file_name"].decode() == ex["file_name"]


def test_tfds_build_is_reused(small_source, tfds_dir: Path, monkeypatch) -> None:
    from oneshui_jax.data.tfds_builders import build_synthfaces
    from oneshui_jax.data.tfds_builders import synthfaces as builder_module

    root = tfds_dir / "synth_faces" / "small"
    before = {p: p.stat().st_mtime_ns for p in root.rglob("*")}
    assert any(p.name.startswith("synth_faces-train.array_record") for p in before)

    def never(*args, **kwargs):
        raise AssertionError("a finished build was generated again")

    monkeypatch.setattr(builder_module.SynthFaces, "_generate_examples", never)
    source = build_synthfaces(str(tfds_dir), "small")
    assert {p: p.stat().st_mtime_ns for p in root.rglob("*")} == before
    assert len(source) == len(small_source)
    assert not [p for p in os.listdir(root) if p.startswith("incomplete")]


def test_tfds_unknown_config(tfds_dir: Path) -> None:
    from oneshui_jax.data import tfds_builders

    with pytest.raises(ValueError, match="huge"):
        tfds_builders.synthfaces_builder(str(tfds_dir), "huge")


def test_a_build_says_building_never_downloading(tmp_path: Path, capsys, caplog) -> None:
    """Nothing is downloaded: TFDS's "Downloading and preparing" / "downloaded and prepared"
    lines are replaced by the package's "building" and "built" (``tfds_builders/local.py``)."""
    import logging

    from oneshui_jax.data.tfds_builders import build_synthfaces

    with caplog.at_level(logging.INFO, logger="absl"):
        build_synthfaces(str(tmp_path), "small")
    printed = capsys.readouterr()
    said = printed.out + printed.err + caplog.text
    assert "download" not in said.lower()
    assert "building SynthFaces small" in caplog.text and "built synth_faces" in caplog.text
