"""Data parallelism and the multi-host path (``oneshui_jax/sharding.py``, issue "scale out").

* In this process (one CPU device): the settings' checks, the distributed runtime's arguments
  (flags or SLURM), and the input pipeline's per-process rows, which must put together the
  one-process batches exactly.
* ``tests/multidevice_check.py`` in a process with 8 CPU devices: a small SynthFaces pretrain
  and a meta-training epoch on ``config.mesh.data=8`` equal the one-device run within float
  tolerance, and the steps really receive batches split over the 8 devices and replicated
  parameters (also after a reuse restores them).
* ``launch/local_multiprocess.sh 2``: two processes on loopback train the same model as one
  process, and every file outside orbax's collective checkpoints is written by one process only
  (a ``sitecustomize`` records each process's writes).
"""

import dataclasses
import json
import os
import re
import signal
import socket
import subprocess
import sys
import textwrap
import time

import jax
import numpy as np
import pytest
import suite_settings

from oneshui_jax import checkpoints, sharding
from oneshui_jax.data import pipeline
from oneshui_jax.errors import ConfigError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_STUDY = ["--config=configs/synthfaces.py:N=5,size=small", "--config.stages=('pretrain',)",
              "--config.model.name=vit_tiny_test", "--config.train.epochs=2",
              "--config.train.compute_dtype=float32", "--config.mia.loss_rf=False",
              "--config.mia.rmia=False",
              "--config.progress=False", "--config.data.num_threads=0"]


# ---------------------------------------------------------------------------------------------
# Settings


def test_distributed_settings_come_from_flags_or_slurm():
    assert sharding.distributed_settings("h:1", 2, 1, environ={}) == {
        "coordinator_address": "h:1", "num_processes": 2, "process_id": 1}
    slurm = {"SLURM_JOB_ID": "7", "SLURM_NTASKS": "2", "SLURM_PROCID": "0"}
    assert sharding.distributed_settings(None, None, None, environ=slurm) == {}
    with pytest.raises(ConfigError, match="missing --num_processes, --process_id"):
        sharding.distributed_settings("h:1", None, None, environ=slurm)
    with pytest.raises(ConfigError, match="found no cluster"):
        sharding.distributed_settings(None, None, None, environ={})
    with pytest.raises(ConfigError, match=r"--process_id=2 must be in \[0, --num_processes=2\)"):
        sharding.distributed_settings("h:1", 2, 2, environ={})


def test_mesh_settings_are_checked():
    assert sharding.mesh_size_for(-1) == jax.device_count()
    with pytest.raises(ConfigError, match="config.mesh.data must be -1"):
        sharding.mesh_size_for(0)
    with pytest.raises(ConfigError, match="more devices than there are"):
        sharding.mesh_size_for(jax.device_count() + 1)
    assert sharding.setup(1) is None and sharding.size() == 1
    batch = {"image": np.zeros((3, 2))}
    assert sharding.shard_batch(batch) is batch  # one device: nothing is placed
    assert sharding.replicate(batch) is batch


def test_batch_size_must_split_over_the_mesh(monkeypatch):
    monkeypatch.setattr(sharding, "size", lambda: 8)
    sharding.check_batch_size(16, "config.train.batch_size")
    with pytest.raises(ConfigError, match=r"config.train.batch_size=12 .* multiple of 8"):
        sharding.check_batch_size(12, "config.train.batch_size")


def test_study_rejects_a_bad_mesh_before_reading_data(tmp_path):
    sys.path.insert(0, os.path.join(REPO, "configs"))
    import synthfaces

    from oneshui_jax import study

    config = synthfaces.get_config("N=5,size=small")
    config.mesh.data = 0
    with pytest.raises(ConfigError, match="config.mesh.data"):
        study.validate_config(config)


# ---------------------------------------------------------------------------------------------
# Each process's rows


