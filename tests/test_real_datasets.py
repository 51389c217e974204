"""CelebA, CelebA-HQ and MUFAC: label decoding, integrity audit, TFDS builds, clear errors.

MUFAC runs on the complete real dataset in ../shared/data; CelebA and CelebA-HQ on folders in
their exact formats, written from the real annotation files with tiny images (real_fixtures).
"""

import csv
import glob
import json
import os
import shutil

import ml_collections
import numpy as np
import pytest
import real_fixtures
from PIL import Image
from test_configs import load_config_file

from oneshui_jax import checkpoints, metrics, study
from oneshui_jax import splits as splits_lib
from oneshui_jax.data import annotations, audit, datasets, pipeline
from oneshui_jax.errors import DataError


def data_cfg(data_dir, tfds_dir, dedup="none"):
    return ml_collections.ConfigDict(dict(data_dir=str(data_dir), tfds_dir=str(tfds_dir),
                                          dedup=dedup, num_threads=2,
                                          synthfaces_config="medium"))


@pytest.fixture(scope="module")
def mufac(shared_data, tmp_path_factory):
    tfds_dir = tmp_path_factory.mktemp("tfds")
    return datasets.load("mufac", data_cfg(shared_data, tfds_dir)), tfds_dir


# --------------------------------------------------------------------------- labels


def test_mufac_labels_follow_the_age_letter(shared_data):
    ann = annotations.read_identities("mufac", shared_data)
    labels = annotations.read_labels("mufac", shared_data, ann)
    assert labels.task == "classification" and len(labels.names) == 8
    rows = [r for _, _, _, r in annotations.read_mufac_rows(shared_data)]
    assert len(rows) == len(labels.values) == 13068
    assert all(labels.values[i] == "abcdefgh".index(r[2]) for i, r in enumerate(rows))
    assert np.bincount(labels.values).tolist() == [2894, 2678, 2272, 1669, 1826, 956, 500, 273]


def test_celebahq_attributes_are_read_from_the_real_file(shared_data):
    ann = annotations.read_identities("celebahq", shared_data)
    labels = annotations.read_labels("celebahq", shared_data, ann)
    assert labels.values.shape == (30000, 40) and labels.values.dtype == np.uint8
    assert labels.names == tuple(real_fixtures.CELEBA_ATTRIBUTES)
    path = os.path.join(shared_data, "CelebAMask-HQ", "CelebAMask-HQ-attribute-anno.txt")
    with open(path) as f:
        lines = f.read().splitlines()[2:]
    for line in (lines[0], lines[12345], lines[-1]):
        fields = line.split()
        k = int(fields[0].split(".")[0])
        assert labels.values[k].tolist() == [int(v != "-1") for v in fields[1:]]


