"""The oracle's spread (``retrain_2``): a second retrained model on the same split and data,
every other draw from ``seed + 1``; its ToW against retrain is the noise floor of ToW that the
report compares every method with."""

import os
import shutil

import pytest

from oneshui_jax import checkpoints, study
from oneshui_jax.errors import ConfigError
from oneshui_jax.study import plan, privacy


def test_retrain_2_needs_retrain(small_study):
    config = small_study.config.copy_and_resolve_references()
    config.stages = ("pretrain", "retrain_2")
    with pytest.raises(ConfigError, match="'retrain_2'.*but not 'retrain'"):
        study.validate_config(config)


def test_the_second_oracle_trains_on_the_same_data_with_another_seed(small_study, tmp_path):
    config = small_study.config.copy_and_resolve_references()
    shared = small_study.config.checkpoint_dir
    config.workdir, config.checkpoint_dir = str(tmp_path / "work"), str(tmp_path / "ckpt")
    for stage in ("pretrain", "retrain"):  # the shared study's models, copied (never written)
        source = small_study.run_dir(stage)
        shutil.copytree(source, source.replace(shared, config.checkpoint_dir))
    config.stages = ("pretrain", "retrain", "retrain_2")

    records = study.run(config)

    by = {r["method"]: r for r in records}
    second = by["retrain_2"]
    assert by["retrain"]["reused"] and not second.get("reused")
    assert (second["access"], second["seed"], second["training_seed"]) == (
        "oracle", config.seed, config.seed + 1)  # paired on the study's split
    assert second["splits_hash"] == by["retrain"]["splits_hash"]
    ctx = study.prepare(config)
    where = privacy.reference_context(ctx).run_dir("retrain")
    metadata = checkpoints.read_metadata(where)
    assert metadata["splits"] == ctx.splits.to_dict()  # the same identities and images
    assert metadata["config"]["seed"] == config.seed + 1  # another head, order, augmentation
    first = checkpoints.load_params(small_study.run_dir("retrain"))
    assert checkpoints.params_hash(checkpoints.load_params(where)) != checkpoints.params_hash(first)
    assert by["retrain"]["tow"] == 100.0 and second["tow"] < 100.0  # a floor below the oracle
    with open(os.path.join(config.workdir, "results.md"), encoding="utf-8") as f:
        text = f.read()
    assert f"scores ToW {second['tow']:.2f} against retrain" in text
    assert "| retrain_2 | oracle |" in text

    done, reason, plans = plan.check(config)  # the sweep's skip knows where it lives
    assert done, reason
    assert [(p.stage, p.run_dir, p.decision) for p in plans][-1] == ("retrain_2", where, "reuse")
    again = {r["method"]: r for r in study.run(config)}
    assert again["retrain_2"]["reused"] and again["retrain_2"]["tow"] == second["tow"]
