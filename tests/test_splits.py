"""Reference-exact identity splits (SPEC.md section 2) on the real annotation files."""

import hashlib
import json
import os
import random
import subprocess
import sys

import numpy as np
import pytest

from oneshui_jax.data.annotations import IdentityAnnotations, read_identities
from oneshui_jax.errors import ConfigError, DataError
from oneshui_jax.splits import (
    Splits,
    make_splits,
    retain_images,
    simulated_requests,
    split_images,
    split_using_target_ratio,
)

GOLDEN = os.path.join(os.path.dirname(__file__), "golden", "reference_splits.json")

# Identities train/val/test of the reference on the real annotation files (SPEC §2.5).
EXPECTED_SIZES = {
    ("celebahq", 0): (3735, 1253, 1229), ("celebahq", 1): (3758, 1236, 1223),
    ("celebahq", 2): (3761, 1242, 1214),
    ("celeba", 0): (6091, 2029, 2057), ("celeba", 1): (6096, 2045, 2036),
    ("celeba", 2): (6118, 2021, 2038),
    ("mufac", 0): (725, 247, 244), ("mufac", 1): (731, 238, 247), ("mufac", 2): (734, 243, 239),
}


@pytest.fixture(scope="module")
def annotations(shared_data):
    return {ds: read_identities(ds, shared_data) for ds in ("celeba", "celebahq", "mufac")}


def _fingerprint(values) -> str:
    return hashlib.sha256(json.dumps(values).encode()).hexdigest()[:16]


@pytest.mark.parametrize("dataset,seed", sorted(EXPECTED_SIZES))
def test_split_sizes_match_reference(annotations, dataset, seed):
    splits = make_splits(annotations[dataset], 10, seed)
    assert (len(splits.train), len(splits.val), len(splits.test)) == EXPECTED_SIZES[dataset, seed]


def test_image_counts_match_reference(annotations):
    images = split_images(annotations["celebahq"], make_splits(annotations["celebahq"], 10, 0))
    # 18000 train images include the 10 held-out support images.
    assert (len(images["train"]) + 10, len(images["val"]), len(images["test"])) == (
        18000, 6004, 5996)
    images = split_images(annotations["celeba"], make_splits(annotations["celeba"], 10, 0))
    assert (len(images["val"]), len(images["test"])) == (40495, 40548)


def test_content_and_order_equal_reference(annotations):
    """Every list, in order, equals what the original code produced (fingerprints)."""
    cases = json.load(open(GOLDEN))["cases"]
    assert len(cases) == 12
    for key, expected in cases.items():
        dataset, n, seed = key.split("/")
        n, seed = int(n[1:]), int(seed[4:])
        ann = annotations[dataset]
        splits = make_splits(ann, n, seed)
        for name, values in splits.to_dict().items():
            assert _fingerprint(values) == expected[name], (key, name)
        assert splits.forget[:3] == expected["first_forget"]
        if "sim7_second_draw" in expected:
            rng = random.Random(seed + 100)
            simulated_requests(ann, splits, 7, rng)  # the reference draws twice per epoch
            requests = simulated_requests(ann, splits, 7, rng)
            assert len(requests) == expected["num_requests"]
            got = [[r.support, r.forget] for r in requests]
            assert _fingerprint(got) == expected["sim7_second_draw"], key
            retain = sorted(retain_images(ann, splits, requests[0]).tolist())
            assert _fingerprint(retain) == expected["sim7_retain0_sorted"], key


def test_off_by_one_when_moving_left():
    """The reference subtracts identities[limit - 1] after decrementing: kept verbatim."""
    table = {10: [0, 1, 2, 3, 4], 11: [5], 12: [6], 13: [7]}
    counts = {k: len(v) for k, v in table.items()}
    left, right = split_using_target_ratio(0.5, [10, 11, 12, 13], counts, table)
    # A correct count would move on to the empty prefix; the reference stops at [10].
    assert (left, right) == ([10], [11, 12, 13])


def test_moving_right_stops_past_target():
    table = {1: [0], 2: [1], 3: [2], 4: [3, 4, 5, 6]}
    counts = {k: len(v) for k, v in table.items()}
    left, right = split_using_target_ratio(0.5, [1, 2, 3, 4], counts, table)
    # target 3.5: prefix counts 2 -> 3 -> 7, stops at the first prefix above target.
    assert (left, right) == ([1, 2, 3, 4], [])


