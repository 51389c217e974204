"""Ensembles trained in one compiled program (``oneshui_jax/ensemble.py``): each member equals
the model ``train.fit`` trains alone from the same initial parameters on the same batches, and
the mapped step compiles once."""

import jax
import numpy as np
import pytest

from oneshui_jax import ensemble
from oneshui_jax import train as train_lib
from oneshui_jax.models import vit

CFG = vit.ViTConfig.preset("vit_tiny_test", num_classes=3)
TRAIN = train_lib.TrainConfig(task="multilabel", epochs=2, batch_size=4, lr=0.05,
                              warmup_epochs=1, compute_dtype="float32")
STEPS = 3


class Batches:
    """The batches of one training seed: its own images, labels and order (a stand-in for the
    study's grain iterator of that seed)."""

    def __init__(self, seed: int):
        self.rng = np.random.default_rng(seed)

    def __next__(self):
        return {"image": self.rng.uniform(-1, 1, (4, 32, 32, 3)).astype(np.float32),
                "label": (self.rng.random((4, 3)) > 0.5).astype(np.float32),
                "mask": np.array([True, True, True, False])}


def _validate(params):
    """A validation score that moves with the parameters (the head's mean), as a real one."""
    return {"loss": 0.0, "metric": float(50.0 + np.mean(np.asarray(params["head"]["kernel"])))}


def test_members_equal_models_trained_alone_and_the_step_compiles_once():
    seeds = (3, 4, 5)
    inits = [vit.init_params(CFG, jax.random.key(s)) for s in seeds]
    ensemble.ensemble_step.cache_clear()
    result = ensemble.fit(CFG, TRAIN, inits, [Batches(s) for s in seeds], STEPS, _validate)
    assert ensemble.ensemble_step.cache_info().misses == 1  # one mapped step for the members
    for k, s in enumerate(seeds):
        alone = train_lib.fit(CFG, TRAIN, inits[k], Batches(s), STEPS, _validate,
                              progress=False)
        assert result.best_epochs[k] == alone.best_epoch
        got = ensemble.member(result.params, k)
        for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(alone.params), strict=True):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
        assert [h["train_loss"] for h in result.histories[k]] == pytest.approx(
            [h["train_loss"] for h in alone.history], rel=1e-5)
    # the members differ: each had its own start and its own batches
    heads = [np.asarray(ensemble.member(result.params, k)["head"]["kernel"]) for k in range(3)]
    assert not np.allclose(heads[0], heads[1])
    assert result.images_per_s > 0


def test_an_ensemble_needs_one_iterator_per_member():
    init = vit.init_params(CFG, jax.random.key(0))
    with pytest.raises(ValueError, match="one iterator per member: 2 members, 1 iterators"):
        ensemble.fit(CFG, TRAIN, [init, init], [Batches(0)], STEPS, _validate)