def _source(n):
    return [{"image": np.full((8, 8, 3), i, np.uint8), "label": np.int32(i % 3),
             "identity": i // 2} for i in range(n)]


@pytest.mark.parametrize("kind", ["train", "eval"])
@pytest.mark.parametrize("processes", [2, 4])
def test_process_rows_put_together_the_global_batches(kind, processes):
    source, indices = _source(22), np.arange(22)
    cfg = pipeline.PipelineConfig(image_size=8, batch_size=8, seed=3)

    def make(c):
        if kind == "train":
            return pipeline.train_dataset(source, indices, c, num_epochs=2)
        return pipeline.eval_dataset(source, indices, c)

    whole = make(cfg)
    parts = [make(dataclasses.replace(cfg, shard_by_process=True, process=(p, processes)))
             for p in range(processes)]
    assert all(len(p) == len(whole) for p in parts)
    for k in range(len(whole)):
        for key in ("image", "label", "index", "mask"):  # the augmented images included
            joined = np.concatenate([p[k][key] for p in parts])
            np.testing.assert_array_equal(joined, whole[k][key], err_msg=f"batch {k} {key}")
        assert len(parts[0][k]["mask"]) == 8 // processes


def test_process_rows_need_a_batch_that_splits():
    cfg = pipeline.PipelineConfig(image_size=8, batch_size=6, shard_by_process=True,
                                  process=(0, 4))
    with pytest.raises(ValueError, match="a batch of 6 does not split over 4 processes"):
        pipeline.eval_dataset(_source(10), np.arange(10), cfg)


# ---------------------------------------------------------------------------------------------
# 8 CPU devices


_env = suite_settings.subprocess_env


@pytest.mark.slow
def test_eight_devices_train_and_meta_train_like_one(synthfaces_tfds, tmp_path):
    env = _env(("--xla_force_host_platform_device_count=8",))
    out = subprocess.run([sys.executable, os.path.join(REPO, "tests", "multidevice_check.py"),
                          synthfaces_tfds, str(tmp_path)], env=env, cwd=REPO,
                         capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["devices"] == 8 and result["mesh"] == 8
    seen = result["seen"]
    # the batch is split over the 8 devices, the parameters replicated on them
    assert seen["train_batch"] == {"devices": 8, "spec": ["data", None, None, None],
                                   "replicated": False}
    assert seen["train_params"]["devices"] == 8 and seen["train_params"]["replicated"]
    assert seen["reused_params"]["devices"] == 8 and seen["reused_params"]["replicated"]
    assert seen["forget_batch"]["spec"][:2] == [None, "data"]  # [K, B, ...] along B
    assert seen["forget_batch"]["devices"] == 8
    assert result["seen_one"]["train_batch"]["devices"] == 0  # one device: host arrays
    # the same training up to float reassociation (float32 compute)
    assert result["params_max_diff"] < 1e-3 * max(1.0, result["params_max_abs"])
    assert result["phi_max_diff"] < 1e-4
    for one, many in (result["val_metric"], result["test_metric"]):
        assert abs(one - many) < 0.05


# ---------------------------------------------------------------------------------------------
# 2 processes on loopback

JOURNAL = textwrap.dedent("""\
    # Records every file this process writes (test_sharding.py): one line per path.
    import builtins, os

    _journal = os.path.join(os.environ["ONESHUI_JOURNAL"], f"writes_{os.getpid()}.txt")
    _open, _replace = builtins.open, os.replace

    def _record(path):
        try:
            path = os.path.abspath(os.fspath(path))
        except TypeError:
            return
        if path.startswith(os.environ["ONESHUI_JOURNAL_ROOT"]):
            with _open(_journal, "a") as f:
                f.write(path + "\\n")

    def open(file, mode="r", *args, **kwargs):
        if any(m in mode for m in "wax+") and not isinstance(file, int):
            _record(file)
        return _open(file, mode, *args, **kwargs)

    def replace(src, dst, *args, **kwargs):
        _record(dst)
        return _replace(src, dst, *args, **kwargs)

    builtins.open, os.replace = open, replace
""")


def _run_dir(root):
    return os.path.join(root, "ckpt", "synthfaces_small", "vit_tiny_test", "pretrain_5_0")


def _study(root):
    return TINY_STUDY + [f"--config.checkpoint_dir={root}/ckpt", f"--config.workdir={root}/work"]


@pytest.mark.slow
def test_two_processes_train_like_one_and_write_each_file_once(synthfaces_tfds, tmp_path):
    hooks, journal = tmp_path / "hooks", tmp_path / "journal"
    hooks.mkdir()
    journal.mkdir()
    (hooks / "sitecustomize.py").write_text(JOURNAL)
    many, one = str(tmp_path / "many"), str(tmp_path / "one")
    data = f"--config.data.tfds_dir={synthfaces_tfds}"
    env = _env(PYTHONPATH=str(hooks), ONESHUI_JOURNAL=str(journal),
               ONESHUI_JOURNAL_ROOT=many, ONESHUI_LOG_DIR=str(tmp_path / "logs"),
               PYTHON=sys.executable)
    out = subprocess.run(["bash", os.path.join(REPO, "launch", "local_multiprocess.sh"), "2",
                          *_study(many), data], env=env, cwd=REPO, capture_output=True,
                         text=True, timeout=900)
    other = (tmp_path / "logs" / "process_1.log").read_text()
    assert out.returncode == 0, out.stderr[-3000:] + other[-2000:]
    assert out.stdout.count("results: ") == 1 and "results: " not in other  # one speaker
    assert "process 1 of 2" in other
    single = subprocess.run([sys.executable, "-m", "oneshui_jax.main", *_study(one), data],
                            env=_env(), cwd=REPO, capture_output=True, text=True, timeout=600)
    assert single.returncode == 0, single.stderr[-3000:]

    a = checkpoints.load_params(_run_dir(one))
    b = checkpoints.load_params(_run_dir(many))
    diff = max(float(np.max(np.abs(np.asarray(x) - np.asarray(y))))
               for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True))
    assert diff < 1e-5
    with open(os.path.join(_run_dir(many), "metrics.jsonl")) as f:
        assert [json.loads(line)["epoch"] for line in f] == [0, 1]

    # every file outside orbax's collective saves is written by exactly one process
    writers: dict[str, set[str]] = {}
    logs = sorted(os.listdir(journal))
    assert len(logs) >= 2, logs  # both processes wrote something (orbax, at least)
    for name in logs:
        for path in (journal / name).read_text().split():
            writers.setdefault(path, set()).add(name)
    own = {p: w for p, w in writers.items()
           if f"{os.sep}params{os.sep}" not in p and f"{os.sep}train_state{os.sep}" not in p}
    assert any(p.endswith("metadata.json") for p in own)
    assert any(p.endswith("results.json") for p in own)
    twice = {p: sorted(w) for p, w in own.items() if len(w) > 1}
    assert not twice, twice


@pytest.mark.slow
def test_a_process_stopped_mid_training_brings_the_other_down_in_one_line(synthfaces_tfds,
                                                                         tmp_path):
    """SIGTERM to process 1 of 2 while they train: it prints its interrupt line and exits 143
    (JAX's preemption service, which caught SIGTERM and let the run go on, is off); process 0's
    next collective fails and it prints one error line and exits 2 within seconds, instead of
    waiting for the heartbeat timeout and aborting."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    root = tmp_path / "run"
    args = [a for a in _study(root) if not a.startswith("--config.train.epochs")]
    args += ["--config.train.epochs=500", f"--config.data.tfds_dir={synthfaces_tfds}"]
    processes = [subprocess.Popen(
        [sys.executable, "-m", "oneshui_jax.main", "--distributed",
         f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2", f"--process_id={i}",
         *args], env=_env(), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True) for i in range(2)]
    try:
        deadline = time.monotonic() + 240
        metrics = os.path.join(_run_dir(root), "metrics.jsonl")
        while not os.path.exists(metrics) and time.monotonic() < deadline:  # an epoch done
            assert all(p.poll() is None for p in processes), [p.communicate() for p in processes]
            time.sleep(0.1)
        processes[1].send_signal(signal.SIGTERM)
        sent = time.monotonic()
        out0, err0 = processes[0].communicate(timeout=60)
        stopped_after = time.monotonic() - sent
        out1, err1 = processes[1].communicate(timeout=60)
    finally:
        for p in processes:
            if p.poll() is None:
                p.kill()
                p.communicate()
    assert processes[1].returncode == 143, err1[-2000:]
    assert err1.splitlines()[-1].startswith("interrupted (SIGTERM) in stage pretrain; "), err1
    assert processes[0].returncode == 2, err0[-2000:]
    assert "Traceback" not in err0 and "Fatal" not in err0, err0[-2000:]
    last = err0.splitlines()[-1]
    assert re.match(r"error: process 0 of 2: a computation failed, most likely because another "
                    r"process of this run stopped \(see its log\): .+ \(in stage pretrain\); "
                    r"the finished stages and the last save of an unfinished one are kept "
                    rf"under {re.escape(str(root / 'ckpt'))}; once every process can run, start "
                    r"them all again with the same commands: python -m oneshui_jax.main ",
                    last), last
    assert stopped_after < sharding.HEARTBEAT_TIMEOUT_S, stopped_after  # not the heartbeat's
