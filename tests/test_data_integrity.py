"""Data and checkpoint files that say what is wrong, and integrity wherever it is claimed.

Through the real command lines, in process (``main(argv)``): annotation files (CelebA,
CelebA-HQ, MUFAC; tiny planted folders) read by ``python -m oneshui_jax.splits``, which reads
them as the study does; run directories checked by ``python -m oneshui_jax.inspect
[--verify]``; chained deletion requests (``python -m oneshui_jax.unlearn``) and every command
line that takes an input run and an output folder (serving, ``models.convert``,
``oneshui_jax.select``). Each refusal is one ``error: ...`` line, exit status 2, naming the
file (and line) or setting, and nothing is written.

Runs are cheap: a parameter tree of two arrays saved with ``checkpoints.save_params``, and the
``vit_tiny_test`` request chain of ``tests/doubles.py`` (one request served, a few seconds).
"""

import contextlib
import importlib.util
import json
import os
import shutil
import types

import doubles
import ml_collections
import numpy as np
import pytest
from test_cli_errors import _listing

from oneshui_jax import checkpoints
from oneshui_jax import main as main_cli
from oneshui_jax.cli import convert, splits
from oneshui_jax.cli import inspect as inspect_cli
from oneshui_jax.cli import request as request_cli
from oneshui_jax.cli import select as select_cli
from oneshui_jax.data import annotations
from oneshui_jax.serve import request as request_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BOM = b"\xef\xbb\xbf"
STATUS = 2  # every command line: one error line, exit status 2, nothing written


# --------------------------------------------------------------------------------------------
# Helpers


def call(capsys, main, argv, *, unchanged=()) -> types.SimpleNamespace:
    """``main(argv)`` in process: exit status, stdout, stderr; nothing under ``unchanged`` may
    be created, changed or removed."""
    before = {str(root): _listing(str(root)) for root in unchanged}
    capsys.readouterr()
    try:
        status = main(list(argv))
    except SystemExit as e:
        status = e.code
    captured = capsys.readouterr()
    for root, listing in before.items():
        after = _listing(root)
        changed = sorted(k for k in set(listing) | set(after) if listing.get(k) != after.get(k))
        assert not changed, f"written under {root}: {changed}"
    return types.SimpleNamespace(status=0 if status is None else status, out=captured.out,
                                 err=captured.err)


def error_line(outcome, *words: str) -> str:
    """The one ``error: ...`` line of a refused command (status 2, no traceback, no stdout),
    checked to name every one of ``words``."""
    assert outcome.status == STATUS, outcome
    lines = outcome.err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), outcome.err
    assert "Traceback" not in outcome.err and outcome.out == "", outcome
    missing = [word for word in words if word not in lines[0]]
    assert not missing, f"{missing} not in {lines[0]!r}"
    return lines[0]


# --------------------------------------------------------------------------------------------
# Annotation files: planted folders in the original layouts (README "Real data")

MUFAC_HEADER = "family_id,person_id,age_class,image_path\n"
IDENTITIES, IMAGES = 12, 3  # enough for a split of N=2 (train/val/test and 2 forget people)


def plant_mufac(root, rows: dict[str, list[str]] | None = None, bom: bytes = b"") -> str:
    """``root/mufac/custom_{train,val,test}_dataset.csv``: 12 people of 3 images (8 in train,
    2 in val, 2 in test) unless ``rows`` gives a split's rows; each file starts with ``bom``."""
    people = [f"F{p:02d},P,{'abc'[k]},F{p:02d}_{k}.jpg" for p in range(IDENTITIES)
              for k in range(IMAGES)]
    planted = {"train": people[:24], "val": people[24:30], "test": people[30:]}
    planted.update(rows or {})
    os.makedirs(os.path.join(root, "mufac"), exist_ok=True)
    for split, lines in planted.items():
        text = MUFAC_HEADER + "".join(line + "\n" for line in lines)
        with open(os.path.join(root, "mufac", f"custom_{split}_dataset.csv"), "wb") as f:
            f.write(bom + text.encode())
    return str(root)