def test_forget_rules_and_support(annotations):
    ann = annotations["mufac"]
    splits = make_splits(ann, 1, 0)
    counts = np.bincount(ann.identities)
    assert counts[splits.forget[0]] >= 6  # N == 1 needs 6 images
    splits = make_splits(ann, 10, 0)
    assert len(splits.forget) == len(splits.support) == 10
    for identity, image in zip(splits.forget, splits.support, strict=True):
        assert ann.identities[image] == identity
    images = split_images(ann, splits)
    for name in ("train", "val", "test", "forget", "retain"):
        assert not set(images[name]) & set(splits.support), name
    assert set(splits.forget) | set(splits.retain) == set(splits.train)


def test_too_many_forget_identities_is_an_error():
    ids = np.repeat(np.arange(10), [1, 1, 1, 1, 1, 1, 1, 1, 2, 2])
    ann = IdentityAnnotations("mufac", ids, tuple(str(i) for i in range(len(ids))), "list")
    with pytest.raises(ConfigError, match="silently"):
        make_splits(ann, 5, 0)


def test_simulated_requests_wrap_around(annotations):
    ann = annotations["mufac"]
    splits = make_splits(ann, 5, 0)
    requests = simulated_requests(ann, splits, 100, random.Random(0))
    assert len(requests) == -(-len(splits.train) // 100)
    assert all(len(r.identities) == 100 for r in requests)
    covered = set().union(*(r.identities for r in requests))
    assert covered == set(splits.train)
    for r in requests:
        assert not set(r.support) & set(splits.support)
        assert not set(r.forget) & set(r.support)


def test_splits_round_trip_and_reference_keys(annotations):
    splits = make_splits(annotations["mufac"], 5, 0)
    d = splits.to_dict()
    d["support_set"] = d.pop("support")
    assert Splits.from_dict(d) == splits
    with pytest.raises(ConfigError, match="missing"):
        Splits.from_dict({"train": []})


def test_cli_exports_json(shared_data, tmp_path):
    out = tmp_path / "split.json"
    subprocess.run(
        [sys.executable, "-m", "oneshui_jax.splits", "--dataset", "celebahq", "--data_dir",
         shared_data, "--num_identities", "20", "--seed", "1", "--out", str(out)],
        check=True, capture_output=True, text=True)
    record = json.loads(out.read_text())
    assert (len(record["train"]), len(record["val"]), len(record["test"])) == (3758, 1236, 1223)
    assert len(record["support"]) == len(record["support_files"]) == len(record["forget"]) == 20
    assert record["support_files"][0] == f"CelebAMask-HQ/CelebA-HQ-img/{record['support'][0]}.jpg"


def test_cli_reports_missing_annotation_file(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "oneshui_jax.splits", "--dataset", "celeba", "--data_dir",
         str(tmp_path), "--num_identities", "5", "--out", str(tmp_path / "x.json")],
        capture_output=True, text=True)
    assert result.returncode == 2, result.stderr  # one error line, status 2
    assert result.stderr.startswith(f"error: Data directory not found: {tmp_path / 'celeba'}. "
                                    "Expected <data_dir>/celeba/identity_CelebA.txt"), result.stderr
    assert len(result.stderr.splitlines()) == 1 and "Traceback" not in result.stderr
    assert result.stdout == "" and not (tmp_path / "x.json").exists()


def test_malformed_annotation_names_file_and_line(tmp_path):
    folder = tmp_path / "CelebAMask-HQ"
    folder.mkdir()
    (folder / "CelebA-HQ-identity.txt").write_text("0.jpg 0\n1.jpg x\n")
    with pytest.raises(DataError, match=r"CelebA-HQ-identity.txt, line 2"):
        read_identities("celebahq", str(tmp_path))
    (tmp_path / "mufac").mkdir()
    (tmp_path / "mufac" / "custom_train_dataset.csv").write_text("family_id,person_id\nF1,A\n")
    with pytest.raises(DataError, match="custom_train_dataset.csv, line 1"):
        read_identities("mufac", str(tmp_path))
    with pytest.raises(DataError, match="Data directory not found"):
        read_identities("mufac", str(tmp_path / "nope"))


def test_the_estimates_split_sizes_are_the_reference_split_of_seed_0(annotations):
    """``study/estimate.py`` plans with these sizes (train images with the support images)."""
    from oneshui_jax.study import estimate

    for dataset, sizes in estimate.SIZES.items():
        splits = make_splits(annotations[dataset], 10, 0)
        images = split_images(annotations[dataset], splits)
        assert (len(splits.train), len(images["train"]) + 10, len(images["val"]),
                len(images["test"])) == (sizes.train_identities, sizes.train, sizes.val,
                                         sizes.test), dataset
