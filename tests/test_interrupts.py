"""Interrupts are never lost (``oneshui_jax/interrupts.py``): a Ctrl-C or SIGTERM whose exception
is swallowed (raised inside a ``__del__`` or a garbage-collection callback) still stops the loops
at their next step, with the exit status a shell expects."""

import gc
import os
import signal
import sys

import jax.numpy as jnp
import optax
import pytest

from oneshui_jax import interrupts
from oneshui_jax import train as train_lib
from oneshui_jax.models import vit

# The swallowed interrupts below are printed by Python as "Exception ignored in __del__", which
# pytest turns into a warning: that is the very situation under test.
pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")


@pytest.fixture(autouse=True)
def sigint_as_in_a_terminal():
    """Python's own SIGINT handler during each test, as a command started from a terminal has.
    A test worker started in the background inherits SIGINT ignored, and ``interrupts.handle``
    keeps an ignored signal ignored (as Python does), so without this the SIGINT cases would
    test nothing there (or fail, as they did in a clean-clone run started with ``&``)."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


class _SignalOnDelete:
    """Sends ``signum`` to this process from ``__del__``: the handler's exception is raised
    inside the finaliser, where Python prints it as "ignored" and goes on."""

    def __init__(self, signum: int):
        self.signum = signum

    def __del__(self):
        os.kill(os.getpid(), self.signum)


def _swallowed(signum: int) -> None:
    obj = _SignalOnDelete(signum)
    del obj
    gc.collect()


@pytest.mark.parametrize("signum,name,status", [(signal.SIGINT, "Ctrl-C", 130),
                                                (signal.SIGTERM, "SIGTERM", 143)])
def test_a_swallowed_interrupt_is_raised_again_by_check(signum, name, status):
    with interrupts.handle():
        _swallowed(signum)  # the exception was raised and ignored: execution went on
        assert interrupts.pending() == signum
        with pytest.raises(interrupts.Interrupted) as caught:
            interrupts.check()
    assert caught.value.name == name and caught.value.status == status
    assert isinstance(caught.value, KeyboardInterrupt)  # every `except KeyboardInterrupt` sees it
    assert interrupts.pending() is None  # cleared on leaving the block
    interrupts.check()  # nothing pending: no exception


class _RaiseOnDelete:
    def __del__(self):
        raise ValueError("a finaliser's own failure")


def test_a_swallowed_interrupt_prints_no_traceback_but_other_failures_still_do(monkeypatch):
    """The one-line promise: Python reports an exception raised in a finaliser through
    ``sys.unraisablehook`` ("Exception ignored in ... Traceback"); inside ``handle`` a swallowed
    interrupt is kept quiet (``check`` raises it again), while any other failure is reported as
    before, and the hook is restored on leaving the block."""
    reported = []
    monkeypatch.setattr("sys.unraisablehook", reported.append)
    with interrupts.handle():
        _swallowed(signal.SIGTERM)
        assert interrupts.pending() == signal.SIGTERM and reported == []
        obj = _RaiseOnDelete()
        del obj
        gc.collect()
        assert [type(r.exc_value) for r in reported] == [ValueError]
    assert sys.unraisablehook == reported.append


def test_handle_raises_at_once_and_restores_the_previous_handlers():
    before = {s: signal.getsignal(s) for s in interrupts.NAMES}
    with interrupts.handle(), pytest.raises(interrupts.Interrupted) as caught:
        os.kill(os.getpid(), signal.SIGTERM)  # default SIGTERM would end the test process
        for _ in range(10**6):  # the handler runs at the next bytecode boundary
            pass
    assert caught.value.status == 143
    assert {s: signal.getsignal(s) for s in interrupts.NAMES} == before


def test_a_plain_keyboard_interrupt_counts_as_ctrl_c():
    assert interrupts.as_interrupted(KeyboardInterrupt()).status == 130


def test_fit_stops_at_the_next_step_after_a_swallowed_interrupt(monkeypatch):
    """The class of the bug: Ctrl-C arrives while Python runs a finaliser (here in the
    validation of epoch 0); without the loops' check the run trains all its epochs."""
    steps = []

    def fake_train_step(model_cfg, cfg):  # no ViT to compile: the loop is what is tested
        def step(params, opt_state, batch, lr):
            steps.append(1)
            return params, opt_state, {"loss": jnp.float32(1.0)}
        return optax.sgd(0.0), step

    def validate(params):
        if not steps[2:]:  # after the first epoch's two steps
            _swallowed(signal.SIGINT)
        return {"loss": 1.0, "metric": 1.0}

    class Batches:
        def __next__(self):
            return {"image": jnp.zeros((2, 32, 32, 3)), "label": jnp.zeros(2, jnp.int32),
                    "mask": jnp.ones(2, bool)}

    monkeypatch.setattr(train_lib, "train_step", fake_train_step)
    cfg = train_lib.TrainConfig(task="classification", epochs=50, batch_size=2, lr=0.1)
    model = vit.ViTConfig.preset("vit_tiny_test", num_classes=3)
    with interrupts.handle(), pytest.raises(interrupts.Interrupted):
        train_lib.fit(model, cfg, {"w": jnp.zeros(3)}, Batches(), 2, validate, progress=False)
    assert len(steps) == 2  # stopped before the first step of epoch 1