def plant_celeba(root, rows: list[str] | None = None, bom: bytes = b"") -> str:
    """``root/celeba/identity_CelebA.txt`` (CRLF, as the official file): 12 people of 3."""
    rows = rows or [f"{i + 1:06d}.jpg {i // IMAGES + 1}" for i in range(IDENTITIES * IMAGES)]
    os.makedirs(os.path.join(root, "celeba"), exist_ok=True)
    with open(os.path.join(root, "celeba", "identity_CelebA.txt"), "wb") as f:
        f.write(bom + "".join(row + "\r\n" for row in rows).encode())
    return str(root)


def plant_celebahq(root, rows: list[str] | None = None, bom: bytes = b"") -> str:
    """``root/CelebAMask-HQ/``: the identity file (12 people of 3) and the attribute file whose
    first line is the image count; both start with ``bom``."""
    n = IDENTITIES * IMAGES
    rows = rows or [f"{k}.jpg {k // IMAGES}" for k in range(n)]
    folder = os.path.join(root, "CelebAMask-HQ")
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "CelebA-HQ-identity.txt"), "wb") as f:
        f.write(bom + "".join(row + "\n" for row in rows).encode())
    attributes = f"{n}\nBald Young\n" + "".join(f"{k}.jpg {(-1) ** k} 1\n" for k in range(n))
    with open(os.path.join(folder, "CelebAMask-HQ-attribute-anno.txt"), "wb") as f:
        f.write(bom + attributes.encode())
    return str(root)


def splits_cli(capsys, dataset: str, data_dir: str, out: str, unchanged=()):
    """``python -m oneshui_jax.splits`` on a planted folder, N=2."""
    return call(capsys, splits.main, ["--dataset", dataset, "--data_dir", data_dir,
                                      "--num_identities", "2", "--out", out],
                unchanged=unchanged)


ESCAPING = {  # dataset, how to plant it, the annotation file, its line, the escaping path
    "mufac_dotdot": ("mufac", lambda r: plant_mufac(r, {"train": [
        "F01,P,a,F01_0.jpg", "F01,P,b,../val_images/F09_0.jpg"]}),
        "mufac/custom_train_dataset.csv", 3, "../val_images/F09_0.jpg", "mufac/train_images/"),
    "mufac_absolute": ("mufac", lambda r: plant_mufac(r, {"test": ["F30,P,a,/etc/passwd"]}),
                       "mufac/custom_test_dataset.csv", 2, "/etc/passwd", "mufac/test_images/"),
    "mufac_deep_dotdot": ("mufac", lambda r: plant_mufac(r, {"val": [
        "F30,P,a,sub/../../../x.jpg"]}), "mufac/custom_val_dataset.csv", 2,
        "sub/../../../x.jpg", "mufac/val_images/"),
    "celeba_dotdot": ("celeba", lambda r: plant_celeba(r, ["000001.jpg 1", "000002.jpg 1",
                                                           "../../000003.jpg 2"]),
                      "celeba/identity_CelebA.txt", 3, "../../000003.jpg",
                      "celeba/img_align_celeba/"),
    "celeba_absolute": ("celeba", lambda r: plant_celeba(r, ["/root/000001.jpg 1"]),
                        "celeba/identity_CelebA.txt", 1, "/root/000001.jpg",
                        "celeba/img_align_celeba/"),
    "celebahq_dotdot": ("celebahq", lambda r: plant_celebahq(r, ["0.jpg 0", "../1.jpg 0"]),
                        "CelebAMask-HQ/CelebA-HQ-identity.txt", 2, "../1.jpg",
                        "CelebAMask-HQ/CelebA-HQ-img/"),
}


@pytest.mark.parametrize("case", sorted(ESCAPING))
def test_image_paths_that_leave_the_image_folder_are_refused_naming_the_line(capsys, tmp_path,
                                                                            case):
    """An annotation row naming an image outside its image folder (``..`` climbing out, an
    absolute path) is refused naming the file, the line and the path; nothing is written.
    (Symbolic links inside the folder are followed: tests/real_fixtures.py links images.)"""
    dataset, plant, rel, line, name, folder = ESCAPING[case]
    data = plant(tmp_path / "data")
    out = str(tmp_path / "split.json")
    outcome = splits_cli(capsys, dataset, data, out, unchanged=(tmp_path,))
    error_line(outcome, f"{os.path.join(data, rel)}, line {line}: image path {name!r} leaves "
               f"the image folder {folder}")


