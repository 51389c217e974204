"""The per-person test in a study (``study/person_test.py``): ensembles of pretrain and retrain
stored as stages, member 0 equal to the study's own model, the test on the pretrain row, reuse."""

import jax
import numpy as np
import pytest
import small_study as small_study_config

from oneshui_jax import checkpoints, ensemble, study
from oneshui_jax.errors import ConfigError


def _config(synthfaces_tfds, root):
    """The shared small study's config, one epoch, pretrain and retrain only, in ``root``."""
    config = small_study_config.config(synthfaces_tfds, str(root), epochs=1)
    config.stages = ("pretrain", "retrain")
    config.model.name = "vit_tiny_test"  # the test's smallest ViT: the code path, quickly
    config.ensemble.size = 3
    return config


def test_an_ensemble_of_two_is_refused(synthfaces_tfds, tmp_path):
    config = _config(synthfaces_tfds, tmp_path)
    config.ensemble.size = 2
    with pytest.raises(ConfigError, match=r"config.ensemble.size must be 0 \(no ensembles\) or an "
                                          r"int >= 3"):
        study.validate_config(config)


@pytest.mark.slow
def test_the_study_runs_the_per_person_test_on_ensembles(synthfaces_tfds, tmp_path, monkeypatch):
    config = _config(synthfaces_tfds, tmp_path)
    records = study.run(config)

    test = {r["method"]: r for r in records}["pretrain"]["mia"]["ulira"]
    assert test["members"] == [3, 3] and len(test["people"]) == 5
    assert [p["id"] for p in test["people"]] == list(study.prepare(config).splits.forget)
    lo, hi = test["auc_interval"]
    assert 0.0 <= lo <= test["auc"] <= hi <= 100.0 and 0.0 <= test["told_apart"] <= 100.0
    ctx = study.prepare(config)
    run_dir = ctx.run_dir("pretrain_ensemble3")
    metadata = checkpoints.read_metadata(run_dir)
    assert metadata["record"]["training_seeds"] == [0, 1, 2]
    # Member 0 is the study's own pretrain (the same start, data order and augmentation) up to
    # float rounding, which the mapped matmuls order differently and AdamW carries along;
    # member 1, another seed, is another model.
    stacked = checkpoints.load_params(run_dir)
    alone = jax.tree.leaves(checkpoints.load_params(ctx.run_dir("pretrain")))

    def distance(k):
        return max(float(np.linalg.norm(np.asarray(a) - np.asarray(b)) / np.linalg.norm(b))
                   for a, b in zip(jax.tree.leaves(ensemble.member(stacked, k)), alone,
                                   strict=True))

    assert distance(0) < 2e-3 < 0.05 < distance(1)
    assert metadata["record"]["best_epochs"][0] == checkpoints.read_metadata(
        ctx.run_dir("pretrain"))["record"]["best_epoch"]
    with open(tmp_path / "work" / "results.md", encoding="utf-8") as f:
        assert "per-person LRT AUC" in f.read()

    def no_training(*args, **kwargs):
        raise AssertionError("a finished ensemble was trained again")

    monkeypatch.setattr(ensemble, "fit", no_training)
    again = {r["method"]: r for r in study.run(config)}["pretrain"]["mia"]["ulira"]
    assert again["auc"] == pytest.approx(test["auc"])
