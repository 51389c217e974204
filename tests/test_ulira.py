"""The per-person likelihood-ratio test (``mia/ulira.py``): the statistic against closed forms,
the leave-one-out fits against a naive loop, and planted cases: models that saw a person are
told apart from models that did not; two groups of retrained models are not."""

import numpy as np
import pytest
from scipy.stats import norm

from oneshui_jax.mia import ulira


def test_the_statistic_is_the_logit_of_the_true_labels_probability():
    rng = np.random.default_rng(0)
    z = rng.normal(size=(6, 4))
    y = rng.integers(0, 2, size=(6, 4))
    p = np.where(y == 1, 1 / (1 + np.exp(-z)), 1 - 1 / (1 + np.exp(-z)))
    np.testing.assert_allclose(ulira.confidence(z, y, "multilabel"),
                               np.log(p / (1 - p)).mean(1), rtol=1e-10)
    classes = rng.integers(0, 4, size=6)
    soft = np.exp(z) / np.exp(z).sum(1, keepdims=True)
    p = soft[np.arange(6), classes]
    np.testing.assert_allclose(ulira.confidence(z, classes, "classification"),
                               np.log(p / (1 - p)), rtol=1e-10)
    ids = np.array([3, 3, 5, 7, 7, 7])
    got = ulira.person_statistic(np.arange(6.0), ids, [7, 3])
    np.testing.assert_allclose(got, [4.0, 0.5])
    with pytest.raises(ValueError, match="person 9 has no image"):
        ulira.person_statistic(np.arange(6.0), ids, [9])


def test_leave_one_pair_out_scores_equal_a_naive_loop():
    rng = np.random.default_rng(1)
    u, r = rng.normal(1, 0.5, (5, 3)), rng.normal(0, 0.7, (5, 3))
    held_u, held_r = ulira.scores(u, r)
    for k in range(5):
        ou, orr = np.delete(u, k, 0), np.delete(r, k, 0)
        for x, got in ((u[k], held_u[k]), (r[k], held_r[k])):
            expected = (norm.logpdf(x, ou.mean(0), ou.std(0, ddof=1))
                        - norm.logpdf(x, orr.mean(0), orr.std(0, ddof=1)))
            np.testing.assert_allclose(got, expected, rtol=1e-9)


def test_with_three_models_per_group_the_null_is_centred_at_50():
    """The smallest ensembles: over many draws of two groups of three models from one
    distribution, the AUC averages 50 (leaving out the scored model alone would fit its group to
    two models and the other to three, and average well below 50)."""
    rng = np.random.default_rng(3)
    aucs = [ulira._auc(*ulira.scores(_members(rng, 3, 10, 0.0), _members(rng, 3, 10, 0.0)))
            for _ in range(300)]
    assert abs(100 * np.mean(aucs) - 50) < 1.5


def _members(rng, k, people, shift):
    """``[k, people]``: each person's own level, plus ``shift``, plus member noise."""
    level = np.linspace(-2, 2, people)
    return level + shift + rng.normal(0, 0.3, (k, people))


def test_models_that_saw_the_person_are_told_apart_and_two_oracle_groups_are_not():
    rng = np.random.default_rng(2)
    seen = _members(rng, 8, 40, 1.0)  # trained with the person: more confident
    oracle_a, oracle_b = _members(rng, 8, 40, 0.0), _members(rng, 8, 40, 0.0)
    apart = ulira.test(seen, oracle_a, people=range(100, 140))
    assert apart["auc"] > 95 and apart["auc_interval"][0] > 90
    assert apart["told_apart"] > 80 and apart["tpr_at_10pct"] > apart["tpr_at_1pct"] > 0
    assert [p["id"] for p in apart["people"]][:2] == [100, 101]
    same = ulira.test(oracle_b, oracle_a)
    lo, hi = same["auc_interval"]
    assert lo < 50 < hi and abs(same["auc"] - 50) < 10
    assert same["told_apart"] < 20


def test_too_few_members_or_other_people_are_one_error():
    with pytest.raises(ValueError, match="at least 3 models per group"):
        ulira.scores(np.zeros((2, 4)), np.zeros((2, 4)))
    with pytest.raises(ValueError, match="of the same people in each group"):
        ulira.scores(np.zeros((4, 4)), np.zeros((4, 3)))
    with pytest.raises(ValueError, match="as many models"):
        ulira.scores(np.zeros((4, 4)), np.zeros((5, 4)))
    flat = ulira.test(np.zeros((3, 2)), np.zeros((3, 2)))  # identical members: no NaN
    assert flat["auc"] == pytest.approx(50.0)