def _metadata() -> dict:
    config = {"dataset": "synthfaces", "model": {"name": "vit_tiny_test"}, "num_identities": 2,
              "seed": 0, "train": {"lr": 1e-3}}
    return {"config": config, "splits": {"forget": [1], "retain": [2]}}


@pytest.mark.parametrize("failure", ["interrupt", "full_disk"])
def test_an_interrupted_or_failed_save_leaves_no_temporary_folder(tmp_path, monkeypatch, failure):
    """Orbax writes ``params.orbax-checkpoint-tmp-<time>`` and renames it when complete; a save
    stopped by an interrupt or a full disk removes that folder, leaves the run unfinished
    (metadata "training") and, for the disk, says the OS's reason first."""
    import orbax.checkpoint as ocp

    from oneshui_jax import checkpoints

    run = str(tmp_path / "run")

    def dies_midway(self, path, *args, **kwargs):
        os.makedirs(f"{path}{checkpoints.ORBAX_TMP_SUFFIX}-1733400000")  # as orbax starts
        if failure == "interrupt":
            raise interrupts.Interrupted(signal.SIGTERM)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ocp.StandardCheckpointer, "save", dies_midway)
    expected = (interrupts.Interrupted if failure == "interrupt"
                else checkpoints.CheckpointError)
    with pytest.raises(expected) as caught:
        checkpoints.save_params(run, {"w": jnp.arange(4.0)}, _metadata())
    assert sorted(os.listdir(run)) == [checkpoints.METADATA_FILE]  # no temporary folder
    assert checkpoints.read_metadata(run)["status"] == "training"
    if failure == "full_disk":
        assert str(caught.value).startswith(
            f"No space left on device: {os.path.join(run, checkpoints.PARAMS_DIR)}")


@pytest.fixture
def exits(monkeypatch):
    """``os._exit`` (which the command lines leave by after an interrupt) raises SystemExit."""
    def exit_now(status):
        raise SystemExit(status)

    monkeypatch.setattr(os, "_exit", exit_now)


def test_serve_prints_one_line_and_exits_143_on_sigterm(monkeypatch, capsys, exits, tmp_path):
    from oneshui_jax.cli import request as cli

    def interrupted(*args, **kwargs):
        raise interrupts.Interrupted(signal.SIGTERM)

    monkeypatch.setattr(cli, "serve_request", interrupted)
    argv = ["--checkpoint", str(tmp_path / "run"), "--portrait", "me.png", "--out",
            str(tmp_path / "out")]
    with pytest.raises(SystemExit) as caught:
        cli.main(argv)
    assert caught.value.code == 143
    assert capsys.readouterr().err.splitlines() == [
        f"interrupted (SIGTERM) while serving the request; nothing of the request was written "
        f"and {tmp_path / 'run'} is unchanged; to retry, run the same command: "
        f"python -m oneshui_jax.unlearn {' '.join(argv)}"]


def test_select_prints_one_line_and_exits_130_on_ctrl_c(monkeypatch, capsys, exits, tmp_path):
    import types

    import ml_collections

    from oneshui_jax.cli import select

    config = ml_collections.ConfigDict({"workdir": str(tmp_path / "work")})
    monkeypatch.setattr(select, "CONFIG", types.SimpleNamespace(value=config))
    monkeypatch.setattr(select.select_lib, "pretrain_dir",
                        lambda config: str(tmp_path / "pretrain"))

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt  # Python's own, before or without the handler: Ctrl-C

    monkeypatch.setattr(select.select_lib, "select", interrupted)
    with pytest.raises(SystemExit) as caught:
        select.main(["oneshui_jax.select"])
    assert caught.value.code == 130
    candidates = tmp_path / "work" / "selection" / "candidates"
    assert capsys.readouterr().err.splitlines()[-1].startswith(
        f"interrupted (Ctrl-C) during the selection; the finished candidates are kept in "
        f"{candidates} and reused; to resume, run the same command: python -m oneshui_jax.select")


def test_an_interrupt_while_the_command_starts_is_one_line(tmp_path):
    """SIGTERM while ``python -m oneshui_jax.main`` still imports JAX: one line and 143, not a
    traceback from inside an import (or, on a machine that imports faster than this waits, the
    interrupt line of the running command)."""
    import subprocess
    import sys
    import time

    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    process = subprocess.Popen([sys.executable, "-m", "oneshui_jax.main",
                                f"--config.workdir={tmp_path / 'work'}",
                                f"--config.checkpoint_dir={tmp_path / 'ckpt'}"],
                               cwd=repo, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True)
    time.sleep(0.6)
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=60)
    assert process.returncode == 143, err
    assert "Traceback" not in err, err
    assert err.splitlines()[-1].startswith("interrupted (SIGTERM) "), err
    assert err.splitlines() == ["interrupted (SIGTERM) while starting; nothing was done"] or (
        "while starting" not in err)
    assert not (tmp_path / "ckpt").exists()
