"""Reliability: locks on run directories and request outputs (concurrent runs lose nothing),
``inspect --verify``, corrupt checkpoints refused on reuse, metrics.jsonl after a resume.

The stages here run ``run_stage`` on a fake context (tiny parameters, no data, no evaluation),
so two real processes can race on one stage in seconds.
"""

import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
import types

import doubles
import jax
import ml_collections
import numpy as np
import pytest

from oneshui_jax import checkpoints, locks
from oneshui_jax import train as train_lib
from oneshui_jax.cli import inspect as inspect_cli
from oneshui_jax.cli import request as serve_cli
from oneshui_jax.errors import CheckpointError, ConfigError
from oneshui_jax.models import vit
from oneshui_jax.study import stages, validate
from oneshui_jax.study.context import dataset_folder

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TESTS = os.path.dirname(os.path.abspath(__file__))
SPLITS = doubles.TINY_SPLITS
MODEL = vit.ViTConfig.preset("vit_tiny_test", num_classes=3)


# --------------------------------------------------------------------------------------------
# A stage on a fake context


def fake_context(checkpoint_dir: str, wait_for_lock: bool = True) -> types.SimpleNamespace:
    """What ``run_stage`` reads of a ``Context``: config, dataset fingerprint, splits, model."""
    config = ml_collections.ConfigDict({
        "dataset": "synthfaces", "model": {"name": "vit_tiny_test"}, "num_identities": 2,
        "seed": 0, "checkpoint_dir": checkpoint_dir, "checkpoint_every_s": 0.0,
        "wait_for_lock": wait_for_lock, "data": {"dedup": "none"}, "mia": {"loss_rf": False}})
    splits = types.SimpleNamespace(to_dict=lambda: SPLITS)
    ctx = types.SimpleNamespace(config=config, dataset=types.SimpleNamespace(fingerprint="fp"),
                                splits=splits, model_cfg=MODEL, data_audit=None)
    ctx.run_dir = lambda stage: checkpoints.run_dir(checkpoint_dir, "synthfaces",
                                                    "vit_tiny_test", stage, 2, 0)
    return ctx


def run_fake_stage(ctx, calls_file: str | None = None, go_file: str | None = None,
                   value: float = 0.0):
    """``run_stage`` of a stage whose body appends one line to ``calls_file``, waits (at most
    two minutes) until ``go_file`` exists, and returns parameters shifted by ``value``; no
    evaluation."""
    template = vit.init_params(MODEL, jax.random.key(0))

    def body(rdir, checkpointer):
        if calls_file:
            with open(calls_file, "a") as f:
                f.write(f"{os.getpid()}\n")
        deadline = time.time() + 120
        while go_file and not os.path.exists(go_file) and time.time() < deadline:
            time.sleep(0.05)
        params = jax.tree.map(lambda x: np.asarray(x) + np.float32(value), template)
        return stages.StageOutput(params, {"access": "none", "value": value})

    real = stages.evaluate_splits
    stages.evaluate_splits = lambda ctx, params: {}
    try:
        return stages.run_stage(ctx, "fake", settings_name="fake", settings={"x": 1},
                                template=template, parent_hash=None, body=body,
                                training=False, access="none")
    finally:
        stages.evaluate_splits = real


# A process running the fake stage: argv tests folder, checkpoint_dir, calls file, go file,
# wait_for_lock, value.
STAGE_SCRIPT = textwrap.dedent("""
    import json, sys
    sys.path.insert(0, sys.argv[1])
    import test_reliability as t
    from oneshui_jax.errors import ConfigError
    root, calls, go, wait, value = sys.argv[2:7]
    try:
        record, _ = t.run_fake_stage(t.fake_context(root, wait == "1"), calls, go, float(value))
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    print(json.dumps({"value": record["value"], "reused": record.get("reused", False)}))
""")

# A process that holds the lock on argv[1] until killed, announcing it on stdout.
HOLD_SCRIPT = textwrap.dedent("""
    import sys, time
    from oneshui_jax import locks
    with locks.hold(sys.argv[1], what="a test holder"):
        print("held", flush=True)
        time.sleep(600)
""")


