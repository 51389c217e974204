"""Checkpoints (orbax) and the inspect CLI: round trips, atomicity, corruption, compatibility."""

import json
import os
import re
import signal
import subprocess
import sys

import jax
import numpy as np
import optax
import pytest

from oneshui_jax import checkpoints
from oneshui_jax.checkpoints import train_state
from oneshui_jax.cli import inspect as inspect_cli
from oneshui_jax.errors import CheckpointError
from oneshui_jax.models import vit

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SPLITS = {"train": [1, 2, 3, 4, 5], "val": [6, 7], "test": [8, 9], "support": [40, 41],
          "forget": [1, 2], "retain": [3, 4, 5]}


@pytest.fixture(scope="module")
def params():
    cfg = vit.ViTConfig.preset("vit_tiny_test", num_classes=3)
    return vit.init_params(cfg, jax.random.key(0))


def make_metadata(dataset="synthfaces", model="vit_tiny_test", splits=None) -> dict:
    config = {"dataset": dataset, "model": {"name": model}, "num_identities": 2, "seed": 0,
              "train": {"lr": 1e-3, "crop_scale": (0.35, 1.0)}}
    return {"config": config, "splits": splits or SPLITS,
            "metrics": {"val": {"metric": np.float32(0.75), "loss": 0.5}}}


def saved_run(tmp_path, params, stage="pretrain", **metadata) -> str:
    run = checkpoints.run_dir(str(tmp_path), "synthfaces", "vit_tiny_test", stage, 2, 0)
    checkpoints.save_params(run, params, make_metadata(**metadata))
    return run


def with_one_change(params, value=0.5):
    """A copy of ``params`` with one element of ``blocks.1.mlp.fc1.kernel`` changed."""
    changed = jax.tree.map(np.array, params)
    changed["blocks"][1]["mlp"]["fc1"]["kernel"][3, 5] += value
    return changed


