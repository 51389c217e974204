"""Every error line of the command lines, by exit status and message.

The command lines: ``python -m oneshui_jax.main`` (the study), ``python -m oneshui_jax.unlearn``
(serving, ``oneshui_jax.cli.request``), ``oneshui_jax.inspect``, ``oneshui_jax.models.convert``,
``oneshui_jax.splits`` and ``oneshui_jax.report``. Each user error must end the program with the
CLI's exit status and one ``error: ...`` line on stderr naming the file or setting and what was
expected, without a traceback, and must write nothing. ``main(argv)`` is called in process;
subprocesses only where absl's flag parsing of ``python -m oneshui_jax.main`` is what is tested.

Runs are cheap fakes: a pretrained ``vit_tiny_test`` model and a ``support_ascent`` method run
written with ``oneshui_jax.checkpoints``, and hand-written ``metadata.json`` files derived from
them. Errors already tested by exit status and message elsewhere are not repeated here:

* test_serve: ``test_errors_are_one_line_exit_2_and_write_nothing`` (unreadable and missing
  portraits, no portrait, identities, labels of a multi-label model, --method, --out being a
  source, unknown flag, no method run) and ``test_full_method_is_refused``;
* test_checkpoints: ``test_inspect_bad_path_is_one_line`` and
  ``test_inspect_json_and_structure_mismatch`` (--diff of two trees);
* test_pretrained: ``test_convert_cli_writes_a_run_directory`` (OUT exists);
* test_study: ``test_cli_rejects_config_typo_without_traceback``; test_stale_work: a refused
  checkpoint through ``python -m oneshui_jax.main``.

Every command line exits with status 2 on bad input (a malformed command line too), so one status
means "the input was refused, nothing was written" across the package.
"""

import contextlib
import dataclasses
import glob
import importlib.util
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
import types

import doubles
import numpy as np
import pytest

from oneshui_jax import checkpoints, interrupts
from oneshui_jax import main as main_cli
from oneshui_jax.cli import convert, report, splits
from oneshui_jax.cli import inspect as inspect_cli
from oneshui_jax.cli import request as request_cli
from oneshui_jax.data import annotations, datasets
from oneshui_jax.errors import DataError
from oneshui_jax.report import plots

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SAFETENSORS = os.path.join(REPO, "tests", "fixtures", "timm_tiny_vit.safetensors")
TINY_ARCH = ["--width", "48", "--depth", "2", "--num_heads", "3", "--patch_size", "8"]

# Exit statuses: every command line prints one line and exits with 2 on bad input, a malformed
# command line included.
MAIN_STATUS = SPLITS_STATUS = SERVE_STATUS = INSPECT_STATUS = CONVERT_STATUS = REPORT_STATUS = 2
USAGE_STATUS = 2  # a malformed command line (absl's flag errors, missing or extra arguments)

SPLITS = doubles.TINY_SPLITS


# --------------------------------------------------------------------------------------------
# Helpers


@dataclasses.dataclass
class Outcome:
    status: int
    out: str
    err: str


def _listing(root: str) -> dict[str, tuple]:
    """Every file (size, mtime) and folder under ``root``."""
    found = {}
    for folder, dirs, names in os.walk(root):
        for name in dirs:
            found[os.path.relpath(os.path.join(folder, name), root)] = ("dir",)
        for name in names:
            stat = os.lstat(os.path.join(folder, name))
            found[os.path.relpath(os.path.join(folder, name), root)] = (stat.st_size,
                                                                        stat.st_mtime_ns)
    return found


@contextlib.contextmanager
def writes_nothing(*roots: str):
    """Asserts that nothing under ``roots`` was created, changed or removed."""
    before = {root: _listing(root) for root in roots}
    yield
    for root in roots:
        after = _listing(root)
        changed = sorted(k for k in set(before[root]) | set(after)
                         if before[root].get(k) != after.get(k))
        assert not changed, f"written under {root}: {changed}"


def read_only(monkeypatch, *folders) -> None:
    """``folders`` look read-only to ``os.access`` (tests run as root, which writes anywhere:
    permission bits cannot make a folder read-only here)."""
    real_access = os.access
    protected = {os.path.abspath(str(f)) for f in folders}

    def access(path, mode, *args, **kwargs):
        if mode & os.W_OK and os.path.abspath(os.fspath(path)) in protected:
            return False
        return real_access(path, mode, *args, **kwargs)

    monkeypatch.setattr(os, "access", access)


def call(capsys, main, argv, *, unchanged=()) -> Outcome:
    """``main(argv)`` in process: its exit status (as the interpreter would end), out, err."""
    capsys.readouterr()
    with writes_nothing(*unchanged):
        try:
            status = main(list(argv))
        except SystemExit as e:
            status = e.code
    captured = capsys.readouterr()
    err = captured.err
    if isinstance(status, str):  # sys.exit("error: ..."): Python prints it, status 1
        err, status = err + status + "\n", 1
    return Outcome(0 if status is None else status, captured.out, err)


def assert_error(outcome: Outcome, status: int, *words: str, case: str = "") -> str:
    """Exit ``status``, one ``error: `` line on stderr naming ``words``, no traceback, no
    stdout; returns the line. ``case`` names the case in failure messages."""
    assert outcome.status == status, (case, outcome)
    assert "Traceback" not in outcome.err, (case, outcome.err)
    lines = outcome.err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), (case, outcome.err)
    missing = [word for word in words if word not in lines[0]]
    assert not missing, f"{case}: {missing} not in {lines[0]!r}"
    assert outcome.out == "", (case, outcome.out)
    return lines[0]