def test_paths_inside_the_image_folder_are_read(capsys, tmp_path):
    """What stays inside the folder is not refused: a sub-folder, a ``..`` that stays in."""
    data = plant_mufac(tmp_path / "data", {"test": ["F30,P,a,sub/x.jpg", "F30,P,b,sub/../y.jpg",
                                                    "F31,P,a,z.jpg", "F31,P,b,w.jpg"]})
    outcome = splits_cli(capsys, "mufac", data, str(tmp_path / "split.json"))
    assert outcome.status == 0, outcome.err


DUPLICATES = {  # dataset, how to plant it, the annotation file, both lines, the image
    "mufac": ("mufac", lambda r: plant_mufac(r, {"val": [
        "F30,P,a,F30_0.jpg", "F31,P,a,F31_0.jpg", "F30,P,b,F30_0.jpg"]}),
        "mufac/custom_val_dataset.csv", (2, 4), "image_path 'F30_0.jpg'"),
    "mufac_same_file_written_twice_ways": ("mufac", lambda r: plant_mufac(r, {"val": [
        "F30,P,a,F30_0.jpg", "F31,P,a,./F30_0.jpg"]}), "mufac/custom_val_dataset.csv", (2, 3),
        "image_path 'F30_0.jpg'"),
    "celeba": ("celeba", lambda r: plant_celeba(r, ["000001.jpg 1", "000002.jpg 1",
                                                    "000003.jpg 2", "000002.jpg 3"]),
               "celeba/identity_CelebA.txt", (2, 4), "image '000002.jpg'"),
    "celebahq": ("celebahq", lambda r: plant_celebahq(r, ["0.jpg 0", "1.jpg 0", "01.jpg 1"]),
                 "CelebAMask-HQ/CelebA-HQ-identity.txt", (2, 3), "image '1.jpg'"),
}


@pytest.mark.parametrize("case", sorted(DUPLICATES))
def test_an_image_listed_twice_is_refused_naming_both_lines(capsys, tmp_path, case):
    """The same image twice in one annotation file (the reference would count it twice, or,
    for CelebA-HQ, silently keep the last identity) is refused naming both lines."""
    dataset, plant, rel, (first, second), what = DUPLICATES[case]
    data = plant(tmp_path / "data")
    outcome = splits_cli(capsys, dataset, data, str(tmp_path / "split.json"),
                         unchanged=(tmp_path,))
    error_line(outcome, f"{os.path.join(data, rel)}, lines {first} and {second}: {what} is "
               "listed twice")


def test_celebahq_attribute_rows_listed_twice_are_refused(tmp_path):
    """The CelebA-HQ attribute file: a row repeated in place of another names both lines (it
    used to say only that an image had no row)."""
    from oneshui_jax.errors import DataError

    data = plant_celebahq(tmp_path / "data")
    path = tmp_path / "data" / "CelebAMask-HQ" / "CelebAMask-HQ-attribute-anno.txt"
    lines = path.read_text().splitlines()
    lines[5] = lines[3]  # line 6 repeats 1.jpg: 3.jpg has no row
    path.write_text("\n".join(lines) + "\n")
    ann = annotations.read_identities("celebahq", data)
    with pytest.raises(DataError, match=rf"{path}, lines 4 and 6: image '1\.jpg' is listed "
                                        "twice"):
        annotations.read_labels("celebahq", data, ann)


@pytest.mark.parametrize("dataset", ["mufac", "celeba", "celebahq"])
def test_a_byte_order_mark_is_read_as_the_file_without_it(capsys, tmp_path, dataset):
    """Spreadsheet programs and some editors start UTF-8 text with a byte-order mark: the file
    is read as the same file without it (the same split, image for image), not reported as a
    wrong header, a wrong file name or a count that is not an integer."""
    plant = {"mufac": plant_mufac, "celeba": plant_celeba, "celebahq": plant_celebahq}[dataset]
    outputs = {}
    for name, bom in (("plain", b""), ("bom", BOM)):
        data = plant(tmp_path / name, bom=bom)
        outputs[name] = str(tmp_path / f"{name}.json")
        outcome = splits_cli(capsys, dataset, data, outputs[name])
        assert outcome.status == 0, outcome.err
    with open(outputs["plain"]) as plain, open(outputs["bom"]) as bom:
        assert json.load(bom) == json.load(plain)
    # what the study reads from them too, image for image (the split above names only the
    # support images; a mark glued to the first file name would show in the files)
    read = {name: annotations.read_identities(dataset, str(tmp_path / name))
            for name in ("plain", "bom")}
    assert read["bom"].files == read["plain"].files
    np.testing.assert_array_equal(read["bom"].identities, read["plain"].identities)
    if dataset != "celeba":  # CelebA's attribute files are not planted here
        labels = {name: annotations.read_labels(dataset, str(tmp_path / name), ann).values
                  for name, ann in read.items()}
        np.testing.assert_array_equal(labels["bom"], labels["plain"])


