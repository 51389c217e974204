"""A full disk or an unwritable folder anywhere is one line with the OS's reason first and the
path ("No space left on device: PATH"), and never half a set of results
(``files.naming``, ``files.atomic_set``, ``main``'s OSError line, the audit cache).

The real faults (a full tmpfs under each output, a read-only HOME) were tried by hand and are
listed in the README; here the OS's errors are planted where they arise, so the tests run as
any user in seconds."""

import logging
import os
import signal
import types

import ml_collections
import pytest

from oneshui_jax import files, interrupts, report, study
from oneshui_jax import main as main_cli
from oneshui_jax.data import audit, datasets

ENOSPC = (28, "No space left on device")


def test_naming_gives_the_path_to_an_os_error_that_names_none(tmp_path):
    with pytest.raises(OSError) as caught, files.naming(str(tmp_path / "results.md")):
        raise OSError(*ENOSPC)  # as a write() that fails says it: no file name
    assert caught.value.errno == 28 and caught.value.filename == str(tmp_path / "results.md")
    assert files.os_error_line(caught.value) == (
        f"No space left on device: {tmp_path / 'results.md'}")
    with pytest.raises(FileNotFoundError) as caught, files.naming("elsewhere"):
        open(tmp_path / "missing")  # an error that names its file keeps it
    assert caught.value.filename == str(tmp_path / "missing")


def test_atomic_set_writes_all_of_its_files_or_none(tmp_path):
    out = tmp_path / "work"
    out.mkdir()
    (out / "results.json").write_text("old json")
    (out / "results.md").write_text("old md")
    with pytest.raises(OSError) as caught, files.atomic_set(str(out)) as fileset:
        with fileset.open("results.json") as f:
            f.write("new json")
        with fileset.open("results.md") as f:
            f.write("new md")
            raise OSError(*ENOSPC)
    assert caught.value.filename == str(out / "results.md")
    assert sorted(os.listdir(out)) == ["results.json", "results.md"]  # no temporary file
    assert (out / "results.json").read_text() == "old json"  # not half a set
    with files.atomic_set(str(out)) as fileset:
        for name in ("results.json", "results.md", "roc.png"):
            with fileset.open(name, "wb" if name.endswith("png") else "w") as f:
                f.write(b"png" if name.endswith("png") else f"new {name}")
    assert sorted(os.listdir(out)) == ["results.json", "results.md", "roc.png"]
    assert (out / "results.md").read_text() == "new results.md"


def test_an_audit_cache_that_cannot_be_written_costs_a_warning_not_the_run(tmp_path, caplog):
    """A read-only or full TFDS folder that already holds the records: the images are checked
    (and checked again next time), the run goes on."""
    caplog.set_level(logging.WARNING, logger="absl")  # a command line may have raised it
    (tmp_path / "a_file").write_text("x")
    (tmp_path / "img.jpg").write_bytes(b"not an image")
    cache = str(tmp_path / "a_file" / "audit.jsonl")  # under a file: cannot be created
    checks = audit.check_files(str(tmp_path), ["img.jpg"], cache, num_threads=1)
    assert len(checks) == 1 and checks[0].size == len(b"not an image")
    assert "audit: cannot write its cache" in caplog.text and cache in caplog.text


def test_a_tfds_folder_that_fills_up_is_named(tmp_path, monkeypatch):
    from oneshui_jax.data.tfds_builders import synthfaces as builder

    def full(*args, **kwargs):
        raise OSError(*ENOSPC)

    monkeypatch.setattr(builder, "build_synthfaces", full)
    data_cfg = types.SimpleNamespace(tfds_dir=str(tmp_path / "tfds"), synthfaces_config="small")
    with pytest.raises(OSError) as caught:
        datasets._open("synthfaces", data_cfg, progress=False)
    assert files.os_error_line(caught.value) == f"No space left on device: {tmp_path / 'tfds'}"


# --------------------------------------------------------------------------------------------
# python -m oneshui_jax.main: the OS's reason, the path and where the study was, in one line


@pytest.fixture
def fake_study(tmp_path, monkeypatch):
    """``study.run`` on fakes (no data, no model): each step can be made to fail; ``main``'s
    os._exit raises SystemExit instead of ending pytest."""
    config = ml_collections.ConfigDict({
        "stages": ("pretrain",), "workdir": str(tmp_path / "work"),
        "checkpoint_dir": str(tmp_path / "ckpt"), "mia": {"rmia": False}})
    monkeypatch.setattr(main_cli, "CONFIG", types.SimpleNamespace(value=config))

    def exit_now(status):
        raise SystemExit(status)

    monkeypatch.setattr(os, "_exit", exit_now)
    fail = {}

    def step(name, value):
        def run(*args, **kwargs):
            if name in fail:
                raise fail[name]
            return value
        return run

    ctx = types.SimpleNamespace(splits=types.SimpleNamespace(to_dict=lambda: {}),
                                data_audit=None, dataset=types.SimpleNamespace(fingerprint="f"))
    monkeypatch.setattr(study, "prepare", step("prepare", ctx))
    monkeypatch.setattr(study, "initial_params", step("initial_params", {}))
    monkeypatch.setattr(study, "train_stage", step("train_stage", ({"method": "pretrain"}, {})))
    monkeypatch.setattr(report, "write_report", step("write_report", {}))
    return types.SimpleNamespace(config=config, fail=fail)


WHERE = {"prepare": "while reading the data and making the split, before the first stage",
         "initial_params": "while loading the initial model, before the first stage",
         "train_stage": "in stage pretrain",
         "write_report": "while writing the report, after the stages"}


@pytest.mark.parametrize("moment", list(WHERE))
def test_main_says_the_os_reason_the_path_and_where_in_one_line(fake_study, capsys, moment):
    path = "/full/disk/file"
    fake_study.fail[moment] = OSError(*ENOSPC, path)
    with pytest.raises(SystemExit) as caught:
        main_cli.main(["oneshui_jax.main"])
    err = capsys.readouterr().err
    assert caught.value.code == 2
    assert err.splitlines() == [
        f"error: No space left on device: {path} ({WHERE[moment]}); the finished stages and the "
        f"last save of an unfinished one are kept under {fake_study.config.checkpoint_dir}; "
        f"once it is fixed, run the same command: {interrupts.same_command('oneshui_jax.main')}"]


@pytest.mark.parametrize("moment", list(WHERE))
def test_main_says_where_an_interrupt_came(fake_study, capsys, moment):
    fake_study.fail[moment] = interrupts.Interrupted(signal.SIGTERM)
    with pytest.raises(SystemExit) as caught:
        main_cli.main(["oneshui_jax.main"])
    assert caught.value.code == 143
    assert capsys.readouterr().err.splitlines()[-1].startswith(
        f"interrupted (SIGTERM) {WHERE[moment]}; the finished stages")
