"""Stale work is never reused or resumed: the study's fingerprint, through the command line.

Two cases a new user runs into: a run killed mid-training and restarted with other settings, and
a finished checkpoint whose training labels changed since. Both are refused with the list of
differences, and nothing is reported from the stale work.
"""

import csv
import json
import os
import subprocess
import sys

import pytest
import real_fixtures

from oneshui_jax import checkpoints, study

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "configs"))
import synthfaces as synthfaces_config  # noqa: E402


def main(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "oneshui_jax.main", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=600)


def synthfaces_args(root, **overrides) -> list[str]:
    values = {"data.tfds_dir": f"{root}/tfds", "workdir": f"{root}/work",
              "checkpoint_dir": f"{root}/ckpt", "train.epochs": 3, "stages": "('pretrain',)",
              "progress": False, "data.num_threads": 0, **overrides}
    return ["--config=configs/synthfaces.py:N=5,size=small",
            *(f"--config.{k}={v}" for k, v in values.items())]


class Interrupted(Exception):
    pass


def test_unfinished_run_with_other_settings_is_not_resumed(tmp_path, monkeypatch):
    root = str(tmp_path)
    config = synthfaces_config.get_config("N=5,size=small")
    config.data.tfds_dir, config.workdir = f"{root}/tfds", f"{root}/work"
    config.checkpoint_dir, config.stages = f"{root}/ckpt", ("pretrain",)
    config.train.epochs, config.progress, config.data.num_threads = 3, False, 0
    real_save = checkpoints.TrainCheckpointer.save

    def save_then_die(self, step, arrays, state):  # killed right after the first epoch's save
        real_save(self, step, arrays, state)
        raise Interrupted

    monkeypatch.setattr(checkpoints.TrainCheckpointer, "save", save_then_die)
    with pytest.raises(Interrupted):
        study.run(config)
    monkeypatch.setattr(checkpoints.TrainCheckpointer, "save", real_save)
    rdir = checkpoints.run_dir(config.checkpoint_dir, "synthfaces", "vit_small_demo",
                               "pretrain", 5, 0)
    assert checkpoints.read_metadata(rdir)["status"] == "training"

    for overrides, expected in (({"train.epochs": 5}, "train.epochs: 3 -> 5"),
                                ({"data.crop_scale": "(1.0, 1.0)"},
                                 "data.crop_scale: [0.35, 1.0] -> [1.0, 1.0]")):
        result = main(*synthfaces_args(root, **overrides))
        assert result.returncode == 1, result.stderr[-2000:]
        error = result.stderr.strip().splitlines()[-1]
        assert error.startswith("error: ") and expected in error, error
        assert "not resumed" in error and f"rm -r {rdir}" in error
        assert "Traceback" not in result.stderr
        assert checkpoints.read_metadata(rdir)["status"] == "training"
        assert not os.path.exists(f"{root}/work/results.json")
    # another SynthFaces variant or seed changes the split: test_study's
    # test_checkpoint_of_another_split_is_refused
    # the same settings resume and finish
    result = main(*synthfaces_args(root))
    assert result.returncode == 0, result.stderr[-2000:]
    assert "resuming after epoch 0" in result.stderr
    assert checkpoints.is_finished(rdir)
    epochs = [json.loads(line)["epoch"] for line in open(os.path.join(rdir, "metrics.jsonl"))]
    assert epochs == [0, 1, 2]


def test_finished_checkpoint_is_refused_after_the_labels_changed(shared_data, tmp_path):
    data = tmp_path / "data"
    real_fixtures.write_mufac_subset(str(data), shared_data, {"train": 80, "val": 30, "test": 30})
    args = ["--config=configs/mufac.py:N=2,profile=cpu", f"--config.data.data_dir={data}",
            f"--config.data.tfds_dir={tmp_path}/tfds", f"--config.checkpoint_dir={tmp_path}/ckpt",
            "--config.model.name=vit_tiny_test", "--config.train.epochs=1",
            "--config.stages=('pretrain',)", "--config.progress=False",
            "--config.data.num_threads=0"]
    first = main(*args, f"--config.workdir={tmp_path}/first")
    assert first.returncode == 0, first.stderr[-2000:]
    # relabel one training image (age class a -> h): a new build, a new data fingerprint
    path = data / "mufac" / "custom_train_dataset.csv"
    rows = list(csv.reader(open(path, newline="")))
    rows[1][2] = "h" if rows[1][2] != "h" else "a"
    with open(path, "w", newline="") as f:
        csv.writer(f).writerows(rows)
    second = main(*args, f"--config.workdir={tmp_path}/second")
    assert second.returncode == 1, second.stderr[-2000:]
    error = second.stderr.strip().splitlines()[-1]
    assert error.startswith("error: checkpoint ") and "data.fingerprint" in error, error
    assert "delete it" in error and "Traceback" not in second.stderr
    assert not os.path.exists(tmp_path / "second" / "results.json")  # nothing stale reported