def test_celeba_attributes_decode_as_torchvision(shared_data, tmp_path):
    attrs = real_fixtures.write_celeba(str(tmp_path), shared_data, n=12)
    ann = annotations.read_identities("celeba", str(tmp_path))
    labels = annotations.read_labels("celeba", str(tmp_path), ann)
    np.testing.assert_array_equal(labels.values, (attrs + 1) // 2)
    assert labels.names == tuple(real_fixtures.CELEBA_ATTRIBUTES)


def test_celeba_files_must_list_the_same_images(shared_data, tmp_path):
    real_fixtures.write_celeba(str(tmp_path), shared_data, n=12)
    path = tmp_path / "celeba" / "list_eval_partition.txt"
    lines = path.read_text().splitlines()
    path.write_text("\n".join(lines[:5] + lines[6:7] + lines[5:6] + lines[7:]) + "\n")
    ann = annotations.read_identities("celeba", str(tmp_path))
    with pytest.raises(DataError, match=r"list_eval_partition.txt .* first differ at row 6"):
        annotations.read_labels("celeba", str(tmp_path), ann)


# --------------------------------------------------------------------------- audit


def test_mufac_audit_reports_the_duplicate_groups(mufac):
    ds, _ = mufac
    summary = ds.audit.summary()
    assert (summary["images"], summary["missing"], summary["unreadable"]) == (13068, 0, 0)
    assert summary["duplicate_groups"] == 3144 and summary["duplicate_images"] == 7093
    assert summary["groups_spanning_identities"] == 3144
    assert summary["images_in_spanning_groups"] == 7093
    group = ds.audit.spanning_groups()[0]
    files = [os.path.join(ds.audit.data_dir, ds.audit.files[i]) for i in group]
    assert len({open(f, "rb").read() for f in files}) == 1  # really byte-identical


def test_audit_counts_groups_crossing_the_split(mufac):
    ds, _ = mufac
    sp = splits_lib.make_splits(ds.annotations, 10, 0)
    images = splits_lib.split_images(ds.annotations, sp)
    roles = {r: images[r] for r in ("forget", "support", "retain", "val", "test")}
    crossing = ds.audit.crossing(roles)
    role_of = {int(i): r for r, idx in roles.items() for i in idx}
    expected = {}
    for g in ds.audit.duplicate_groups:
        key = "+".join(sorted({role_of[i] for i in g}))
        if "+" in key:
            expected[key] = expected.get(key, 0) + 1
    assert crossing == expected and crossing["retain+test"] > 0


def test_audit_cache_resumes_and_notices_changes(tmp_path, monkeypatch):
    for i in range(6):
        real_fixtures.write_jpeg(str(tmp_path / "d" / f"{i}.jpg"), i, (32, 32))
    shutil.copy(tmp_path / "d" / "0.jpg", tmp_path / "d" / "dup.jpg")
    files = tuple(f"d/{n}" for n in ("0.jpg", "1.jpg", "2.jpg", "3.jpg", "4.jpg", "5.jpg",
                                     "dup.jpg"))
    cache = str(tmp_path / "cache" / "audit.jsonl")
    first = audit.check_files(str(tmp_path), files, cache)
    assert all(c.error is None for c in first) and first[0].sha256 == first[6].sha256
    calls = []
    real_check = audit._check_file
    monkeypatch.setattr(audit, "_check_file", lambda p: calls.append(p) or real_check(p))
    assert audit.check_files(str(tmp_path), files, cache) == first and calls == []
    data = (tmp_path / "d" / "3.jpg").read_bytes()
    (tmp_path / "d" / "3.jpg").write_bytes(data[: len(data) // 2])  # truncate
    again = audit.check_files(str(tmp_path), files, cache)
    assert calls == [str(tmp_path / "d" / "3.jpg")]
    assert again[3].error and "trunc" in again[3].error.lower()
    with open(cache, "a") as f:
        f.write('{"file": "d/4.jpg", "si')  # a line cut short by a kill is ignored
    assert audit.check_files(str(tmp_path), files, cache)[4] == first[4]


def test_merge_identities_joins_every_spanning_group(mufac, shared_data, tmp_path):
    ds, tfds_dir = mufac
    merged = datasets.load("mufac", data_cfg(shared_data, tfds_dir, dedup="merge"))
    ids = merged.annotations.identities
    assert merged.merged_identities == 375
    assert sorted(set(ids.tolist())) == list(range(1216 - 375))  # contiguous, as the reference
    assert all(len(set(ids[g].tolist())) == 1 for g in ds.audit.duplicate_groups)
    raw = ds.annotations.identities
    for a_raw in np.unique(raw)[:200]:  # never splits an identity
        assert len(set(ids[raw == a_raw].tolist())) == 1
    assert merged.source[7]["identity"] == ids[7] and ds.source[7]["identity"] == raw[7]
    sp = splits_lib.make_splits(merged.annotations, 10, 0)
    images = splits_lib.split_images(merged.annotations, sp)
    roles = {r: images[r] for r in ("forget", "support", "retain", "val", "test")}
    crossing = merged.audit.crossing(roles)
    assert set(crossing) <= {"forget+support"}  # duplicates now stay on one side of the split


# --------------------------------------------------------------------------- builds


def test_mufac_records_hold_the_original_images_in_reference_order(mufac, shared_data):
    ds, _ = mufac
    assert len(ds.source) == 13068 and ds.task == "classification" and ds.num_classes == 8
    rows = [(s, r) for s, _, _, r in annotations.read_mufac_rows(shared_data)]
    for i in (0, 5000, 10025, 13067):
        split, row = rows[i]
        record = ds.source[i]
        path = os.path.join(shared_data, "mufac", f"{split}_images", row[-1])
        expected = np.asarray(Image.open(path).convert("RGB"))
        np.testing.assert_array_equal(record["image"], expected)
        assert record["label"] == "abcdefgh".index(row[2]) and record["index"] == i
        assert record["identity"] == ds.annotations.identities[i]


def test_a_finished_build_is_reused(mufac, shared_data, monkeypatch):
    _, tfds_dir = mufac
    from oneshui_jax.data.tfds_builders import faces

    def no_build(*args, **kwargs):
        raise AssertionError("rebuilt a finished dataset")

    monkeypatch.setattr(faces.MUFAC, "download_and_prepare", no_build)
    assert len(datasets.load("mufac", data_cfg(shared_data, tfds_dir)).source) == 13068


@pytest.mark.parametrize("name", ["celeba", "celebahq"])
def test_celeba_builders_on_fixture_images(name, shared_data, tmp_path):
    write = real_fixtures.write_celeba if name == "celeba" else real_fixtures.write_celebahq
    write(str(tmp_path / "data"), shared_data)
    ds = datasets.load(name, data_cfg(tmp_path / "data", tmp_path / "tfds"))
    ann = annotations.read_identities(name, str(tmp_path / "data"))
    labels = annotations.read_labels(name, str(tmp_path / "data"), ann)
    assert len(ds.source) == ann.num_images and ds.task == "multilabel" and ds.num_classes == 40
    for i in (0, ann.num_images - 1):
        record = ds.source[i]
        expected = np.asarray(Image.open(tmp_path / "data" / ann.files[i]).convert("RGB"))
        np.testing.assert_array_equal(record["image"], expected)
        np.testing.assert_array_equal(record["label"], labels.values[i])
        assert record["identity"] == ann.identities[i]
    assert ds.audit.summary()["duplicate_groups"] == 0


def test_changed_files_make_a_new_build(shared_data, tmp_path):
    real_fixtures.write_celebahq(str(tmp_path / "data"), shared_data, n=8)
    cfg = data_cfg(tmp_path / "data", tmp_path / "tfds")
    first = datasets.load("celebahq", cfg)
    real_fixtures.write_jpeg(str(tmp_path / "data" / "CelebAMask-HQ" / "CelebA-HQ-img" /
                                 "3.jpg"), 99, (64, 64))
    second = datasets.load("celebahq", cfg)
    assert not np.array_equal(first.source[3]["image"], second.source[3]["image"])
    assert len(glob.glob(str(tmp_path / "tfds" / "celebahq" / "fp*" / "1.0.0"))) == 2


def test_an_interrupted_build_leaves_nothing_and_the_next_one_completes(
        shared_data, tmp_path, monkeypatch):
    from oneshui_jax.data.tfds_builders import faces

    real_fixtures.write_celebahq(str(tmp_path / "data"), shared_data, n=8)
    cfg = data_cfg(tmp_path / "data", tmp_path / "tfds")
    real_generate = faces._FaceBuilder._generate_examples

    def interrupted(self, data_dir):
        for n, example in enumerate(real_generate(self, data_dir)):
            if n == 4:
                raise KeyboardInterrupt
            yield example

    monkeypatch.setattr(faces._FaceBuilder, "_generate_examples", interrupted)
    with pytest.raises(KeyboardInterrupt):
        datasets.load("celebahq", cfg)
    assert glob.glob(str(tmp_path / "tfds" / "celebahq" / "fp*" / "1.0.0")) == []
    monkeypatch.setattr(faces._FaceBuilder, "_generate_examples", real_generate)
    assert len(datasets.load("celebahq", cfg).source) == 8
    assert glob.glob(str(tmp_path / "tfds" / "celebahq" / "fp*" / "incomplete.*")) == []


# --------------------------------------------------------------------------- errors


def test_a_wrong_data_dir_is_one_clear_error(tmp_path):
    with pytest.raises(DataError, match="Data directory not found: .*nowhere"):
        datasets.load("mufac", data_cfg(tmp_path / "nowhere", tmp_path / "tfds"))
    os.makedirs(tmp_path / "empty")
    with pytest.raises(DataError, match=r"mufac.*custom_\{train,val,test\}_dataset.csv"):
        datasets.load("mufac", data_cfg(tmp_path / "empty", tmp_path / "tfds"))


def test_a_missing_annotation_file_is_named(shared_data, tmp_path):
    real_fixtures.write_celeba(str(tmp_path / "data"), shared_data, n=6)
    os.remove(tmp_path / "data" / "celeba" / "list_attr_celeba.txt")
    with pytest.raises(DataError, match=r"list_attr_celeba.txt.*Expected <data_dir>/celeba/"):
        datasets.load("celeba", data_cfg(tmp_path / "data", tmp_path / "tfds"))


def test_a_csv_with_missing_columns_is_named(shared_data, tmp_path):
    real_fixtures.write_mufac_subset(str(tmp_path / "data"), shared_data,
                                     {"train": 5, "val": 3, "test": 3})
    path = tmp_path / "data" / "mufac" / "custom_val_dataset.csv"
    rows = list(csv.reader(open(path, newline="")))
    rows[2] = rows[2][:3]
    with open(path, "w", newline="") as f:
        csv.writer(f).writerows(rows)
    with pytest.raises(DataError, match=r"custom_val_dataset.csv, line 3: expected 4 non-empty"):
        datasets.load("mufac", data_cfg(tmp_path / "data", tmp_path / "tfds"))
    rows = [["family", "person", "age", "path"]] + rows[1:]
    with open(path, "w", newline="") as f:
        csv.writer(f).writerows(rows)
    with pytest.raises(DataError, match="line 1: header .* family_id,person_id"):
        datasets.load("mufac", data_cfg(tmp_path / "data", tmp_path / "tfds"))


def test_truncated_and_missing_images_stop_before_anything_is_built(shared_data, tmp_path):
    real_fixtures.write_celebahq(str(tmp_path / "data"), shared_data, n=8)
    img = tmp_path / "data" / "CelebAMask-HQ" / "CelebA-HQ-img"
    data = (img / "2.jpg").read_bytes()
    (img / "2.jpg").write_bytes(data[: len(data) // 2])
    os.remove(img / "5.jpg")
    with pytest.raises(DataError) as error:
        datasets.load("celebahq", data_cfg(tmp_path / "data", tmp_path / "tfds"))
    message = str(error.value)
    assert "1 missing image(s): " in message and "5.jpg" in message
    assert "1 unreadable image(s): " in message and "2.jpg (" in message
    assert "nothing was built" in message and "CelebA-HQ-identity.txt" in message
    assert not os.path.exists(tmp_path / "tfds" / "celebahq")


def test_an_unknown_dedup_option_is_rejected(shared_data, tmp_path):
    with pytest.raises(DataError, match="config.data.dedup is 'drop'; expected one of"):
        datasets.load("mufac", data_cfg(shared_data, tmp_path, dedup="drop"))


# --------------------------------------------------------------------------- the study


@pytest.mark.slow
def test_the_study_runs_on_real_mufac_faces_and_records_the_audit(shared_data, tmp_path):
    real_fixtures.write_mufac_subset(str(tmp_path / "data"), shared_data,
                                     {"train": 600, "val": 150, "test": 150})
    # One cheap method (the CPU profile's default runs them all; the stage code is the same, and
    # MetaUnlearn on a classification task has its own tests).
    config = load_config_file("mufac").get_config("N=5,profile=cpu,method=lipschitz")
    config.data.data_dir = str(tmp_path / "data")
    config.data.tfds_dir = str(tmp_path / "tfds")
    config.workdir = str(tmp_path / "work")
    config.checkpoint_dir = str(tmp_path / "ckpt")
    config.model.name = "vit_tiny_test"
    config.data.image_size = 32
    config.data.num_threads = 0
    config.train.epochs = 1
    config.progress = False
    records = study.run(config)
    assert [r["method"] for r in records] == ["pretrain", "retrain", "retrain_2", "lipschitz"]
    assert all(0.0 <= r[s]["metric"] <= 100.0 for r in records for s in metrics.EVAL_SPLITS)
    saved = json.load(open(tmp_path / "work" / "results.json"))
    audit_summary = saved["data_audit"]
    assert audit_summary["images"] == 900 and audit_summary["duplicate_groups"] > 0
    assert audit_summary["dedup"] == "none" and "groups_crossing_split" in audit_summary
    rdir = checkpoints.run_dir(config.checkpoint_dir, "mufac", "vit_tiny_test", "pretrain", 5, 0)
    assert checkpoints.read_metadata(rdir)["data_audit"] == audit_summary
    from oneshui_jax import inspect as inspect_lib

    text = inspect_lib.format_summary(inspect_lib.run_summary(rdir))
    assert f"{audit_summary['duplicate_groups']} duplicate groups" in text
    assert "| pretrain |" in (tmp_path / "work" / "results.md").read_text()


def test_celeba_annotation_files_are_checked_against_the_official_md5(shared_data, tmp_path):
    assert annotations.celeba_md5_mismatches(shared_data) == []  # the real identity file
    real_fixtures.write_celeba(str(tmp_path), shared_data, n=6)
    assert sorted(os.path.basename(p) for p in annotations.celeba_md5_mismatches(str(tmp_path))) \
        == ["identity_CelebA.txt", "list_attr_celeba.txt", "list_eval_partition.txt"]


def test_the_splits_cli_can_merge_duplicate_identities(shared_data, tmp_path, capsys):
    out = tmp_path / "split.json"
    from oneshui_jax.cli import splits as splits_cli

    splits_cli.main(["--dataset", "mufac", "--data_dir", shared_data, "--num_identities", "5",
                     "--out", str(out), "--dedup", "merge"])
    assert "dedup=merge: 375 identities merged" in capsys.readouterr().out
    merged = json.load(open(out))
    assert len(merged["train"]) + len(merged["val"]) + len(merged["test"]) == 841


def test_merge_identities_on_a_small_table():
    ann = annotations.IdentityAnnotations(
        "celebahq", np.asarray([0, 1, 2, 3, 4, -1, 2], np.int64),
        tuple(f"{k}.jpg" for k in range(7)), "list")
    merged, removed = audit.merge_identities(ann, [[1, 3], [3, 6]])  # joins ids 1, 3 and 2
    assert merged.identities.tolist() == [0, 1, 1, 1, 2, -1, 1] and removed == 2
    keyed = annotations.IdentityAnnotations("celeba", np.asarray([7, 9, 5, 9]), ("a", "b", "c",
                                                                              "d"), "dict")
    merged, removed = audit.merge_identities(keyed, [[0, 2]])  # CelebA keeps its own ids
    assert merged.identities.tolist() == [5, 9, 5, 9] and removed == 1


def test_in_memory_records_equal_the_built_ones(shared_data, tmp_path):
    real_fixtures.write_celebahq(str(tmp_path / "data"), shared_data, n=8)
    cfg = data_cfg(tmp_path / "data", tmp_path / "tfds")
    on_disk = datasets.load("celebahq", cfg)
    cfg.in_memory = True
    held = datasets.load("celebahq", cfg)
    assert isinstance(held.source, datasets.InMemorySource)
    assert held.fingerprint == on_disk.fingerprint and len(held.source) == len(on_disk.source)
    for i in range(len(on_disk.source)):
        a, b = on_disk.source[i], held.source[i]
        assert set(a) == set(b)
        for key in a:
            np.testing.assert_array_equal(np.asarray(a[key]), b[key])
    # The training pipeline yields bit-identical batches from either.
    pcfg = pipeline.PipelineConfig(image_size=16, batch_size=3, seed=1, crop_scale=(0.3, 1.0))
    indices = np.arange(len(on_disk.source))
    for x, y in zip(pipeline.to_iterator(pipeline.train_dataset(on_disk.source, indices, pcfg, 2),
                                         pcfg),
                    pipeline.to_iterator(pipeline.train_dataset(held.source, indices, pcfg, 2),
                                         pcfg), strict=True):
        for key in x:
            np.testing.assert_array_equal(x[key], y[key])
    bad = ml_collections.ConfigDict({**cfg.to_dict(), "in_memory": "yes"})
    with pytest.raises(DataError, match="config.data.in_memory"):
        datasets.load("celebahq", bad)
