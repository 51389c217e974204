"""End to end: the study CLI on the small SynthFaces variant, and the training step."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl import flags

from oneshui_jax import main as main_lib
from oneshui_jax import optim
from oneshui_jax import train as train_lib
from oneshui_jax.errors import ConfigError, DataError
from oneshui_jax.models import vit

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "configs"))
import synthfaces as synthfaces_config  # noqa: E402


@pytest.fixture(scope="module")
def small_config(tmp_path_factory):
    config = synthfaces_config.get_config("N=5,size=small")
    config.data.tfds_dir = str(tmp_path_factory.mktemp("tfds"))
    config.workdir = str(tmp_path_factory.mktemp("work"))
    config.train.epochs = 2
    config.data.num_threads = 0
    config.progress = False
    return config


def test_study_runs_end_to_end(small_config):
    flags.FLAGS.mark_as_parsed()
    records = main_lib.run(small_config)
    assert [r["method"] for r in records] == ["pretrain", "retrain"]
    for r in records:
        for split in main_lib.EVAL_SPLITS:
            assert 0.0 < r[split]["metric"] <= 100.0 and np.isfinite(r[split]["loss"])
        assert len(r["history"]) == 2
    assert records[1]["tow"] == pytest.approx(100.0)  # the oracle against itself
    assert records[0]["tow"] < 100.0
    saved = json.load(open(os.path.join(small_config.workdir, "results.json")))
    assert saved["results"][0]["forget"] == records[0]["forget"]
    assert saved["splits"]["forget"] == 5
    table = main_lib.format_table(records, "mAP")
    assert "| pretrain |" in table and "| retrain |" in table


def test_unknown_stage_is_rejected_before_work(small_config):
    config = small_config.copy_and_resolve_references()
    config.stages = ("pretrain", "meta_unlearn_typo")
    with pytest.raises(ConfigError, match="meta_unlearn_typo"):
        main_lib.run(config)


def test_real_dataset_without_builder_is_a_clear_error(small_config):
    config = small_config.copy_and_resolve_references()
    config.dataset = "mufac"
    with pytest.raises(DataError, match="mufac"):
        main_lib.run(config)


def test_cli_rejects_config_typo_without_traceback():
    result = subprocess.run(
        [sys.executable, "-m", "oneshui_jax.main", "--config=configs/synthfaces.py",
         "--config.train.epoch=3"], cwd=REPO, capture_output=True, text=True)
    assert result.returncode != 0
    assert 'Did you mean "epochs"' in result.stderr and "Traceback" not in result.stderr


def test_train_step_compiles_once_and_learns():
    cfg = vit.ViTConfig.preset("vit_tiny_test", num_classes=3)
    tcfg = train_lib.TrainConfig(task="classification", compute_dtype="float32")
    tx = optim.make("adamw", 0.0)
    params = vit.init_params(cfg, jax.random.key(0))
    opt_state = tx.init(params)
    step = train_lib.make_train_step(cfg, tcfg, tx)
    rng = np.random.default_rng(0)
    batch = {"image": jnp.asarray(rng.uniform(-1, 1, (8, 32, 32, 3)), jnp.float32),
             "label": jnp.asarray(rng.integers(0, 3, 8)), "mask": jnp.ones(8, bool)}
    losses = []
    for lr in (1e-3, 2e-3, 3e-3, 3e-3, 3e-3, 3e-3):
        params, opt_state, out = step(params, opt_state, batch, jnp.float32(lr))
        losses.append(float(out["loss"]))
    assert step._cache_size() == 1  # a new learning rate does not retrace
    assert losses[-1] < losses[0]


def test_masked_examples_do_not_count():
    logits = jnp.array([[2.0, -1.0], [0.5, 0.5], [9.0, 9.0]])
    labels = jnp.array([[1, 0], [0, 1], [0, 0]])
    per = train_lib.per_example_loss("multilabel", logits, labels)
    mask = jnp.array([True, True, False])
    assert float(train_lib.masked_mean(per, mask)) == pytest.approx(float(per[:2].mean()))