def start(script: str, *args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", script, *args], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def start_holder(path: str) -> subprocess.Popen:
    """A process holding the lock on ``path`` (returns once it holds it)."""
    proc = start(HOLD_SCRIPT, path)
    assert proc.stdout.readline().strip() == "held", proc.stderr.read()
    return proc


def kill(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    proc.stdout.close()
    proc.stderr.close()


# --------------------------------------------------------------------------------------------
# Locks


@pytest.mark.slow
def test_two_processes_on_one_stage_train_it_once(tmp_path):
    """A second process on a stage the first is running waits for it, then reuses its result:
    the stage's body runs once and both report the first one's record."""
    root, calls, go = str(tmp_path / "ckpt"), str(tmp_path / "calls.txt"), str(tmp_path / "go")
    first = start(STAGE_SCRIPT, TESTS, root, calls, go, "1", "1")
    deadline = time.time() + 240
    while not os.path.exists(calls) and first.poll() is None and time.time() < deadline:
        time.sleep(0.05)  # until the first is inside the stage, holding its lock
    second = start(STAGE_SCRIPT, TESTS, root, calls, go, "1", "2")
    seen = []
    for line in second.stderr:  # until the second says that it waits
        seen.append(line)
        if "waiting for it to finish" in line:
            break
    open(go, "w").close()
    results = [(proc, *proc.communicate(timeout=300)) for proc in (first, second)]
    for proc, _, err in results:
        assert proc.returncode == 0, "".join(seen) + err[-3000:]
    waiting = seen[-1]
    rdir = fake_context(root).run_dir("fake")
    assert f"{rdir} is being run by pid {first.pid} on host {socket.gethostname()}" in waiting
    records = [json.loads(out.strip().splitlines()[-1]) for _, out, _ in results]
    assert records == [{"value": 1.0, "reused": False}, {"value": 1.0, "reused": True}]
    with open(calls) as f:
        assert f.read().split() == [str(first.pid)]  # the body ran once
    assert checkpoints.is_finished(rdir)
    assert locks.read_holder(rdir) is None  # released


@pytest.mark.slow
def test_busy_stage_without_waiting_is_one_line_exit_2(tmp_path):
    """wait_for_lock=False: one ``error:`` line naming the holder's pid and host, status 2,
    nothing run; once the holder is gone the stage runs."""
    root, calls = str(tmp_path / "ckpt"), str(tmp_path / "calls.txt")
    rdir = fake_context(root).run_dir("fake")
    holder = start_holder(rdir)
    try:
        proc = start(STAGE_SCRIPT, TESTS, root, calls, "", "0", "1")
        out, err = proc.communicate(timeout=300)
    finally:
        kill(holder)
    assert proc.returncode == 2, err[-3000:]
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert f"{rdir} is being run by pid {holder.pid} on host {socket.gethostname()}" in lines[0]
    assert "--config.wait_for_lock=True" in lines[0] and out == ""
    assert not os.path.exists(calls) and not os.path.exists(rdir)
    record, _ = run_fake_stage(fake_context(root, wait_for_lock=False), calls)
    assert not record.get("reused") and open(calls).read().split() == [str(os.getpid())]


@pytest.mark.slow
def test_main_refuses_a_busy_stage_with_wait_for_lock_false(synthfaces_tfds, tmp_path):
    """The study's command line: exit 2 and one line naming the holder, nothing trained."""
    ckpt = str(tmp_path / "ckpt")
    config = synthfaces_config()
    rdir = checkpoints.run_dir(ckpt, dataset_folder(config), config.model.name, "pretrain", 5, 0)
    holder = start_holder(rdir)
    try:
        result = subprocess.run(
            [sys.executable, "-m", "oneshui_jax.main",
             "--config=configs/synthfaces.py:N=5,size=small",
             f"--config.data.tfds_dir={synthfaces_tfds}", f"--config.workdir={tmp_path}/work",
             f"--config.checkpoint_dir={ckpt}", "--config.stages=('pretrain',)",
             "--config.progress=False", "--config.data.num_threads=0",
             "--config.mia.loss_rf=False", "--config.mia.rmia=False",
             "--config.wait_for_lock=False"],
            cwd=REPO, capture_output=True, text=True, timeout=300)
    finally:
        kill(holder)
    assert result.returncode == 2, result.stderr[-3000:]
    error = result.stderr.strip().splitlines()[-1]
    assert error.startswith("error: "), result.stderr[-3000:]
    assert f"is being run by pid {holder.pid} on host {socket.gethostname()}" in error
    assert "Traceback" not in result.stderr
    assert not os.path.exists(rdir)  # nothing trained


def test_lock_of_a_killed_holder_is_taken_over_with_a_warning(tmp_path):
    """SIGKILL the holder: its holder record stays behind, the next process takes the lock at
    once (no waiting) and warns that the stale lock of that pid is taken over."""
    path = str(tmp_path / "run")
    holder = start_holder(path)
    recorded = locks.read_holder(path)
    assert recorded["pid"] == holder.pid and recorded["host"] == socket.gethostname()
    with pytest.raises(locks.LockBusy, match=f"is being run by pid {holder.pid} on host "):
        with locks.hold(path, wait=False):
            pass
    kill(holder)
    assert locks.read_holder(path)["pid"] == holder.pid  # left behind by the killed process
    assert not locks.pid_alive(holder.pid)
    warnings = []
    with locks.hold(path, wait=False, warn=warnings.append):
        assert locks.read_holder(path)["pid"] == os.getpid()
    assert len(warnings) == 1, warnings
    assert f"stale lock on {path} left by pid {holder.pid}" in warnings[0]
    assert "no longer running" in warnings[0]
    assert locks.read_holder(path) is None


def synthfaces_config():
    """``configs/synthfaces.py:N=5,size=small``."""
    spec = importlib.util.spec_from_file_location(
        "synthfaces_config_for_reliability", os.path.join(REPO, "configs", "synthfaces.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config("N=5,size=small")


def test_wait_for_lock_is_validated():
    config = synthfaces_config()
    assert config.wait_for_lock is True  # the default: wait
    validate.validate_config(config)
    with config.unlocked():
        del config["wait_for_lock"]
        config.wait_for_lock = "yes"
    with pytest.raises(ConfigError, match="config.wait_for_lock must be True .* got 'yes'"):
        validate.validate_config(config)


# --------------------------------------------------------------------------------------------
# Corrupt checkpoints


def _largest_file(folder: str) -> str:
    found = [os.path.join(d, n) for d, _, names in os.walk(folder) for n in names]
    return max(found, key=os.path.getsize)


def _truncate(run_dir: str) -> None:
    path = _largest_file(os.path.join(run_dir, checkpoints.PARAMS_DIR))
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)


def _rehash(run_dir: str, params) -> None:
    """Params replaced by ``params`` behind metadata.json's back (the hash stays the old one)."""
    metadata = checkpoints.read_metadata(run_dir)
    checkpoints.save_params(run_dir, params, metadata, overwrite=True)
    with open(os.path.join(run_dir, checkpoints.METADATA_FILE)) as f:
        stored = json.load(f)
    stored["params_hash"] = metadata["params_hash"]
    with open(os.path.join(run_dir, checkpoints.METADATA_FILE), "w") as f:
        json.dump(stored, f)


def test_study_refuses_a_corrupt_checkpoint_on_reuse(tmp_path):
    root, calls = str(tmp_path / "ckpt"), str(tmp_path / "calls.txt")
    ctx = fake_context(root)
    rdir = ctx.run_dir("fake")
    _, params = run_fake_stage(ctx, calls, value=1.0)
    record, again = run_fake_stage(ctx, calls, value=2.0)  # intact: reused, body not run
    assert record["reused"] and record["value"] == 1.0
    assert checkpoints.params_hash(again) == checkpoints.params_hash(params)
    changed = jax.tree.map(np.array, params)
    changed["head"]["bias"][0] += 1.0
    _rehash(rdir, changed)
    for damage in ("modified", "truncated"):
        if damage == "truncated":
            _truncate(rdir)
        with pytest.raises(CheckpointError) as e:
            run_fake_stage(ctx, calls, value=3.0)
        message = str(e.value)
        assert "\n" not in message and f"the finished checkpoint {rdir} cannot be reused" in message
        assert f"rm -r {rdir}" in message, message
    assert open(calls).read().split() == [str(os.getpid())]  # never run again, never used


# --------------------------------------------------------------------------------------------
# inspect --verify


def run_inspect(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "oneshui_jax.inspect", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=180)


def saved_run(root: str):
    params = vit.init_params(MODEL, jax.random.key(0))
    run = checkpoints.run_dir(root, "synthfaces", "vit_tiny_test", "pretrain", 2, 0)
    digest = checkpoints.save_params(run, params, {
        "config": {"dataset": "synthfaces", "model": {"name": "vit_tiny_test"},
                   "num_identities": 2, "seed": 0}, "splits": SPLITS})
    return run, params, digest


def test_inspect_verify(tmp_path, capsys):
    run, params, digest = saved_run(str(tmp_path))
    good = run_inspect("--verify", run)
    assert good.returncode == 0, good.stderr
    assert good.stdout.startswith(f"verified {run}:") and digest in good.stdout
    count = sum(np.size(x) for x in jax.tree.leaves(params))
    assert f"{count:,} parameters" in good.stdout
    # modified parameters under an unchanged metadata.json: the hash check fails
    changed = jax.tree.map(np.array, params)
    changed["blocks"][1]["mlp"]["fc1"]["kernel"][3, 5] += 0.5
    _rehash(run, changed)
    plain = run_inspect(run)  # without --verify only metadata is read
    assert plain.returncode == 0, plain.stderr
    bad = run_inspect("--verify", run)
    assert bad.returncode == 2 and bad.stdout == ""
    lines = bad.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), bad.stderr
    assert "is corrupt" in lines[0] and "content hash" in lines[0] and run in lines[0]
    # a truncated params file: unreadable or mismatching, one line either way (in process)
    _truncate(run)
    capsys.readouterr()
    assert inspect_cli.main(["--verify", run]) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and run in lines[0], captured.err
    assert captured.out == ""


# --------------------------------------------------------------------------------------------
# metrics.jsonl after a resume


class _Batches:
    """A deterministic iterator with the grain state API fit relies on."""

    def __init__(self):
        self.i = 0

    def __next__(self):
        rng = np.random.default_rng(self.i)
        self.i += 1
        return {"image": rng.uniform(-1, 1, (4, 32, 32, 3)).astype(np.float32),
                "label": rng.integers(0, 3, 4), "mask": np.ones(4, bool)}

    def get_state(self):
        return {"i": self.i}

    def set_state(self, state):
        self.i = state["i"]


class _Killed(Exception):
    pass


def test_metrics_log_holds_each_epoch_once_after_a_resume(tmp_path):
    """Killed after epoch 2 was logged but before it was saved: the resumed run logs epochs 2
    and 3 again; the log holds each epoch once, in order, with the resumed run's values."""
    run, log = str(tmp_path / "run"), str(tmp_path / "run" / "metrics.jsonl")
    os.makedirs(run)
    tcfg = train_lib.TrainConfig(task="classification", epochs=4, batch_size=4,
                                 compute_dtype="float32", warmup_epochs=0)
    params = vit.init_params(MODEL, jax.random.key(0))

    def validate_fn(p):
        return {"loss": 1.0, "metric": 50.0}

    class KillAtStep(checkpoints.TrainCheckpointer):
        def save(self, step, arrays, state, force=False):
            if step == 3:
                raise _Killed
            return super().save(step, arrays, state, force)

    with KillAtStep(run) as ckpt, pytest.raises(_Killed):
        train_lib.fit(MODEL, tcfg, params, _Batches(), 1, validate_fn, progress=False,
                      checkpointer=ckpt, metrics_log=log)
    with open(log) as f:
        assert [json.loads(line)["epoch"] for line in f] == [0, 1, 2]
    with open(log, "a") as f:
        f.write('{"epoch": 3, "tr')  # a half-written line of the killed process
    with checkpoints.TrainCheckpointer(run) as ckpt:
        result = train_lib.fit(MODEL, tcfg, params, _Batches(), 1, validate_fn,
                               progress=False, checkpointer=ckpt, metrics_log=log)
    assert result.resumed_from_epoch == 2
    with open(log) as f:
        records = [json.loads(line) for line in f]
    assert [r["epoch"] for r in records] == [0, 1, 2, 3]
    assert [r["train_loss"] for r in records] == [r["train_loss"] for r in result.history]


# --------------------------------------------------------------------------------------------
# Request outputs


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    """A pretrained vit_tiny_test run, a support_ascent method run (artifacts, no params) and a
    portrait: a request in about a second."""
    root = str(tmp_path_factory.mktemp("chain"))
    _, method, portrait = doubles.request_chain(root, SPLITS)
    return types.SimpleNamespace(root=root, method=method, portrait=portrait)


def _listing(root: str) -> dict[str, tuple]:
    found = {}
    for folder, _, names in os.walk(root):
        for name in names:
            stat = os.lstat(os.path.join(folder, name))
            found[os.path.relpath(os.path.join(folder, name), root)] = (stat.st_size,
                                                                        stat.st_mtime_ns)
    return found


@pytest.mark.slow
def test_two_requests_on_one_new_out_never_replace_each_other(chain, tmp_path):
    """Two ``python -m oneshui_jax.unlearn`` with the same new --out: one writes it, the other
    is refused naming --overwrite; the output is the writer's, nothing else is left."""
    out = str(tmp_path / "out")
    procs = [subprocess.Popen(
        [sys.executable, "-m", "oneshui_jax.unlearn", "--checkpoint", chain.method,
         "--portrait", chain.portrait, "--out", out, "--request_id", f"request-{i}"],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in (0, 1)]
    results = [(proc, *proc.communicate(timeout=300)) for proc in procs]
    codes = sorted(proc.returncode for proc, _, _ in results)
    assert codes == [0, 2], [err[-2000:] for _, _, err in results]
    (winner, w_out, _), = [r for r in results if r[0].returncode == 0]
    (_, l_out, l_err), = [r for r in results if r[0].returncode == 2]
    assert "wrote" in w_out and l_out == ""
    error = l_err.strip().splitlines()[-1]
    assert error.startswith("error: ") and "--overwrite" in error and out in error, l_err
    with open(os.path.join(out, "receipt.json")) as f:
        receipt = json.load(f)
    assert receipt["request_id"] == f"request-{procs.index(winner)}"
    assert sorted(os.listdir(tmp_path)) == ["out"]  # no temporary folder of the refused one


def test_out_is_refused_without_overwrite_and_nothing_is_written(chain, tmp_path, capsys):
    out = str(tmp_path / "out")
    args = ["--checkpoint", chain.method, "--portrait", chain.portrait, "--out", out]
    assert serve_cli.main([*args, "--request_id", "first"]) == 0
    before = _listing(str(tmp_path))
    capsys.readouterr()
    assert serve_cli.main([*args, "--request_id", "second"]) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), captured.err
    assert f"--out {out} already exists" in lines[0] and "--overwrite" in lines[0]
    assert _listing(str(tmp_path)) == before  # nothing written, nothing replaced
    assert serve_cli.main([*args, "--request_id", "third", "--overwrite"]) == 0
    with open(os.path.join(out, "receipt.json")) as f:
        assert json.load(f)["request_id"] == "third"
    assert sorted(os.listdir(tmp_path)) == ["out"]