def assert_same_tree(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        assert x.dtype == y.dtype and x.shape == y.shape
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def run_cli(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "oneshui_jax.inspect", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=120)


# --------------------------------------------------------------------------------------------
# Parameters and metadata
# --------------------------------------------------------------------------------------------


def test_run_dir_layout():
    assert checkpoints.run_dir("ck", "mufac", "vit_base_patch16_224", "retrain", 10, 2) == \
        os.path.join("ck", "mufac", "vit_base_patch16_224", "retrain_10_2")


def test_save_load_round_trip_keeps_int_keys_and_dtypes(tmp_path, params):
    run = saved_run(tmp_path, params)
    loaded = checkpoints.load_params(run)
    assert sorted(loaded["blocks"]) == [0, 1]  # int keys come back as ints
    assert_same_tree(params, loaded)
    assert loaded["head"]["kernel"].dtype == np.float32
    with_template = checkpoints.load_params(run, template=jax.eval_shape(lambda: params))
    assert_same_tree(params, with_template)
    assert checkpoints.params_hash(loaded) == checkpoints.read_metadata(run)["params_hash"]


def test_load_with_mismatching_template_names_the_leaves(tmp_path, params):
    run = saved_run(tmp_path, params)
    template = {k: v for k, v in params.items() if k != "head"} | {"extra": params["head"]}
    with pytest.raises(CheckpointError, match=r"only in the checkpoint: head\.bias, head\.kernel"):
        checkpoints.load_params(run, template=template)


def test_params_hash_is_stable_and_sensitive(params):
    digest = checkpoints.params_hash(params)
    assert digest == checkpoints.params_hash(jax.tree.map(np.asarray, params))  # numpy == jax
    assert digest == checkpoints.params_hash(jax.tree.map(np.copy, params))
    assert digest != checkpoints.params_hash(with_one_change(params, 1e-6))
    as_f16 = jax.tree.map(lambda x: np.asarray(x, np.float16), params)
    assert digest != checkpoints.params_hash(as_f16)


def test_metadata_round_trip(tmp_path, params):
    run = saved_run(tmp_path, params)
    metadata = checkpoints.read_metadata(run)
    assert metadata["status"] == "done" and checkpoints.is_finished(run)
    assert metadata["config"]["model"] == {"name": "vit_tiny_test"}
    assert metadata["config"]["train"]["crop_scale"] == [0.35, 1.0]
    assert metadata["splits"] == SPLITS
    assert metadata["metrics"]["val"]["metric"] == 0.75  # numpy scalar written as a number
    assert metadata["splits_hash"] == checkpoints.splits_hash(SPLITS)
    assert metadata["params_hash"] == checkpoints.params_hash(params)
    assert {"python", "jax", "flax", "optax", "orbax-checkpoint", "numpy"} <= set(
        metadata["versions"])
    assert metadata["run_dir"] == os.path.abspath(run) and metadata["created"]
    assert not checkpoints.is_finished(str(tmp_path / "missing"))


def test_overwrite_needs_to_be_explicit(tmp_path, params):
    run = saved_run(tmp_path, params)
    changed = with_one_change(params)
    with pytest.raises(CheckpointError, match="overwrite=True"):
        checkpoints.save_params(run, changed, make_metadata())
    assert_same_tree(params, checkpoints.load_params(run))
    digest = checkpoints.save_params(run, changed, make_metadata(), overwrite=True)
    assert digest == checkpoints.params_hash(changed)
    assert_same_tree(changed, checkpoints.load_params(run))


def test_unfinished_run_is_not_loaded(tmp_path):
    run = str(tmp_path / "run")
    checkpoints.write_metadata(run, make_metadata(), status="training")
    assert not checkpoints.is_finished(run)
    with pytest.raises(CheckpointError, match="not finished"):
        checkpoints.load_params(run)


def test_check_compatible(tmp_path, params):
    metadata = checkpoints.read_metadata(saved_run(tmp_path, params))
    checkpoints.check_compatible(metadata, dataset="synthfaces", model="vit_tiny_test",
                                 splits=SPLITS, num_identities=2, seed=0)
    other = dict(SPLITS, forget=[1, 3])
    with pytest.raises(CheckpointError) as info:
        checkpoints.check_compatible(metadata, dataset="mufac", model="vit_small_demo",
                                     splits=other, num_identities=2, seed=1)
    message = str(info.value)
    assert "pretrain_2_0" in message
    assert "dataset 'synthfaces' but the request is 'mufac'" in message
    assert "model 'vit_tiny_test' but the request is 'vit_small_demo'" in message
    assert "seed 0 but the request is 1" in message
    assert "splits differ (forget: 2 vs 2 entries, 1 only in the checkpoint [2]" in message
    assert "retain" not in message


# --------------------------------------------------------------------------------------------
# Training state
# --------------------------------------------------------------------------------------------


def test_train_checkpointer_round_trip_with_optax_state(tmp_path, params):
    tx = optax.chain(optax.add_decayed_weights(1e-4), optax.trace(0.9))
    opt_state = tx.init(params)
    _, opt_state = tx.update(jax.tree.map(jax.numpy.ones_like, params), opt_state, params)
    state = {"epoch": 2, "best": {"metric": 0.5, "epoch": 1},
             "history": [{"loss": 1.0}, {"loss": 0.5}], "data_iterator": {"next_index": 7}}
    run = str(tmp_path / "run")
    with checkpoints.TrainCheckpointer(run) as ckpt:
        assert ckpt.latest_step() is None and ckpt.restore(params) is None
        for step in (1, 2, 3):
            arrays = {"params": params, "opt_state": opt_state, "best_params": params}
            ckpt.save(step, arrays, dict(state, step=step))
        assert ckpt.latest_step() == 3
    assert os.listdir(os.path.join(run, checkpoints.TRAIN_STATE_DIR)) == ["3"]  # max_to_keep 1
    with checkpoints.TrainCheckpointer(run) as again:
        assert again.latest_step() == 3
        restored, restored_state = again.restore(jax.eval_shape(lambda: arrays))
    assert_same_tree(arrays, restored)
    assert isinstance(restored["opt_state"][1], optax.TraceState)
    assert restored_state == dict(state, step=3)


def test_train_checkpointer_spaces_its_saves(tmp_path, params, monkeypatch):
    """every_s: a save within every_s seconds of the last one (or of opening) is skipped and
    writes nothing; force saves anyway; every_s = 0 saves every time."""
    clock = [100.0]
    monkeypatch.setattr(train_state.time, "monotonic", lambda: clock[0])
    arrays = {"params": params}
    with checkpoints.TrainCheckpointer(str(tmp_path / "spaced"), every_s=60.0) as ckpt:
        clock[0] = 130.0
        assert not ckpt.save(1, arrays, {"step": 1}) and ckpt.latest_step() is None
        clock[0] = 161.0
        assert ckpt.save(2, arrays, {"step": 2}) and ckpt.latest_step() == 2
        clock[0] = 200.0
        assert not ckpt.save(3, arrays, {"step": 3}) and ckpt.latest_step() == 2
        assert ckpt.save(4, arrays, {"step": 4}, force=True) and ckpt.latest_step() == 4
    with checkpoints.TrainCheckpointer(str(tmp_path / "every")) as ckpt:
        assert ckpt.save(1, arrays, {"step": 1}) and ckpt.save(2, arrays, {"step": 2})
        assert ckpt.latest_step() == 2


KILLED_SAVE = r"""
import sys, time
import numpy as np
from orbax.checkpoint._src.path import async_path
from oneshui_jax import checkpoints

ckpt = checkpoints.TrainCheckpointer(sys.argv[1])
ckpt.save(1, {"w": np.arange(64, dtype=np.float32), "b": {0: np.ones(3)}}, {"step": 1})

async def hang(src, dst):  # step 2 is written to its temporary folder, never renamed
    print("committing", flush=True)
    time.sleep(600)

async_path.rename = hang
ckpt.save(2, {"w": np.zeros(64, dtype=np.float32), "b": {0: np.zeros(3)}}, {"step": 2})
"""


def test_kill_during_save_keeps_previous_step(tmp_path):
    run = str(tmp_path / "run")
    child = subprocess.Popen([sys.executable, "-c", KILLED_SAVE, run], cwd=REPO,
                             stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "committing", "the save did not reach commit"
        os.kill(child.pid, signal.SIGKILL)
    finally:
        child.kill()
        child.wait(timeout=60)
    folder = os.path.join(run, checkpoints.TRAIN_STATE_DIR)
    assert any(".orbax-checkpoint-tmp" in name for name in os.listdir(folder))
    template = {"w": np.zeros(64, np.float32), "b": {0: np.zeros(3)}}
    with checkpoints.TrainCheckpointer(run) as ckpt:
        assert ckpt.latest_step() == 1
        arrays, state = ckpt.restore(template)
        np.testing.assert_array_equal(arrays["w"], np.arange(64, dtype=np.float32))
        np.testing.assert_array_equal(arrays["b"][0], np.ones(3))
        assert state == {"step": 1}
        ckpt.save(2, {"w": arrays["w"] + 1, "b": arrays["b"]}, {"step": 2})  # training resumes
        arrays, state = ckpt.restore(template)
    np.testing.assert_array_equal(arrays["w"], np.arange(1, 65, dtype=np.float32))
    assert state == {"step": 2}
    assert os.listdir(folder) == ["2"]  # step 1 rotated out, the stale temporary folder gone


# --------------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------------


def _largest_file(folder: str) -> str:
    files = [os.path.join(root, name) for root, _, names in os.walk(folder) for name in names]
    return max(files, key=os.path.getsize)


@pytest.mark.parametrize("damage", ["truncate", "delete", "flip"])
def test_corrupt_params_raise_one_clear_error(tmp_path, params, damage):
    run = saved_run(tmp_path, params)
    params_dir = os.path.join(os.path.abspath(run), checkpoints.PARAMS_DIR)
    target = _largest_file(params_dir)  # the array data
    with open(target, "rb") as f:
        data = bytearray(f.read())
    if damage == "delete":
        os.remove(target)
    else:
        if damage == "flip":
            data[len(data) // 2] ^= 0xFF
        with open(target, "wb") as f:
            f.write(data[: len(data) // 2] if damage == "truncate" else data)
    with pytest.raises(CheckpointError, match="corrupt") as info:
        checkpoints.load_params(run)
    assert params_dir in str(info.value)


def test_not_a_checkpoint(tmp_path):
    missing = str(tmp_path / "missing")
    with pytest.raises(CheckpointError, match=f"no checkpoint at {re.escape(missing)}"):
        checkpoints.load_params(missing)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(CheckpointError, match="is not a checkpoint.*it is empty"):
        checkpoints.read_metadata(str(empty))
    foreign = tmp_path / "foreign"
    (foreign / "params").mkdir(parents=True)
    (foreign / "notes.txt").write_text("hello")
    with pytest.raises(CheckpointError, match="holding metadata.json and params/.*holds notes.txt"):
        checkpoints.load_params(str(foreign))
    (foreign / "metadata.json").write_text(json.dumps({"status": "done", "params_hash": "x"}))
    with pytest.raises(CheckpointError, match=re.escape(str(foreign / "params"))):
        checkpoints.load_params(str(foreign))


# --------------------------------------------------------------------------------------------
# The inspect command line
# --------------------------------------------------------------------------------------------


def test_inspect_prints_tree_and_metadata(tmp_path, params):
    result = run_cli(saved_run(tmp_path, params))
    assert result.returncode == 0, result.stderr
    assert re.search(r"^blocks\.0\.attn\.qkv\.kernel +\(32, 96\) +float32 +3,072$",
                     result.stdout, re.MULTILINE)
    total = re.search(r"total: (\d+) tensors, ([\d,]+) parameters", result.stdout)
    assert int(total.group(1)) == len(jax.tree.leaves(params))
    assert int(total.group(2).replace(",", "")) == vit.count_params(params)
    assert "dataset synthfaces, model vit_tiny_test, N 2, seed 0" in result.stdout
    assert "forget 2" in result.stdout and "val.metric 0.75" in result.stdout


def test_inspect_diff_lists_the_changed_leaf_first(tmp_path, params):
    run_a = saved_run(tmp_path, params)
    run_b = checkpoints.run_dir(str(tmp_path), "synthfaces", "vit_tiny_test", "retrain", 2, 0)
    checkpoints.save_params(run_b, with_one_change(params), make_metadata())
    result = run_cli("--diff", run_a, run_b)
    assert result.returncode == 0, result.stderr
    rows = result.stdout.split("largest first:\n")[1].splitlines()
    assert rows[1].split()[0] == "blocks.1.mlp.fc1.kernel"
    assert float(rows[1].split()[1]) > 0 and float(rows[2].split()[1]) == 0
    assert "(1 of 32 tensors changed)" in result.stdout


def test_inspect_json_and_structure_mismatch(tmp_path, params, capsys):
    run = saved_run(tmp_path, params)
    assert inspect_cli.main([run, "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["totals"]["parameters"] == vit.count_params(params)
    assert summary["splits"]["forget"] == 2
    smaller = str(tmp_path / "smaller")
    checkpoints.save_params(smaller, {k: v for k, v in params.items() if k != "head"},
                            make_metadata())
    assert inspect_cli.main(["--diff", run, smaller]) == 2
    assert "only in " + run + ": head.bias, head.kernel" in capsys.readouterr().err


def test_inspect_bad_path_is_one_line(tmp_path):
    result = run_cli(str(tmp_path / "nowhere"))
    assert result.returncode == 2
    assert result.stderr.startswith("error: no checkpoint at ")
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr
