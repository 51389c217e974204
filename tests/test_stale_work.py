"""Stale work is never reused: the study's fingerprint, through the command line.

A finished checkpoint whose training labels changed since is refused with the list of
differences, and nothing is reported from it. (A killed run restarted with other settings:
``test_study.test_killed_cli_run_resumes_only_with_the_same_settings``.)
"""

import csv
import os
import subprocess
import sys

import pytest
import real_fixtures

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "oneshui_jax.main", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=600)


@pytest.mark.slow
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
    assert second.returncode == 2, second.stderr[-2000:]
    error = second.stderr.strip().splitlines()[-1]
    assert error.startswith("error: checkpoint ") and "data.fingerprint" in error, error
    assert "delete it" in error and "Traceback" not in second.stderr
    assert not os.path.exists(tmp_path / "second" / "results.json")  # nothing stale reported