def write_json(path, obj) -> str:
    os.makedirs(os.path.dirname(str(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(obj, f)
    return str(path)


def fake_run(path, metadata: dict, **changes) -> str:
    """A run directory holding only ``metadata.json``: ``metadata`` with ``changes`` (a value
    of None deletes the key)."""
    record = {k: v for k, v in {**metadata, **changes}.items() if v is not None}
    record.pop("run_dir", None)
    write_json(os.path.join(path, checkpoints.METADATA_FILE), record)
    return str(path)


def _largest_file(folder: str) -> str:
    files = [os.path.join(root, name) for root, _, names in os.walk(folder) for name in names]
    return max(files, key=os.path.getsize)


def not_a_run_directory(tmp_path) -> dict[str, tuple[str, list[str]]]:
    """Paths that are not run directories, and what the error must name (read_metadata)."""
    file = tmp_path / "file.txt"
    file.write_text("x")
    (tmp_path / "empty").mkdir()
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "notes.txt").write_text("hello")
    (tmp_path / "bad_json").mkdir()
    (tmp_path / "bad_json" / "metadata.json").write_text("{not json")
    write_json(tmp_path / "bad_status" / "metadata.json", {"status": "finished"})
    expected = "expected a run directory holding metadata.json and params/"
    return {
        "missing": (str(tmp_path / "nowhere"), [f"no checkpoint at {tmp_path / 'nowhere'}",
                                                expected]),
        "file": (str(file), [f"{file} is a file, not a checkpoint", expected]),
        "empty": (str(tmp_path / "empty"), [f"{tmp_path / 'empty'} is not a checkpoint",
                                            expected, "it is empty"]),
        "foreign": (str(tmp_path / "foreign"), [f"{tmp_path / 'foreign'} is not a checkpoint",
                                                "it holds notes.txt"]),
        "bad_json": (str(tmp_path / "bad_json"),
                     [str(tmp_path / "bad_json" / "metadata.json"), "is not readable JSON"]),
        "bad_status": (str(tmp_path / "bad_status"),
                       [str(tmp_path / "bad_status" / "metadata.json"),
                        "is not checkpoint metadata", "'status' one of ('training', 'done')"]),
    }


# --------------------------------------------------------------------------------------------
# A model and a method run, as cheap as they come


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    """A pretrained vit_tiny_test run (3 attributes), a support_ascent method run prepared on it
    (artifacts + metadata, no params), and a PNG portrait."""
    root = str(tmp_path_factory.mktemp("chain"))
    pretrain, method, portrait = doubles.request_chain(root, SPLITS)
    work = os.path.join(root, "work")  # fakes and outputs of the tests
    os.makedirs(work)
    return types.SimpleNamespace(
        root=root, work=work, pretrain=pretrain, method=method, portrait=portrait,
        model_meta=checkpoints.read_metadata(pretrain),
        method_meta=checkpoints.read_metadata(method))


def serve_error(capsys, chain, *args, out=None) -> Outcome:
    """``request_cli.main`` on ``args`` (a portrait and --out added unless given); nothing under the
    chain's folder may change."""
    args = list(args)
    if "--portrait" not in args:
        args += ["--portrait", chain.portrait]
    if "--out" not in args:
        args += ["--out", out or os.path.join(chain.work, "out")]
    return call(capsys, request_cli.main, args, unchanged=(chain.root,))


def test_the_fake_runs_serve_a_request(chain, capsys):
    """The fakes below differ from these runs in one thing each, so their errors are that
    thing's."""
    out = os.path.join(chain.root, "served")
    outcome = call(capsys, request_cli.main, ["--checkpoint", chain.method, "--portrait",
                                              chain.portrait, "--out", out])
    assert outcome.status == 0, outcome.err
    assert "support_ascent (access stats, alpha 0.1)" in outcome.out
    assert checkpoints.is_finished(out)


# --------------------------------------------------------------------------------------------
# python -m oneshui_jax.unlearn (request_cli.main): status 2


@pytest.mark.parametrize("case", ["missing", "file", "empty", "foreign", "bad_json",
                                  "bad_status"])
@pytest.mark.parametrize("flag", ["--checkpoint", "--artifacts"])
def test_serve_refuses_what_is_not_a_run_directory(chain, capsys, tmp_path, case, flag):
    path, words = not_a_run_directory(tmp_path)[case]
    checkpoint = path if flag == "--checkpoint" else chain.pretrain
    args = ["--checkpoint", checkpoint] + (["--artifacts", path] if flag == "--artifacts" else [])
    with writes_nothing(str(tmp_path)):
        assert_error(serve_error(capsys, chain, *args), SERVE_STATUS, *words)


def test_serve_usage_errors_are_one_line(chain, capsys):
    outcome = call(capsys, request_cli.main, ["--portrait", chain.portrait, "--out",
                                              os.path.join(chain.work, "out")],
                   unchanged=(chain.root,))
    assert_error(outcome, USAGE_STATUS, "flag --checkpoint is required",
                 "expected a method run directory")
    outcome = serve_error(capsys, chain, "--checkpoint", chain.method, "--identity", "abc")
    assert_error(outcome, USAGE_STATUS, "flag --identity=abc: invalid literal for int()",
                 "expected an integer")
    outcome = serve_error(capsys, chain, "--checkpoint", chain.method, "extra")
    assert_error(outcome, USAGE_STATUS, "unexpected arguments ['extra']")


def test_serve_refuses_to_replace_an_existing_out(chain, capsys):
    existing = os.path.join(chain.work, "existing")
    os.makedirs(existing, exist_ok=True)
    with open(os.path.join(existing, "keep.txt"), "w") as f:
        f.write("mine")
    outcome = serve_error(capsys, chain, "--checkpoint", chain.method, out=existing)
    assert_error(outcome, SERVE_STATUS, f"--out {existing} already exists",
                 "choose a new directory or pass --overwrite")
    outcome = serve_error(capsys, chain, "--checkpoint", chain.method, "--overwrite",
                          out=existing)
    assert_error(outcome, SERVE_STATUS, f"--out {existing} exists and is not the output of an "
                 "earlier request (no receipt.json)", "even with --overwrite")
    a_file = os.path.join(chain.work, "a_file")
    with open(a_file, "w") as f:
        f.write("mine")
    outcome = serve_error(capsys, chain, "--checkpoint", chain.method, "--overwrite", out=a_file)
    assert_error(outcome, SERVE_STATUS, f"--out {a_file} exists and is not the output")


def test_serve_refuses_portraits_it_cannot_read(chain, capsys):
    text = os.path.join(chain.work, "notes.jpg")
    with open(text, "w") as f:
        f.write("not an image")
    outcome = serve_error(capsys, chain, "--checkpoint", chain.method, "--portrait", text)
    assert_error(outcome, SERVE_STATUS, f"cannot read portrait {text}",
                 "not an image in a format PIL reads")
    outcome = serve_error(capsys, chain, "--checkpoint", chain.method, "--portrait", chain.work)
    assert_error(outcome, SERVE_STATUS, f"cannot read portrait {chain.work}", "Is a directory")


def test_serve_refuses_broken_method_runs(chain, capsys):
    """Each fake is the method run with one thing wrong; the error names it."""
    work, meta = chain.work, chain.method_meta
    no_method = fake_run(os.path.join(work, "no_method"), meta, method=None)
    os.makedirs(os.path.join(no_method, checkpoints.ARTIFACTS_DIR))  # a method run by its folder
    cases = {  # fake method run (--checkpoint), what the error must name
        "no_base_run_dir": (fake_run(os.path.join(work, "no_base"), meta, base_run_dir=None),
                            ["is a method run but its metadata records no base_run_dir",
                             "--artifacts"]),
        "base_run_dir_gone": (fake_run(os.path.join(work, "gone"), meta,
                                       base_run_dir=os.path.join(work, "moved")),
                              [f"was prepared on {os.path.join(work, 'moved')}",
                               "which does not exist"]),
        "no_method": (no_method, [f"{no_method}/metadata.json records no method",
                                  "not a finished method run", "--config.stages"]),
        "unknown_method": (fake_run(os.path.join(work, "bogus"), meta, method="bogus"),
                           ["records the method 'bogus'", "does not know",
                            "servable: ", "support_ascent"]),
        "no_model_config": (fake_run(os.path.join(work, "no_cfg"), meta, model_config=None),
                            ["lacks ['model_config']", "not a finished support_ascent run"]),
        "no_train_split": (fake_run(os.path.join(work, "no_train"), meta,
                                    splits={**SPLITS, "train": []}),
                           ["lacks ['splits.train']"]),
        "unfinished": (fake_run(os.path.join(work, "unfinished"), meta, status="training"),
                       ["is not finished (status 'training')", "finish it with the study"]),
        "rejected_method_config": (
            fake_run(os.path.join(work, "rejected"), meta,
                     method_config={**meta["method_config"], "alphas": [-1.0]}),
            ["records a method_config this version rejects",
             "config.support_ascent.alphas must be finite numbers >= 0"]),
        "artifacts_gone": (fake_run(os.path.join(work, "no_artifacts"), meta),
                           [f"{os.path.join(work, 'no_artifacts')}/artifacts is missing",
                            "records its hash"]),
    }
    for name, (path, words) in cases.items():
        outcome = serve_error(capsys, chain, "--checkpoint", path)
        line = assert_error(outcome, SERVE_STATUS, *words, case=name)
        assert path in line, (name, line)


def test_serve_refuses_altered_artifacts(chain, capsys):
    altered = fake_run(os.path.join(chain.work, "altered"), chain.method_meta,
                       artifacts_hash="0" * 64)
    shutil.copytree(os.path.join(chain.method, checkpoints.ARTIFACTS_DIR),
                    os.path.join(altered, checkpoints.ARTIFACTS_DIR))
    outcome = serve_error(capsys, chain, "--checkpoint", altered)
    assert_error(outcome, SERVE_STATUS, f"{altered}/artifacts is corrupt",
                 "content hash differs from the one recorded in metadata.json")


def test_serve_refuses_a_model_the_method_run_does_not_fit(chain, capsys):
    """--checkpoint MODEL --artifacts METHOD_RUN: the model is checked against the method run."""
    work, model = chain.work, chain.model_meta
    wider = {**model["model_config"], "width": 64, "num_heads": 4}
    cases = {
        "architecture": (fake_run(os.path.join(work, "wider"), model, model_config=wider),
                         ["does not match the method run", "model_config differs in",
                          "num_heads", "width"]),
        "identities": (fake_run(os.path.join(work, "other_ids"), model,
                                splits={**SPLITS, "train": [1, 2, 3]}),
                       ["was trained on other identities than the method run",
                        "splits['train'] differ"]),
        "lineage": (fake_run(os.path.join(work, "other_params"), model, params_hash="f" * 64),
                    [f"the method run {chain.method} was prepared on the model",
                     "descends from sha256 ffffffffffffffff",
                     "use a method run prepared on this model"]),
        "unfinished": (fake_run(os.path.join(work, "model_training"), model, status="training"),
                       ["is not finished (status 'training')", "never committed"]),
        "params_gone": (fake_run(os.path.join(work, "model_no_params"), model),
                        ["model_no_params/params is missing", "says the run is done"]),
    }
    for name, (path, words) in cases.items():
        outcome = serve_error(capsys, chain, "--checkpoint", path, "--artifacts", chain.method)
        line = assert_error(outcome, SERVE_STATUS, *words, case=name)
        assert path in line, (name, line)


def test_serve_refuses_corrupt_model_params(chain, capsys):
    corrupt = os.path.join(chain.work, "corrupt_model")
    shutil.copytree(chain.pretrain, corrupt)
    target = _largest_file(os.path.join(corrupt, checkpoints.PARAMS_DIR))
    with open(target, "r+b") as f:
        f.truncate(os.path.getsize(target) // 2)
    outcome = serve_error(capsys, chain, "--checkpoint", corrupt, "--artifacts", chain.method)
    assert_error(outcome, SERVE_STATUS, os.path.join(corrupt, checkpoints.PARAMS_DIR),
                 "corrupt")


def test_serve_refuses_a_model_config_it_cannot_build(chain, capsys):
    """Model and method run agree on an architecture this version rejects."""
    bad = {**chain.model_meta["model_config"], "width": 0}
    model = fake_run(os.path.join(chain.work, "zero_width"), chain.model_meta, model_config=bad)
    method = fake_run(os.path.join(chain.work, "zero_width_method"), chain.method_meta,
                      model_config=bad)
    os.makedirs(os.path.join(method, checkpoints.ARTIFACTS_DIR))
    outcome = serve_error(capsys, chain, "--checkpoint", model, "--artifacts", method)
    assert_error(outcome, SERVE_STATUS, f"{method}/metadata.json records a model_config this "
                 "version cannot use", "ViTConfig.width must be a positive int, got 0")


def test_serve_refuses_a_request_output_without_its_method_run(chain, capsys):
    request = fake_run(os.path.join(chain.work, "request_output"), chain.model_meta,
                       stage="request", method="support_ascent")
    outcome = serve_error(capsys, chain, "--checkpoint", request)
    assert_error(outcome, SERVE_STATUS, f"{request} is a request's output",
                 "records no method_run_dir", "pass --artifacts METHOD_RUN_DIR")


def test_serve_refuses_labels_that_do_not_fit(chain, capsys):
    """The label count (any task), and a classification model's class indices."""
    outcome = serve_error(capsys, chain, "--checkpoint", chain.method, "--labels", "1,0,1",
                          "--labels", "0,0,1")
    assert_error(outcome, SERVE_STATUS, "give labels for each of the 1 portraits, got 2")
    classifier = fake_run(os.path.join(chain.work, "classifier"), chain.method_meta,
                          method_config={**chain.method_meta["method_config"],
                                         "task": "classification"})
    shutil.copytree(os.path.join(chain.method, checkpoints.ARTIFACTS_DIR),
                    os.path.join(classifier, checkpoints.ARTIFACTS_DIR))
    outcome = serve_error(capsys, chain, "--checkpoint", classifier, "--labels", "0,1")
    assert_error(outcome, SERVE_STATUS, "--labels '0,1': give one class index in [0, 3)")
    outcome = serve_error(capsys, chain, "--checkpoint", classifier, "--labels", "7")
    assert_error(outcome, SERVE_STATUS, "labels of portrait 0 must be a class index in [0, 3)",
                 "got 7")


def test_serve_out_that_cannot_be_created(chain, capsys, monkeypatch):
    """Refused up front, before the model is loaded; an OSError while writing is one line too."""
    a_file = os.path.join(chain.work, "plain_file")
    with open(a_file, "w") as f:
        f.write("x")
    for out in (os.path.join(a_file, "out"), os.path.join(a_file, "deeper", "out")):
        outcome = serve_error(capsys, chain, "--checkpoint", chain.method, out=out)
        assert_error(outcome, SERVE_STATUS, f"--out {out} cannot be created",
                     f"{a_file} is a file, not a folder")

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(checkpoints, "save_params", full_disk)
    out = os.path.join(chain.work, "never_written")
    outcome = serve_error(capsys, chain, "--checkpoint", chain.method, out=out)
    assert_error(outcome, SERVE_STATUS, f"--out {out} cannot be written",
                 "No space left on device")
    assert outcome.err.strip().splitlines()[-1].startswith(
        f"error: No space left on device: {out}")  # the OS's reason first
    assert not os.path.exists(out)


def test_every_out_in_a_read_only_folder_is_refused_up_front(chain, capsys, tmp_path,
                                                             monkeypatch):
    """serve, splits, convert and report: an --out (OUT) in a read-only folder, or a read-only
    --out folder of report, is one line before any work; nothing is written."""
    locked = tmp_path / "read_only"
    locked.mkdir()
    read_only(monkeypatch, locked, os.path.join(chain.work, "read_only"))
    not_writable = f"the folder {locked} is not writable"
    out = os.path.join(chain.work, "read_only", "out")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    outcome = serve_error(capsys, chain, "--checkpoint", chain.method, out=out)
    assert_error(outcome, SERVE_STATUS, f"--out {out} cannot be created",
                 f"the folder {os.path.dirname(out)} is not writable")
    out = str(locked / "split.json")
    outcome = call(capsys, splits.main, [*SMALL, "--num_identities", "1", "--out", out],
                   unchanged=(str(tmp_path),))
    assert_error(outcome, SPLITS_STATUS, f"--out {out} cannot be written", not_writable)
    out = str(locked / "converted")
    outcome = call(capsys, convert.main, [SAFETENSORS, out], unchanged=(str(tmp_path),))
    assert_error(outcome, CONVERT_STATUS, f"OUT {out} cannot be created", not_writable)
    results = write_json(tmp_path / "in" / "results.json", {"results": [RECORD]})
    for out, problem in ((str(locked / "report"), not_writable), (str(locked), not_writable)):
        outcome = call(capsys, report.main, [results, "--out", out], unchanged=(str(tmp_path),))
        assert_error(outcome, REPORT_STATUS, f"--out {out} cannot be written", problem,
                     "expected a writable folder")


# --------------------------------------------------------------------------------------------
# python -m oneshui_jax.inspect: status 2


@pytest.mark.parametrize("case", ["missing", "file", "empty", "foreign", "bad_json",
                                  "bad_status"])
def test_inspect_refuses_what_is_not_a_run_directory(capsys, tmp_path, case):
    path, words = not_a_run_directory(tmp_path)[case]
    outcome = call(capsys, inspect_cli.main, [path], unchanged=(str(tmp_path),))
    assert_error(outcome, INSPECT_STATUS, *words)


def test_inspect_usage_errors(capsys, tmp_path):
    for argv in ([], [str(tmp_path), "--diff", str(tmp_path), str(tmp_path)],
                 [str(tmp_path), str(tmp_path)]):
        outcome = call(capsys, inspect_cli.main, argv, unchanged=(str(tmp_path),))
        assert_error(outcome, USAGE_STATUS, "give either PATH or --diff PATH_A PATH_B")
    outcome = call(capsys, inspect_cli.main, ["--diff", str(tmp_path)])
    assert_error(outcome, USAGE_STATUS, "--diff takes two run directories, PATH_A PATH_B")
    outcome = call(capsys, inspect_cli.main, ["--verify", "--diff", str(tmp_path), str(tmp_path)])
    assert_error(outcome, USAGE_STATUS, "--verify needs PATH (a run directory)")
    outcome = call(capsys, inspect_cli.main, [str(tmp_path), "--jsn"])
    assert_error(outcome, USAGE_STATUS, "unknown flag --jsn (did you mean --json?)")


def test_inspect_refuses_unfinished_and_damaged_runs(chain, capsys, tmp_path):
    training = fake_run(tmp_path / "training", chain.model_meta, status="training")
    no_params = fake_run(tmp_path / "no_params", chain.model_meta)
    empty_params = fake_run(tmp_path / "empty_params", chain.model_meta)
    os.makedirs(os.path.join(empty_params, checkpoints.PARAMS_DIR))
    empty_artifacts = fake_run(tmp_path / "empty_artifacts", chain.method_meta, status="training")
    os.makedirs(os.path.join(empty_artifacts, checkpoints.ARTIFACTS_DIR))
    altered = str(tmp_path / "altered")
    shutil.copytree(chain.pretrain, altered)
    fake_run(altered, chain.model_meta, params_hash="0" * 64)
    cases = {  # argv, what the error must name
        "diff_unfinished": (["--diff", chain.pretrain, training],
                            [f"{training} is not finished (status 'training')",
                             "its params/ were never committed"]),
        "diff_missing": (["--diff", chain.pretrain, str(tmp_path / "nowhere")],
                         [f"no checkpoint at {tmp_path / 'nowhere'}"]),
        "params_gone": ([no_params], [f"{no_params}/params is missing",
                                      "metadata.json says the run is done"]),
        "params_not_orbax": ([empty_params], [f"{empty_params}/params is corrupt or was not "
                                              "written by oneshui_jax.checkpoints"]),
        "artifacts_not_orbax": ([empty_artifacts], [f"{empty_artifacts}/artifacts is corrupt"]),
        "diff_altered": (["--diff", chain.pretrain, altered],
                         [f"{altered}/params is corrupt: its content hash",
                          "differs from 0000000000000000... recorded in metadata.json"]),
        "no_train_state": ([os.path.join(training, "train_state")],
                           [f"no training state at {training}/train_state",
                            "the directory does not exist"]),
    }
    for name, (argv, words) in cases.items():
        outcome = call(capsys, inspect_cli.main, argv, unchanged=(str(tmp_path), chain.root))
        assert_error(outcome, INSPECT_STATUS, *words, case=name)
    os.makedirs(os.path.join(training, checkpoints.TRAIN_STATE_DIR))
    outcome = call(capsys, inspect_cli.main, [os.path.join(training, "train_state")],
                   unchanged=(str(tmp_path),))
    assert_error(outcome, INSPECT_STATUS, f"{training}/train_state holds no committed step")


@pytest.mark.parametrize("field", ["config", "splits", "versions"])
def test_inspect_metadata_of_the_wrong_shape(capsys, tmp_path, field):
    run = fake_run(tmp_path / "run", {"status": "training", field: ["synthfaces"]})
    outcome = call(capsys, inspect_cli.main, [run])
    assert_error(outcome, INSPECT_STATUS, f"{run}/metadata.json is not checkpoint metadata",
                 f"expected {field!r} to be a JSON object, got a list")


# --------------------------------------------------------------------------------------------
# python -m oneshui_jax.models.convert: status 2, nothing written


@pytest.mark.parametrize("case", ["empty", "foreign", "bad_json", "bad_status"])
def test_convert_refuses_a_folder_that_is_not_a_run_directory(capsys, tmp_path, case):
    path, words = not_a_run_directory(tmp_path)[case]
    outcome = call(capsys, convert.main, [path, str(tmp_path / "out"), *TINY_ARCH],
                   unchanged=(str(tmp_path),))
    assert_error(outcome, CONVERT_STATUS, *words)


def test_convert_refuses_unreadable_weights(capsys, tmp_path):
    (tmp_path / "zeros.safetensors").write_bytes(b"\0" * 16)
    (tmp_path / "zeros.npz").write_bytes(b"\0" * 16)
    (tmp_path / "empty.npz").write_bytes(b"")
    (tmp_path / "weights.json").write_text("{}")
    np.savez(tmp_path / "other.npz", a=np.zeros(3))
    np.savez(tmp_path / "pre_logits.npz", **{"embedding/kernel": np.zeros((8, 8, 3, 48)),
                                             "pre_logits/kernel": np.zeros((48, 48))})
    cases = {  # input, what the error must name
        "missing": (tmp_path / "model.safetensors",
                    ["not found", "Hugging Face timm/vit_base_patch16_224"]),
        "format": (tmp_path / "weights.json",
                   ["unknown weights format; expected a timm .safetensors file"]),
        "safetensors": (tmp_path / "zeros.safetensors", ["is not a readable safetensors file"]),
        "npz": (tmp_path / "zeros.npz", ["is not a readable .npz file",
                                         "expected a zip archive of arrays"]),
        "empty_npz": (tmp_path / "empty.npz", ["is not a readable .npz file"]),
        "not_google": (tmp_path / "other.npz", ["is not a Google ViT checkpoint",
                                                "no embedding/kernel", "(keys: a)"]),
        "pre_logits": (tmp_path / "pre_logits.npz", ["has a pre_logits representation layer",
                                                     "lossy"]),
    }
    for name, (path, words) in cases.items():
        outcome = call(capsys, convert.main, [str(path), str(tmp_path / "out"), *TINY_ARCH],
                       unchanged=(str(tmp_path),))
        line = assert_error(outcome, CONVERT_STATUS, *words, case=name)
        assert str(path) in line, (name, line)
        assert "pickle" not in line, (name, line)  # numpy's hint does not apply


def test_convert_refuses_an_architecture_the_weights_do_not_fit(capsys, tmp_path):
    out = str(tmp_path / "out")
    cases = {  # extra arguments, what the error must name
        "heads_not_inferable": ([], ["cannot infer num_heads: width 48 is not a multiple of 64",
                                     "pass --num_heads"]),
        "preset": (["--model", "vit_huge"], ["unknown ViT preset 'vit_huge'", "vit_tiny_test"]),
        "width": (["--width", "0"], ["ViTConfig.width must be a positive int, got 0"]),
        "image_size": ([*TINY_ARCH, "--image_size", "30"],
                       ["ViTConfig.image_size (30) must be divisible by ViTConfig.patch_size (8)"]),
        "num_classes": ([*TINY_ARCH, "--num_classes", "-1"],
                        ["ViTConfig.num_classes must be a positive int, got -1"]),
        "num_classes_zero": ([*TINY_ARCH, "--num_classes", "0"],
                             ["ViTConfig.num_classes must be a positive int, got 0"]),
        "image_size_zero": ([*TINY_ARCH, "--image_size", "0"], ["ViTConfig.image_size", "0"]),
    }
    for name, (extra, words) in cases.items():
        outcome = call(capsys, convert.main, [SAFETENSORS, out, *extra],
                       unchanged=(str(tmp_path),))
        line = assert_error(outcome, CONVERT_STATUS, *words, case=name)
        assert len(line) < 1500, (name, len(line))  # long name lists are cut short


def test_convert_out_that_cannot_be_created(capsys, tmp_path, monkeypatch):
    """Refused before the weights are read; an OSError while writing names OUT, not the
    temporary sibling written first."""
    (tmp_path / "plain_file").write_text("x")
    out = str(tmp_path / "plain_file" / "out")
    outcome = call(capsys, convert.main, [SAFETENSORS, out, *TINY_ARCH],
                   unchanged=(str(tmp_path),))
    assert_error(outcome, CONVERT_STATUS, f"OUT {out} cannot be created",
                 f"{tmp_path / 'plain_file'} is a file, not a folder")

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device", f"{tmp_path / 'out'}.tmp-1234")

    monkeypatch.setattr(checkpoints, "save_params", full_disk)
    out = str(tmp_path / "out")
    outcome = call(capsys, convert.main, [SAFETENSORS, out, *TINY_ARCH],
                   unchanged=(str(tmp_path),))
    line = assert_error(outcome, CONVERT_STATUS, f"OUT {out} cannot be created",
                        "No space left on device")
    assert ".tmp-" not in line, line


def test_convert_usage_errors(capsys, tmp_path):
    outcome = call(capsys, convert.main, [SAFETENSORS], unchanged=(str(tmp_path),))
    assert_error(outcome, USAGE_STATUS, "the following arguments are required: OUT")
    outcome = call(capsys, convert.main, [SAFETENSORS, str(tmp_path / "out"), "--width", "wide"],
                   unchanged=(str(tmp_path),))
    assert_error(outcome, USAGE_STATUS, "flag --width=wide: invalid literal for int()",
                 "expected an integer")
    outcome = call(capsys, convert.main, [SAFETENSORS, str(tmp_path / "a"), str(tmp_path / "b")],
                   unchanged=(str(tmp_path),))
    assert_error(outcome, USAGE_STATUS, f"unexpected arguments [{str(tmp_path / 'b')!r}]",
                 "expected IN OUT")


def test_convert_missing_input_names_IN_not_the_study_flag(capsys, tmp_path):
    missing = str(tmp_path / "model.safetensors")
    outcome = call(capsys, convert.main, [missing, str(tmp_path / "out")],
                   unchanged=(str(tmp_path),))
    line = assert_error(outcome, CONVERT_STATUS, f"IN {missing} not found",
                        "expected a timm .safetensors file", "model.safetensors of Hugging Face")
    assert "--config" not in line, line  # the study's flag, not convert's


def test_convert_warns_on_nan_and_infinite_weights(capsys, tmp_path):
    """Converted as they are, with one warning line per damaged tensor."""
    from safetensors.numpy import load_file, save_file

    weights = load_file(SAFETENSORS)
    weights["blocks.0.mlp.fc1.weight"][0, :3] = [np.nan, np.inf, -np.inf]
    damaged = str(tmp_path / "damaged.safetensors")
    save_file(weights, damaged)
    outcome = call(capsys, convert.main, [damaged, str(tmp_path / "out"), *TINY_ARCH])
    assert outcome.status == 0, outcome
    warnings = [line for line in outcome.err.splitlines() if line.startswith("warning: ")]
    assert warnings == [f"warning: {damaged}: blocks.0.mlp.fc1.kernel has 1 NaN and 2 infinite "
                        f"values of {weights['blocks.0.mlp.fc1.weight'].size}"], outcome.err
    outcome = call(capsys, convert.main, [SAFETENSORS, str(tmp_path / "clean"), *TINY_ARCH])
    assert outcome.status == 0 and "warning" not in outcome.err, outcome


# --------------------------------------------------------------------------------------------
# python -m oneshui_jax.splits: status 2, no JSON written

SMALL = ["--dataset", "synthfaces", "--synthfaces_config", "small"]


def _mufac(root, train_rows: str) -> str:
    folder = root / "mufac"
    folder.mkdir(parents=True)
    header = "family_id,person_id,age_class,image_path\n"
    for split in ("train", "val", "test"):
        rows = train_rows if split == "train" else "F9,P9,a,9.jpg\n"
        (folder / f"custom_{split}_dataset.csv").write_text(header + rows)
    return str(root)


def test_splits_refuses_missing_and_malformed_annotations(capsys, tmp_path):
    data = tmp_path / "data"
    (data / "celeba").mkdir(parents=True)
    (data / "CelebAMask-HQ").mkdir()
    hq = data / "CelebAMask-HQ" / "CelebA-HQ-identity.txt"
    mufac_header = _mufac(tmp_path / "header", "")
    (tmp_path / "header" / "mufac" / "custom_val_dataset.csv").write_text("family,person\n")
    mufac_row = _mufac(tmp_path / "row", "F1,P1,a,1.jpg\nF1,,b\n")
    cases = {  # dataset, data_dir, file content (or None), what the error must name
        "no_data_dir": ("mufac", None, None, ["Dataset 'mufac' needs a data_dir"]),
        "data_dir_gone": ("celeba", tmp_path / "nowhere", None,
                          [f"Data directory not found: {tmp_path / 'nowhere'}"]),
        "sub_folder_gone": ("mufac", data, None,
                            [f"Data directory not found: {data / 'mufac'}",
                             "custom_{train,val,test}_dataset.csv"]),
        "file_gone": ("celeba", data, None,
                      [f"Annotation file not found: {data / 'celeba' / 'identity_CelebA.txt'}",
                       "rows '<000001.jpg> <identity id>'"]),
        "empty_file": ("celebahq", data, "\n", [f"{hq} is empty", "CelebA-HQ-identity.txt"]),
        "fields": ("celebahq", data, "0.jpg 3\n1.jpg\n",
                   [f"{hq}, line 2: expected 2 fields, got '1.jpg'"]),
        "integer": ("celebahq", data, "0.jpg 3\n1.jpg x\n",
                    [f"{hq}, line 2: person id 'x' is not an integer"]),
        "mufac_header": ("mufac", mufac_header, None,
                         ["custom_val_dataset.csv, line 1: header ['family', 'person'] does not "
                          "start with the columns family_id,person_id,age_class,image_path"]),
        "mufac_row": ("mufac", mufac_row, None,
                      ["custom_train_dataset.csv, line 3: expected 4 non-empty columns"]),
    }
    out = tmp_path / "split.json"
    for name, (dataset, data_dir, content, words) in cases.items():
        if content is not None:
            hq.write_text(content)
        argv = ["--dataset", dataset, "--num_identities", "1", "--out", str(out)]
        argv += [] if data_dir is None else ["--data_dir", str(data_dir)]
        outcome = call(capsys, splits.main, argv, unchanged=(str(tmp_path),))
        assert_error(outcome, SPLITS_STATUS, *words, case=name)


def test_splits_refuses_impossible_requests(capsys, tmp_path):
    out = str(tmp_path / "split.json")
    cases = {  # arguments, what the error must name
        "zero": (["--num_identities", "0"], ["num_identities must be >= 1, got 0"]),
        "too_many": (["--num_identities", "100000"],
                     ["num_identities=100000 but only 92 train identities of synthfaces (seed 0)",
                      "choose num_identities <= 91 (one train identity must stay in the retain "
                      "set)"]),
        "no_retain": (["--num_identities", "92"],
                      ["num_identities=92 forgets every one of the 92 train identities of "
                       "synthfaces (seed 0), leaving the retain set empty",
                       "choose num_identities <= 91"]),
        "dedup_synthfaces": (["--num_identities", "1", "--dedup", "merge"],
                             ["--dedup merge needs a real dataset's image files"]),
    }
    for name, (extra, words) in cases.items():
        outcome = call(capsys, splits.main, [*SMALL, *extra, "--out", out],
                       unchanged=(str(tmp_path),))
        assert_error(outcome, SPLITS_STATUS, *words, case=name)
    data = _mufac(tmp_path / "data", "F1,P1,a,1.jpg\nF1,P1,b,2.jpg\n")
    outcome = call(capsys, splits.main, ["--dataset", "mufac", "--data_dir", data,
                                         "--num_identities", "1", "--dedup", "merge", "--out",
                                         out], unchanged=(str(tmp_path),))
    assert_error(outcome, SPLITS_STATUS, f"mufac under {data}: 4 missing image(s)",
                 os.path.join(data, "mufac", "train_images", "1.jpg"), "nothing was built")


def test_splits_usage_errors(capsys, tmp_path):
    outcome = call(capsys, splits.main, [*SMALL, "--out", str(tmp_path / "x.json")],
                   unchanged=(str(tmp_path),))
    assert_error(outcome, USAGE_STATUS, "flag --num_identities is required")
    outcome = call(capsys, splits.main, ["--dataset", "imagenet", "--num_identities", "1",
                                         "--out", str(tmp_path / "x.json")])
    assert_error(outcome, USAGE_STATUS, "flag --dataset=imagenet: expected one of synthfaces, "
                 "celeba, celebahq, mufac")
    outcome = call(capsys, splits.main, [*SMALL, "--num_identities", "1", "--out"],
                   unchanged=(str(tmp_path),))
    assert_error(outcome, USAGE_STATUS, "flag --out has no value",
                 "expected the JSON file to write")


def test_splits_annotation_file_that_is_not_text(capsys, tmp_path):
    (tmp_path / "celeba").mkdir()
    path = tmp_path / "celeba" / "identity_CelebA.txt"
    path.write_bytes(b"\xff\xfe000001.jpg 1\n")
    outcome = call(capsys, splits.main, ["--dataset", "celeba", "--data_dir", str(tmp_path),
                                         "--num_identities", "1", "--out",
                                         str(tmp_path / "x.json")], unchanged=(str(tmp_path),))
    assert_error(outcome, SPLITS_STATUS, f"{path} is not UTF-8 text", "byte 0xff",
                 "Expected <data_dir>/celeba/identity_CelebA.txt")


def test_annotation_readers_refuse_files_that_are_not_text(tmp_path):
    """Every reader of the study's annotation files (identities, labels, the CelebA-HQ image
    count and the MUFAC CSVs) raises one DataError naming the file."""
    not_text = b"0.jpg 1\n\x80\x81 2\n"
    (tmp_path / "CelebAMask-HQ").mkdir()
    (tmp_path / "CelebAMask-HQ" / "CelebA-HQ-identity.txt").write_text("0.jpg 3\n1.jpg 4\n")
    attributes = tmp_path / "CelebAMask-HQ" / "CelebAMask-HQ-attribute-anno.txt"
    attributes.write_bytes(b"2\n" + not_text)
    with pytest.raises(DataError, match=f"{attributes} is not UTF-8 text"):
        annotations.read_celebahq_labels(str(tmp_path), annotations.IdentityAnnotations(
            "celebahq", np.asarray([3, 4]), ("0.jpg", "1.jpg"), "list"))
    attributes.write_bytes(b"\xff2\n")
    with pytest.raises(DataError, match=f"{attributes} is not UTF-8 text"):
        annotations.read_identities("celebahq", str(tmp_path))
    csv_path = tmp_path / "mufac" / "custom_val_dataset.csv"
    _mufac(tmp_path, "F1,P1,a,1.jpg\n")
    csv_path.write_bytes(b"family_id,person_id,age_class,image_path\nF\xe9,P1,a,1.jpg\n")
    with pytest.raises(DataError, match=f"{csv_path} is not UTF-8 text"):
        annotations.read_identities("mufac", str(tmp_path))


def test_header_only_annotation_files_warn(tmp_path, caplog):
    """A MUFAC CSV or an attribute file with a header and no rows is read (an empty split can be
    meant) with one warning naming the file, once per file."""
    data = _mufac(tmp_path, "F1,P1,a,1.jpg\n")
    empty_csv = tmp_path / "mufac" / "custom_test_dataset.csv"
    empty_csv.write_text("family_id,person_id,age_class,image_path\n")
    with caplog.at_level("WARNING", logger="absl"):
        annotations.read_identities("mufac", data)
        annotations.read_identities("mufac", data)  # read again (labels): no second warning
    warned = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert warned == [f"{empty_csv} has a header but no rows: the MUFAC test split has no "
                      "images; is the file complete?"], warned
    caplog.clear()
    (tmp_path / "CelebAMask-HQ").mkdir()
    (tmp_path / "CelebAMask-HQ" / "CelebA-HQ-identity.txt").write_text("0.jpg 3\n")
    attributes = tmp_path / "CelebAMask-HQ" / "CelebAMask-HQ-attribute-anno.txt"
    attributes.write_text("0\n5_o_Clock_Shadow Bald\n")
    with caplog.at_level("WARNING", logger="absl"), contextlib.suppress(DataError):
        annotations.read_celebahq_labels(str(tmp_path), annotations.IdentityAnnotations(
            "celebahq", np.asarray([], np.int64), (), "list"))
    assert any(f"{attributes} has a header but no rows" in r.getMessage()
               for r in caplog.records), caplog.records


def test_a_fresh_tfds_build_does_not_warn_about_dataset_info(tmp_path, caplog):
    """TFDS checks a dataset's folder before building it and warned on every first build that
    it has no dataset_info.json (it cannot have one yet); the warning is dropped."""
    from oneshui_jax.data import tfds_builders

    with caplog.at_level("INFO", logger="absl"):
        assert not tfds_builders.synthfaces_builder(str(tmp_path), "small").is_prepared()
    assert not [r for r in caplog.records if "dataset_info.json" in r.getMessage()], caplog.text


def test_splits_out_that_cannot_be_written(capsys, tmp_path, monkeypatch):
    """A directory, a path under a file: refused before any work; an OSError while writing
    (a full disk) is one line too."""
    (tmp_path / "a_folder").mkdir()
    (tmp_path / "a_file").write_text("x")
    cases = {  # --out, what the error must name
        "directory": (tmp_path / "a_folder", ["it is a directory"]),
        "under_a_file": (tmp_path / "a_file" / "x.json",
                         [f"{tmp_path / 'a_file'} is a file, not a folder"]),
        "deep_under_a_file": (tmp_path / "a_file" / "sub" / "x.json",
                              [f"{tmp_path / 'a_file'} is a file, not a folder"]),
    }
    for name, (out, words) in cases.items():
        outcome = call(capsys, splits.main, [*SMALL, "--num_identities", "1", "--out", str(out)],
                       unchanged=(str(tmp_path),))
        assert_error(outcome, SPLITS_STATUS, f"--out {out} cannot be written", *words,
                     "expected a JSON file in a writable folder", case=name)

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(splits, "save_json", full_disk)
    out = str(tmp_path / "split.json")
    outcome = call(capsys, splits.main, [*SMALL, "--num_identities", "1", "--out", out],
                   unchanged=(str(tmp_path),))
    assert_error(outcome, SPLITS_STATUS, f"--out {out} cannot be written",
                 "No space left on device")


# --------------------------------------------------------------------------------------------
# python -m oneshui_jax.report: status 2, nothing written

RECORD = {"method": "pretrain", "dataset": "mufac", "num_identities": 5, "seed": 0,
          "retain": {"metric": 50.0, "loss": 1.0}, "forget": {"metric": 60.0, "loss": 1.0},
          "test": {"metric": 40.0, "loss": 1.0}, "val": {"metric": 40.0, "loss": 1.0}}


def test_report_refuses_files_that_are_not_results(capsys, tmp_path):
    inputs = tmp_path / "in"
    inputs.mkdir()
    (inputs / "not_json.json").write_text("{")
    write_json(inputs / "good.json", {"results": [RECORD]})
    cases = {  # results.json content (None: no file), what the error must name
        "missing": (None, ["not a results.json written by a study", "No such file"]),
        "not_json": ("{", ["not a results.json written by a study", "Expecting property name"]),
        "no_results": ({}, ["not a results.json written by a study ('results')"]),
        "a_list": ([RECORD], ["not a results.json written by a study (list indices"]),
        "no_records": ({"results": []}, ["no records in "]),
        "unknown_dataset": ({"results": [dict(RECORD, dataset="imagenet")]},
                            ["record 0 has an unknown dataset 'imagenet'; expected one of "
                             "synthfaces"]),
    }
    out = str(tmp_path / "out")
    for name, (content, words) in cases.items():
        path = str(inputs / f"{name}.json")
        if content is not None and name != "not_json":
            write_json(path, content)
        outcome = call(capsys, report.main, [path, "--out", out], unchanged=(str(tmp_path),))
        line = assert_error(outcome, REPORT_STATUS, *words, case=name)
        assert path in line, (name, line)
    mixed = write_json(inputs / "celeba.json", {"results": [dict(RECORD, dataset="celeba")]})
    outcome = call(capsys, report.main, [str(inputs / "good.json"), mixed, "--out", out],
                   unchanged=(str(tmp_path),))
    assert_error(outcome, REPORT_STATUS, "records mix metrics ['acc', 'mAP']",
                 "report one task at a time")


def test_report_usage_errors(capsys, tmp_path):
    outcome = call(capsys, report.main, [str(tmp_path / "results.json")],
                   unchanged=(str(tmp_path),))
    assert_error(outcome, USAGE_STATUS, "flag --out is required",
                 "expected the folder for results.{json,md,csv}")
    outcome = call(capsys, report.main, ["--out", str(tmp_path / "out")],
                   unchanged=(str(tmp_path),))
    assert_error(outcome, USAGE_STATUS, "the following arguments are required: results",
                 "expected RESULTS.json")


@pytest.mark.parametrize("results, words", [
    (5, ["'results' is a JSON int; expected a list of records"]),
    (["pretrain"], ["record 0 is a JSON str; expected an object"]),
    ([{"method": "pretrain"}], ["record 0 has dataset missing; expected a string"]),
    ([RECORD, {k: v for k, v in RECORD.items() if k != "method"}],
     ["record 1 has method missing; expected a string"]),
    ([dict(RECORD, seed="0")], ["record 0 has seed '0'; expected an int"]),
    ([dict(RECORD, retain={"metric": "high"})],
     ["record 0 has retain.metric 'high'; expected a number"]),
    ([dict(RECORD, mia=[1])], ["record 0 has mia [1]; expected an object of numbers"]),
    ([dict(RECORD, history=[{"epoch": 1, "train_loss": 1.0, "val_loss": 1.0}])],
     ["record 0 has history[0].val_metric 'missing'; expected a number"]),
], ids=["not_a_list", "not_a_dict", "no_dataset", "no_method", "seed_not_an_int",
        "metric_not_a_number", "mia_not_an_object", "history_without_val_metric"])
def test_report_records_of_the_wrong_shape(capsys, tmp_path, results, words):
    path = write_json(tmp_path / "results.json", {"results": results})
    outcome = call(capsys, report.main, [path, "--out", str(tmp_path / "out")],
                   unchanged=(str(tmp_path),))
    assert_error(outcome, REPORT_STATUS, f"{path}: ", *words)


def test_report_out_that_cannot_be_written(capsys, tmp_path, monkeypatch):
    """--out a file, or the folder of an input: refused, nothing written; an OSError while
    writing (a full disk) is one line too."""
    path = write_json(tmp_path / "results.json", {"results": [RECORD]})
    outcome = call(capsys, report.main, [path, "--out", path], unchanged=(str(tmp_path),))
    assert_error(outcome, REPORT_STATUS, f"--out {path} is a file", "expected a folder")
    outcome = call(capsys, report.main, [path, "--out", str(tmp_path)],
                   unchanged=(str(tmp_path),))
    assert_error(outcome, REPORT_STATUS, f"--out {tmp_path} would replace the input {path}")

    out = tmp_path / "out"
    out.mkdir()
    (out / "results.md").write_text("an earlier report")
    real_savefig = plots.Figure.savefig

    def full_disk_at_the_first_plot(fig, f, *args, **kwargs):
        real_savefig(fig, f, *args, **kwargs)
        raise OSError(28, "No space left on device")  # a write of the file: no filename

    monkeypatch.setattr(plots.Figure, "savefig", full_disk_at_the_first_plot)
    outcome = call(capsys, report.main, [path, "--out", str(out)])
    assert_error(outcome, REPORT_STATUS)
    assert outcome.err.startswith(f"error: No space left on device: {out / 'methods.png'} "
                                  f"(--out {out}: the report could not be written; none of its "
                                  "files was replaced)"), outcome.err
    # never half a set: results.json, .csv are not written beside the earlier results.md
    assert sorted(os.listdir(out)) == ["results.md"]
    assert (out / "results.md").read_text() == "an earlier report"


# --------------------------------------------------------------------------------------------
# python -m oneshui_jax.main: status 2, nothing written


@pytest.fixture
def study_config(tmp_path, monkeypatch):
    """configs/synthfaces.py:runlocal=True (size=small, N=5, no attacks: errors, not attacks,
    are tested here) writing under tmp_path, fed to ``main_cli.main`` as if absl had parsed it;
    the absl handler's filters are restored afterwards."""
    spec = importlib.util.spec_from_file_location(
        "synthfaces_config_for_cli_errors", os.path.join(REPO, "configs", "synthfaces.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config("runlocal=True")
    config.data.tfds_dir = str(tmp_path / "tfds")
    config.workdir = str(tmp_path / "work")
    config.checkpoint_dir = str(tmp_path / "ckpt")
    monkeypatch.setattr(main_cli, "CONFIG", types.SimpleNamespace(value=config))
    handler = main_cli.logging.get_absl_handler()
    monkeypatch.setattr(handler, "filters", list(handler.filters))
    return config


def main_error(capsys, config) -> Outcome:
    """``main_cli.main`` on ``config``: neither its workdir nor its checkpoint_dir appears."""
    outcome = call(capsys, main_cli.main, ["oneshui_jax.main"])
    assert not os.path.exists(config.workdir) and not os.path.exists(config.checkpoint_dir)
    return outcome


def test_main_reports_config_errors(study_config, capsys):
    study_config.stages = ("pretrain", "bogus")
    assert_error(main_error(capsys, study_config), MAIN_STATUS,
                 "config.stages has unknown stages ['bogus']", "available: ['pretrain'")
    study_config.stages = ("pretrain", "support_ascent")
    study_config.support_ascent.loss_type = "bogus"
    assert_error(main_error(capsys, study_config), MAIN_STATUS,
                 "config.support_ascent.loss_type must be one of", "got 'bogus'")
    assert not os.path.exists(study_config.data.tfds_dir)  # refused before any data is read


def test_main_reports_data_errors(study_config, capsys, tmp_path):
    """A missing data folder names --config.data.data_dir and the layout it must hold."""
    study_config.dataset = "mufac"
    layout = "custom_{train,val,test}_dataset.csv"
    (tmp_path / "empty").mkdir()
    cases = {  # data_dir, what the error must name
        "missing": (str(tmp_path / "nowhere"),
                    [f"Data directory not found: --config.data.data_dir {tmp_path / 'nowhere'}",
                     layout]),
        "unset": ("", ["dataset 'mufac' needs its files: --config.data.data_dir is not set",
                       layout]),
        "no_mufac_folder": (str(tmp_path / "empty"),
                            [f"--config.data.data_dir {tmp_path / 'empty'} has no mufac/ folder",
                             layout, "README, Real data"]),
    }
    for name, (data_dir, words) in cases.items():
        study_config.data.data_dir = data_dir
        assert_error(main_error(capsys, study_config), MAIN_STATUS, *words, case=name)


def test_main_refuses_outputs_it_cannot_write(study_config, capsys, tmp_path, monkeypatch):
    """A checkpoint_dir or workdir that is a file, under a file or read-only: one line before
    any data is read or any stage trains; nothing is written."""
    (tmp_path / "a_file").write_text("x")
    (tmp_path / "locked").mkdir()
    read_only(monkeypatch, tmp_path / "locked")
    a_file, locked = str(tmp_path / "a_file"), str(tmp_path / "locked")
    cases = {  # field, value, what the error must name
        "checkpoint_dir_a_file": ("checkpoint_dir", a_file, f"{a_file} is a file, not a folder"),
        "checkpoint_dir_under_a_file": ("checkpoint_dir", os.path.join(a_file, "ckpt"),
                                        f"{a_file} is a file, not a folder"),
        "checkpoint_dir_read_only": ("checkpoint_dir", locked,
                                     f"the folder {locked} is not writable"),
        "workdir_read_only": ("workdir", locked, f"the folder {locked} is not writable"),
        "workdir_in_a_read_only_folder": ("workdir", os.path.join(locked, "work"),
                                          f"the folder {locked} is not writable"),
    }
    defaults = {"checkpoint_dir": study_config.checkpoint_dir, "workdir": study_config.workdir}
    for name, (field, value, problem) in cases.items():
        study_config.update(defaults)
        setattr(study_config, field, value)
        outcome = call(capsys, main_cli.main, ["oneshui_jax.main"], unchanged=(str(tmp_path),))
        assert_error(outcome, MAIN_STATUS, f"--config.{field} {value} cannot be written",
                     problem, "expected a writable folder", case=name)


def test_main_refuses_an_N_that_leaves_no_retain_identity(study_config, capsys, synthfaces_tfds,
                                                         tmp_path):
    """size=small has 92 train identities (seed 0), each with 2 images or more: N = 92 would
    forget them all and crash after pretraining; 91 is the largest N, and both errors say so
    before any stage runs."""
    study_config.data.tfds_dir = synthfaces_tfds
    for n, words in ((92, ["num_identities=92 forgets every one of the 92 train identities",
                           "leaving the retain set empty"]),
                     (500, ["num_identities=500 but only 92 train identities"])):
        study_config.num_identities = n
        outcome = call(capsys, main_cli.main, ["oneshui_jax.main"], unchanged=(str(tmp_path),))
        assert_error(outcome, MAIN_STATUS, *words, "choose num_identities <= 91", case=str(n))


def test_main_reports_checkpoint_errors(study_config, capsys, tmp_path):
    datasets.load("synthfaces", study_config.data)  # built first: tfds prints its progress
    study_config.model.init = str(tmp_path / "model.safetensors")
    assert_error(main_error(capsys, study_config), MAIN_STATUS,
                 f"ImageNet weights not found at {tmp_path / 'model.safetensors'}",
                 "--config.model.init")


def test_main_refuses_positional_arguments(capsys):
    """One line naming them, not absl's usage text."""
    outcome = call(capsys, main_cli.main, ["oneshui_jax.main", "extra"])
    assert_error(outcome, MAIN_STATUS, "unexpected arguments ['extra']",
                 "expected --config=FILE[:ARG] and --config.FIELD=VALUE overrides")


def _main_subprocess(tmp_path, *args: str) -> subprocess.CompletedProcess:
    settings = [f"--config.workdir={tmp_path / 'work'}",
                f"--config.checkpoint_dir={tmp_path / 'ckpt'}",
                f"--config.data.tfds_dir={tmp_path / 'tfds'}"]
    return subprocess.run([sys.executable, "-m", "oneshui_jax.main", *args, *settings],
                          cwd=REPO, capture_output=True, text=True, timeout=180)


def test_main_missing_config_file(tmp_path):
    result = _main_subprocess(tmp_path, "--config=configs/missing.py")
    assert result.returncode == MAIN_STATUS, result.stderr
    assert result.stderr.startswith("error: ") and "configs/missing.py" in result.stderr
    assert len(result.stderr.splitlines()) == 1 and "Traceback" not in result.stderr
    assert os.listdir(tmp_path) == []


def test_main_override_of_the_wrong_type(tmp_path):
    result = _main_subprocess(tmp_path, "--config=configs/synthfaces.py",
                              "--config.num_identities=ten")
    assert result.returncode == MAIN_STATUS, result.stderr
    assert result.stderr.startswith("error: ") and "num_identities" in result.stderr
    assert "ten" in result.stderr and "expected a value of type int" in result.stderr
    assert len(result.stderr.splitlines()) == 1 and "Traceback" not in result.stderr
    assert os.listdir(tmp_path) == []


@pytest.mark.slow
def test_main_flag_errors_are_one_line(tmp_path):
    """Each of absl's and ml_collections' flag errors (the processes run side by side)."""
    cases = {  # arguments, what the error must name
        "unknown_flag": (["--nosuchflag"], ["Unknown command line flag 'nosuchflag'",
                                            "expected --config=FILE[:ARG]"]),
        "bad_config_arg": (["--config=configs/synthfaces.py:N=abc"],
                           ["flag --config=configs/synthfaces.py:N=abc: config argument "
                            "N='abc' is not an int"]),
        "unknown_config_arg": (["--config=configs/synthfaces.py:bogus=1"],
                               ["unknown config argument 'bogus'; expected N (default 10)"]),
        "unknown_field": (["--config.bogus=1"],
                          ["unknown config field 'bogus'; expected a field that --config "
                           "configs/synthfaces.py defines"]),
        "missing_file_with_override": (["--config=configs/missing.py", "--config.seed=1"],
                                       ["--config configs/missing.py: cannot load the config "
                                        "file", "No such file or directory"]),
        "positional": (["extra"], ["unexpected arguments ['extra']"]),
        "override_not_an_int": (["--config.train.epochs=abc"],
                                ["flag --config.train.epochs=abc: invalid literal for int()",
                                 "expected a value of type int"]),
        "config_file_missing": (["--config=configs/nope.py"],
                                ["--config configs/nope.py: cannot load the config file",
                                 "expected a Python file defining get_config()"]),
        "config_arg_misspelt": (["--config=configs/synthfaces.py:size=smal"],
                                ["config argument size='smal' must be one of medium, large, "
                                 "small"]),
    }
    running = {name: subprocess.Popen(
        [sys.executable, "-m", "oneshui_jax.main", *args,
         f"--config.workdir={tmp_path / 'work'}", f"--config.checkpoint_dir={tmp_path / 'ckpt'}",
         f"--config.data.tfds_dir={tmp_path / 'tfds'}"],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for name, (args, _) in cases.items()}
    for name, process in running.items():
        out, err = process.communicate(timeout=180)
        assert_error(Outcome(process.returncode, out, err), MAIN_STATUS, *cases[name][1],
                     case=name)
    assert os.listdir(tmp_path) == []


def _start_study(folder, tfds_dir):
    """A pretraining run that lasts (500 epochs), started as a terminal would start it (SIGINT
    handled by default even if pytest ignores it): ``(args, process)``."""
    args = ["--config=configs/synthfaces.py:runlocal=True", "--config.stages=('pretrain',)",
            "--config.train.epochs=500", f"--config.workdir={folder / 'work'}",
            f"--config.checkpoint_dir={folder / 'ckpt'}", f"--config.data.tfds_dir={tfds_dir}"]
    return args, subprocess.Popen(
        [sys.executable, "-m", "oneshui_jax.main", *args], cwd=REPO, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def _training_metadata(folder) -> str | None:
    """The metadata.json of a stage under ``folder/ckpt`` that has started training."""
    for path in glob.glob(str(folder / "ckpt" / "**" / "metadata.json"), recursive=True):
        with contextlib.suppress(OSError, ValueError), open(path) as f:
            if json.load(f).get("status") == "training":
                return path
    return None


@pytest.mark.slow
def test_main_ctrl_c_and_sigterm_print_one_line_and_exit_130_and_143(tmp_path, synthfaces_tfds):
    """SIGINT inside the training loop, SIGTERM in the first moment of the stage and SIGTERM
    while the data is being built (the three runs at once): no traceback, one last line naming
    the signal, where the run was, what is kept and the command that resumes (the same one),
    exit status 130 / 143; a stage stays resumable (metadata "training")."""
    in_stage = "in stage pretrain"
    loading = "while reading the data and making the split, before the first stage"
    cases = {  # signal, its name, status, where, seconds after the trigger, the trigger
        "sigint": (signal.SIGINT, "Ctrl-C", interrupts.INTERRUPTED_STATUS, in_stage, 3.0,
                   lambda folder: _training_metadata(folder)),
        "sigterm": (signal.SIGTERM, "SIGTERM", interrupts.TERMINATED_STATUS, in_stage, 0.0,
                    lambda folder: _training_metadata(folder)),
        "sigterm_loading": (signal.SIGTERM, "SIGTERM", interrupts.TERMINATED_STATUS, loading, 0.0,
                            lambda folder: os.path.isdir(folder / "tfds" / "synth_faces")),
    }
    runs = {name: _start_study(tmp_path / name, tmp_path / name / "tfds"
                               if name == "sigterm_loading" else synthfaces_tfds)
            for name in cases}
    triggered, sent = {}, {}
    try:
        deadline = time.monotonic() + 300
        while len(sent) < len(runs) and time.monotonic() < deadline:
            time.sleep(0.05)
            for name, (_, process) in runs.items():
                if name in sent or process.poll() is not None:
                    continue
                if name not in triggered and cases[name][5](tmp_path / name):
                    triggered[name] = time.monotonic()
                if name in triggered and time.monotonic() - triggered[name] >= cases[name][4]:
                    process.send_signal(cases[name][0])
                    sent[name] = True
        outputs = {name: process.communicate(timeout=120) for name, (_, process) in runs.items()}
    finally:
        for _, process in runs.values():
            if process.poll() is None:
                process.kill()
                process.communicate()
    assert sent.keys() == runs.keys(), f"a run never reached its moment: {outputs}"
    assert (interrupts.INTERRUPTED_STATUS, interrupts.TERMINATED_STATUS) == (130, 143)
    for name, (args, process) in runs.items():
        _, name_in_line, status, where, _, _ = cases[name]
        err = outputs[name][1]
        assert process.returncode == status, (name, err)
        assert "Traceback" not in err and "KeyboardInterrupt" not in err, err
        resume = "python -m oneshui_jax.main " + shlex.join(args)
        assert err.splitlines()[-1] == (
            f"interrupted ({name_in_line}) {where}; the finished stages and the last "
            f"save of an unfinished one are kept under {tmp_path / name / 'ckpt'}; to resume, "
            f"run the same command: {resume}"), err
        if where == in_stage:
            with open(_training_metadata(tmp_path / name)) as f:
                assert json.load(f)["status"] == "training"  # resumable, not marked done
        assert not os.path.exists(tmp_path / name / "work")