def test_a_utf16_annotation_file_is_named_as_such(capsys, tmp_path):
    data = tmp_path / "data"
    (data / "celeba").mkdir(parents=True)
    path = data / "celeba" / "identity_CelebA.txt"
    path.write_bytes("000001.jpg 1\r\n".encode("utf-16"))
    outcome = splits_cli(capsys, "celeba", str(data), str(tmp_path / "split.json"),
                         unchanged=(tmp_path,))
    error_line(outcome, f"{path} is not UTF-8 text", "UTF-16 byte-order mark",
               "save it as UTF-8")


# --------------------------------------------------------------------------------------------
# Checkpoints: inspect and inspect --verify

CONFIG = {"dataset": "synthfaces", "model": {"name": "tiny"}, "num_identities": 2, "seed": 0}


def saved_run(path, *, artifacts: bool = False) -> str:
    """A finished run of two arrays (each above orbax's 1 KiB inline limit, so its data lives
    in a data file of params/), with artifacts if asked."""
    rng = np.random.default_rng(0)
    params = {"dense": {"kernel": rng.normal(size=(32, 24)).astype(np.float32),
                        "bias": np.arange(600, dtype=np.int32)}}
    metadata = {"config": CONFIG, "splits": doubles.TINY_SPLITS, "stage": "pretrain"}
    if artifacts:
        metadata["artifacts_hash"] = checkpoints.save_tree(
            str(path), checkpoints.ARTIFACTS_DIR,
            {"alpha": rng.normal(size=(400,)).astype(np.float32)})
    checkpoints.save_params(str(path), params, metadata)
    return str(path)


def _largest_file(folder: str) -> str:
    found = [os.path.join(d, n) for d, _, names in os.walk(folder) for n in names]
    return max(found, key=os.path.getsize)


def _edit_metadata(run: str, change) -> None:
    path = os.path.join(run, checkpoints.METADATA_FILE)
    with open(path) as f:
        metadata = json.load(f)
    change(metadata)
    with open(path, "w") as f:
        json.dump(metadata, f)


def test_verify_checks_the_metadata_itself(capsys, tmp_path):
    """``inspect --verify`` passes a run as written and says its metadata.json matched; a
    hand-edited metadata.json (params untouched, so the params hash still matches) is refused
    naming the file."""
    run = saved_run(tmp_path / "run")
    outcome = call(capsys, inspect_cli.main, ["--verify", run])
    assert outcome.status == 0, outcome.err
    assert "metadata.json matches the hash of its content it records" in outcome.out
    _edit_metadata(run, lambda m: m["config"].update(seed=1))
    assert call(capsys, inspect_cli.main, [run]).status == 0  # without --verify: read as is
    outcome = call(capsys, inspect_cli.main, ["--verify", run], unchanged=(tmp_path,))
    error_line(outcome, f"{run}/metadata.json is corrupt: its content hash",
               "differs from the metadata_hash", "changed after it was written")


def test_verify_of_a_run_older_than_metadata_hashes_says_what_it_could_not_check(capsys,
                                                                                  tmp_path):
    """A run written before metadata.json recorded its own hash (and its data files) stays
    readable: verified for its parameters, and the output says the metadata was not
    checkable."""
    run = saved_run(tmp_path / "run")
    _edit_metadata(run, lambda m: [m.pop(k) for k in ("metadata_hash", "data_files")])
    outcome = call(capsys, inspect_cli.main, ["--verify", run], unchanged=(tmp_path,))
    assert outcome.status == 0, outcome.err
    assert outcome.out.startswith(f"verified {run}: 2 tensors, 1,368 parameters match")
    assert ("metadata.json not checkable: it records no metadata_hash (written by an older "
            "version); only the parameters were verified") in outcome.out
    assert call(capsys, inspect_cli.main, ["--verify", "--json", run]).out.count(
        '"metadata_verified": false') == 1


def test_verify_checks_the_artifacts_it_records(capsys, tmp_path):
    """A method run's artifacts are recorded by their hash: --verify reads them and refuses
    altered ones (same size, one byte changed)."""
    run = saved_run(tmp_path / "run", artifacts=True)
    outcome = call(capsys, inspect_cli.main, ["--verify", run])
    assert outcome.status == 0 and "artifacts match sha256" in outcome.out, outcome
    target = _largest_file(os.path.join(run, checkpoints.ARTIFACTS_DIR))
    data = bytearray(open(target, "rb").read())
    data[len(data) // 2] ^= 0xFF
    open(target, "wb").write(bytes(data))
    outcome = call(capsys, inspect_cli.main, ["--verify", run], unchanged=(tmp_path,))
    error_line(outcome, f"{run}/artifacts", "corrupt")


@pytest.mark.parametrize("folder", [checkpoints.PARAMS_DIR, checkpoints.ARTIFACTS_DIR])
@pytest.mark.parametrize("verify", [False, True])
def test_a_missing_orbax_data_file_is_named(capsys, tmp_path, folder, verify):
    """Deleting the data file of params/ (or artifacts/) made orbax say only that an array could
    not be read (``Exception: Encountered error while reading array index``), and the plain
    inspect did not notice at all; now both name the missing file."""
    run = saved_run(tmp_path / "run", artifacts=True)
    target = _largest_file(os.path.join(run, folder))
    assert os.sep + "d" + os.sep in target  # an OCDBT data file, not orbax's metadata
    os.remove(target)
    argv = ["--verify", run] if verify else [run]
    outcome = call(capsys, inspect_cli.main, argv, unchanged=(tmp_path,))
    error_line(outcome, f"{run}/{folder} is corrupt: its orbax data file {target} is missing",
               "metadata.json records the")


def test_a_truncated_orbax_data_file_is_named(capsys, tmp_path):
    run = saved_run(tmp_path / "run")
    target = _largest_file(os.path.join(run, checkpoints.PARAMS_DIR))
    size = os.path.getsize(target)
    with open(target, "r+b") as f:
        f.truncate(size // 2)
    outcome = call(capsys, inspect_cli.main, [run], unchanged=(tmp_path,))
    error_line(outcome, f"its orbax data file {target} has {size // 2} bytes but {size} were "
               "saved", "truncated or replaced")


def test_metadata_with_a_byte_order_mark_is_read(capsys, tmp_path):
    """A metadata.json an editor saved with a byte-order mark is read (and still verifies:
    the hash is of its content)."""
    run = saved_run(tmp_path / "run")
    path = os.path.join(run, checkpoints.METADATA_FILE)
    data = open(path, "rb").read()
    open(path, "wb").write(BOM + data)
    outcome = call(capsys, inspect_cli.main, ["--verify", run])
    assert outcome.status == 0, outcome.err
    assert "metadata.json matches" in outcome.out


# --------------------------------------------------------------------------------------------
# Chained deletion requests: the parent's receipt


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    """doubles.request_chain (a vit_tiny_test model, a support_ascent method run, a portrait)
    and one request served on it through the command line (``first``)."""
    root = str(tmp_path_factory.mktemp("chain"))
    pretrain, method, portrait = doubles.request_chain(root)
    first = os.path.join(root, "first")
    with open(os.devnull, "w") as sink, contextlib.redirect_stdout(sink):
        assert request_cli.main(["--checkpoint", method, "--portrait", portrait, "--out", first,
                           "--request_id", "req-1"]) == 0
    work = os.path.join(root, "work")
    os.makedirs(work)
    return types.SimpleNamespace(root=root, pretrain=pretrain, method=method,
                                 portrait=portrait, first=first, work=work)


def _chained_copy(chain, name: str, change=None) -> str:
    """A copy of the first request's output with its receipt changed by ``change`` (None:
    the receipt removed)."""
    out = os.path.join(chain.work, name)
    shutil.copytree(chain.first, out)
    path = os.path.join(out, request_lib.RECEIPT_FILE)
    if change is None:
        os.remove(path)
    else:
        with open(path) as f:
            receipt = json.load(f)
        change(receipt)
        with open(path, "w") as f:
            json.dump(receipt, f)
    return out


RECEIPT_CASES = {  # how the receipt is changed, what the error says after its path
    "missing": (None, "is missing: {run} is a request's output"),
    "unknown_version": (lambda r: r.update(receipt_version=request_lib.RECEIPT_VERSION + 1),
                        f"has receipt_version {request_lib.RECEIPT_VERSION + 1}; this version "
                        f"reads receipts 1..{request_lib.RECEIPT_VERSION}"),
    "not_a_version": (lambda r: r.update(receipt_version="3"), "has receipt_version '3'"),
    "other_params": (lambda r: r.update(params_hash_after="0" * 64),
                     "records params_hash_after 0000000000000000... but the parameters of {run} "
                     "have sha256"),
    "other_request": (lambda r: r.update(request_id="req-9"),
                      "is the receipt of request 'req-9', but {run} is the output of request "
                      "'req-1'"),
}


@pytest.mark.parametrize("case", sorted(RECEIPT_CASES))
def test_chaining_checks_the_parents_receipt(chain, capsys, case):
    """A request on an earlier request's output (a chain) reads that output's receipt: missing,
    of an unknown version, or not the one of its parameters or request, it is refused naming
    the receipt, before anything is unlearned or written."""
    change, words = RECEIPT_CASES[case]
    parent = _chained_copy(chain, f"parent_{case}", change)
    receipt = os.path.join(parent, request_lib.RECEIPT_FILE)
    out = os.path.join(chain.work, f"out_{case}")
    outcome = call(capsys, request_cli.main, ["--checkpoint", parent, "--portrait", chain.portrait,
                                        "--out", out], unchanged=(chain.root,))
    error_line(outcome, f"{receipt} " + words.format(run=parent))


def test_a_chain_with_an_intact_receipt_is_served(chain, capsys):
    """The check lets a complete output through: the second request's receipt continues the
    first's (its params_hash_before is the first's params_hash_after)."""
    out = os.path.join(chain.work, "second")
    outcome = call(capsys, request_cli.main, ["--checkpoint", chain.first, "--portrait",
                                        chain.portrait, "--out", out, "--request_id", "req-2"])
    assert outcome.status == 0, outcome.err
    first = request_lib.check_receipt(chain.first, checkpoints.read_metadata(chain.first))
    second = request_lib.check_receipt(out, checkpoints.read_metadata(out))
    assert second["params_hash_before"] == first["params_hash_after"]
    # the output's metadata.json, rewritten to record where it lives, still verifies
    outcome = call(capsys, inspect_cli.main, ["--verify", out])
    assert outcome.status == 0, outcome.err
    assert "metadata.json matches the hash of its content it records" in outcome.out


# --------------------------------------------------------------------------------------------
# --out inside (or around) the input run


def test_serve_refuses_an_out_inside_a_run_it_reads(chain, capsys):
    """--out inside the run given as --checkpoint (before any work), inside the model run the
    method run starts from (found once the method run is read): refused naming both paths."""
    inside_method = os.path.join(chain.method, "requests", "r1")
    outcome = call(capsys, request_cli.main, ["--checkpoint", chain.method, "--portrait",
                                        chain.portrait, "--out", inside_method],
                   unchanged=(chain.root,))
    error_line(outcome, f"--out {inside_method} is inside the run of --checkpoint "
               f"{chain.method}", "choose a folder outside it")
    inside_model = os.path.join(chain.pretrain, "r1")
    outcome = call(capsys, request_cli.main, ["--checkpoint", chain.method, "--portrait",
                                        chain.portrait, "--out", inside_model],
                   unchanged=(chain.root,))
    error_line(outcome, f"--out {inside_model} is inside the model run {chain.pretrain}")


def test_serve_refuses_to_replace_an_out_that_holds_its_input(chain, capsys):
    """--overwrite replaces an earlier request's output: one holding the run being read
    (here a copy of the method run) would be deleted with it. Refused up front."""
    outer = os.path.join(chain.work, "outer")
    shutil.copytree(chain.first, outer)  # an earlier request's output (it has a receipt)
    inner = os.path.join(outer, "method_copy")
    shutil.copytree(chain.method, inner)
    outcome = call(capsys, request_cli.main, ["--checkpoint", inner, "--portrait", chain.portrait,
                                        "--out", outer, "--overwrite"],
                   unchanged=(chain.root,))
    error_line(outcome, f"--out {outer} contains the run of --checkpoint {inner}",
               "could destroy the input")


def test_convert_refuses_an_out_inside_the_input_run(chain, capsys):
    out = os.path.join(chain.pretrain, "converted")
    outcome = call(capsys, convert.main, [chain.pretrain, out], unchanged=(chain.root,))
    error_line(outcome, f"OUT {out} is inside the input run IN {chain.pretrain}")


@pytest.fixture
def select_config(tmp_path, monkeypatch):
    """configs/synthfaces.py:N=5,size=small fed to ``select.main`` as if absl had parsed it,
    its data a MUFAC folder that does not exist (so nothing can start reading by accident);
    ``--out`` is set with ``set_out``. The absl handler's filters are restored afterwards."""
    spec = importlib.util.spec_from_file_location(
        "synthfaces_config_for_data_integrity", os.path.join(REPO, "configs", "synthfaces.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config("N=5,size=small")
    config.dataset = "mufac"
    config.data.data_dir = str(tmp_path / "no_data")
    config.data.tfds_dir = str(tmp_path / "tfds")
    config.workdir = str(tmp_path / "work")
    config.checkpoint_dir = str(tmp_path / "ckpt")
    config.progress = False
    monkeypatch.setattr(select_cli, "CONFIG", types.SimpleNamespace(value=config))
    monkeypatch.setattr(select_cli, "_OUT", types.SimpleNamespace(value=None))
    handler = main_cli.logging.get_absl_handler()
    monkeypatch.setattr(handler, "filters", list(handler.filters))

    def set_out(out):
        monkeypatch.setattr(select_cli, "_OUT", types.SimpleNamespace(value=out))

    return types.SimpleNamespace(config=config, set_out=set_out, root=tmp_path)


def test_select_refuses_an_out_inside_the_pretrained_run(select_config, capsys):
    pretrain = select_cli.select_lib.pretrain_dir(select_config.config)
    os.makedirs(pretrain)
    out = os.path.join(pretrain, "selection")
    select_config.set_out(out)
    outcome = call(capsys, select_cli.main, ["oneshui_jax.select"],
                   unchanged=(select_config.root,))
    error_line(outcome, f"--out {out} is inside the pretrained run it reads {pretrain}")


SELECT_CASES = {  # config.selection.meta_unlearn (and validation_requests), the error's words
    "empty": ((), 4, ["config.selection.meta_unlearn lists no candidates", "nothing to select"]),
    "a_string": (ml_collections.ConfigDict({"meta_unlearn": "meta_lr=1e-3"}), 4, [
        "config.selection.meta_unlearn is the string 'meta_lr=1e-3'",
        "expected a list of override strings"]),
    "not_scorable": (("", "meta_lr=1e-3"), 0, [
        "config.selection.meta_unlearn: candidate '(as is)' has validation_requests=0",
        "set config.meta_unlearn.validation_requests >= 1"]),
}


@pytest.mark.parametrize("case", sorted(SELECT_CASES))
def test_select_with_nothing_to_select_is_refused_before_any_work(select_config, capsys, case):
    """No candidate (an empty list, or a string where a list is expected) or a candidate that
    cannot be scored: refused before any data is read or any model is trained (the data
    folder of the config does not even exist)."""
    candidates, validation_requests, words = SELECT_CASES[case]
    if isinstance(candidates, ml_collections.ConfigDict):  # a whole block: a string inside
        select_config.config.selection = candidates
    else:
        select_config.config.selection.meta_unlearn = candidates
    select_config.config.meta_unlearn.validation_requests = validation_requests
    select_config.config.meta_unlearn.step_control = "none"  # the reference's step: no held-out
    # requests needed to meta-train, only to score (the other controls refuse 0 themselves)
    outcome = call(capsys, select_cli.main, ["oneshui_jax.select"],
                   unchanged=(select_config.root,))
    error_line(outcome, *words)
