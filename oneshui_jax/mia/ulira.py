"""A per-person likelihood-ratio test against ensembles of oracles (U-LiRA for identities).

Population attacks average over people and overestimate protection; the per-example test of
Hayes et al. (2024, "Inexact unlearning needs more careful evaluations") asks, for each example,
whether an unlearned model is distinguishable from models retrained without it, using many
retrained models. For 1-SHUI the example is a person:

* **statistic** (:func:`confidence`, :func:`person_statistic`): for a model and a person, the
  mean over the person's images of the logit-scaled confidence of the true label,
  ``φ = log p − log(1 − p)``; multi-label: per attribute (``φ = ±logit``), averaged over
  attributes; classification: ``p = softmax(z)[y]``.
* **test** (:func:`test`): with K "unlearned" models (the method applied to K pretrained
  members) and K "retrained" members, each person's statistic is modelled by one Gaussian per
  group. Leave one pair out: for each ``k``, the Gaussians are fitted to the unlearned and the
  retrained models other than the ``k``-th of each, and both ``k``-th models are scored, for
  every person, by the log likelihood ratio ``log N(φ; μ_u, σ_u) − log N(φ; μ_r, σ_r)``.
  Unlearned models are the positives, retrained ones the negatives. Both fits always rest on
  K − 1 models, so when the groups do not differ the two scores are exchangeable and the AUC is
  50 in expectation (leaving out the scored model alone would fit its own group to K − 1 models
  and the other to K, which biases the AUC below 50 for small K).

Reported: the AUC over (person, model) pairs with a 95% interval by resampling people, the TPR
at 1% and 10% FPR, and the share of people the test tells apart at 5% FPR (the threshold is the
95th percentile of the retrained models' scores over every person; a person is told apart when
more than half of their unlearned models score above it), with a per-person table. Applied to
pretrain members instead of a method's models, the same test measures the attack's strength: a
test that cannot tell pretrain from retrain cannot vouch for any method.

Pure numpy; the study gives it the statistics of each member.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from scipy.special import logsumexp
from sklearn.metrics import roc_auc_score, roc_curve

MIN_MEMBERS = 3  # per group: leave-one-out leaves two to fit a Gaussian to
STD_FLOOR = 1e-3  # of a fitted Gaussian, in logit units (identical members)
TOLD_APART_FPR = 0.05
BOOTSTRAP = 1000


def confidence(logits: np.ndarray, labels: np.ndarray, task: str) -> np.ndarray:
    """``[n]`` logit-scaled confidence of the true label(s) of each image (module docstring)."""
    z = np.asarray(logits, np.float64)
    if task == "multilabel":
        sign = np.where(np.asarray(labels) > 0.5, 1.0, -1.0)
        return np.mean(sign * z, axis=-1)
    y = np.asarray(labels, np.int64)
    true = np.take_along_axis(z, y[:, None], axis=-1)[:, 0]
    others = z.copy()
    np.put_along_axis(others, y[:, None], -np.inf, axis=-1)
    return true - logsumexp(others, axis=-1)


def person_statistic(per_image: np.ndarray, identities: np.ndarray,
                     people: Sequence[int]) -> np.ndarray:
    """``[P]`` mean of ``per_image`` over each person's images, for ``people`` in order;
    ValueError naming a person without images."""
    per_image, identities = np.asarray(per_image), np.asarray(identities)
    out = np.empty(len(people))
    for i, person in enumerate(people):
        mine = identities == person
        if not mine.any():
            raise ValueError(f"person {person} has no image among the {len(identities)} given")
        out[i] = per_image[mine].mean()
    return out


def _log_normal(x: np.ndarray, mean: np.ndarray, std: np.ndarray) -> np.ndarray:
    return -0.5 * ((x - mean) / std) ** 2 - np.log(std)


def _leave_one_out(stats: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``[K, P]`` mean and std over the other K − 1 models, for each model."""
    k = stats.shape[0]
    total, squares = stats.sum(0), (stats ** 2).sum(0)
    mean = (total - stats) / (k - 1)
    var = ((squares - stats ** 2) - (k - 1) * mean ** 2) / (k - 2)
    return mean, np.maximum(np.sqrt(np.maximum(var, 0.0)), STD_FLOOR)


def scores(unlearned: np.ndarray, retrained: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``([K, P], [K, P])`` leave-one-pair-out log likelihood ratios of each unlearned and each
    retrained model, per person (module docstring; higher: more like the unlearned group)."""
    u, r = np.asarray(unlearned, np.float64), np.asarray(retrained, np.float64)
    if u.ndim != 2 or r.ndim != 2 or u.shape != r.shape:
        raise ValueError(f"expected [models, people] statistics of as many models of the same "
                         f"people in each group, got {u.shape} and {r.shape}")
    if u.shape[0] < MIN_MEMBERS:
        raise ValueError(f"the per-person test needs at least {MIN_MEMBERS} models per group "
                         f"(config.ensemble.size), got {u.shape[0]}")
    u_mean, u_std = _leave_one_out(u)  # [K, P]: the fits without the k-th model
    r_mean, r_std = _leave_one_out(r)

    def ratio(x):
        return _log_normal(x, u_mean, u_std) - _log_normal(x, r_mean, r_std)

    return ratio(u), ratio(r)


def _auc(pos: np.ndarray, neg: np.ndarray) -> float:
    y = np.r_[np.ones(pos.size), np.zeros(neg.size)]
    return float(roc_auc_score(y, np.r_[pos.ravel(), neg.ravel()]))


def test(unlearned: np.ndarray, retrained: np.ndarray, people: Sequence[int] | None = None,
         seed: int = 0) -> dict[str, Any]:
    """The per-person test (module docstring) of ``[K, P]`` statistics: ``auc`` (%, over
    (person, model) pairs), ``auc_interval`` (95%, people resampled ``BOOTSTRAP`` times from
    ``seed``), ``tpr_at_1pct`` / ``tpr_at_10pct`` (%), ``told_apart`` (% of people), and
    ``people``: per person ``id``, the mean score of each group, the share of unlearned models
    above the 5% FPR threshold and ``told_apart``."""
    held_u, held_r = scores(unlearned, retrained)
    n_people = held_u.shape[1]
    people = list(range(n_people)) if people is None else [int(p) for p in people]
    y = np.r_[np.ones(held_u.size), np.zeros(held_r.size)]
    fpr, tpr, _ = roc_curve(y, np.r_[held_u.ravel(), held_r.ravel()])
    rng = np.random.default_rng(seed)
    boot = []
    for _ in range(BOOTSTRAP):
        pick = rng.integers(0, n_people, n_people)
        boot.append(_auc(held_u[:, pick], held_r[:, pick]))
    threshold = float(np.quantile(held_r, 1.0 - TOLD_APART_FPR))
    above = (held_u > threshold).mean(0)
    rows = [{"id": person, "unlearned_score": float(held_u[:, i].mean()),
             "retrained_score": float(held_r[:, i].mean()), "above_threshold": float(above[i]),
             "told_apart": bool(above[i] > 0.5)} for i, person in enumerate(people)]
    return {"auc": 100.0 * _auc(held_u, held_r),
            "auc_interval": [100.0 * float(q) for q in np.quantile(boot, [0.025, 0.975])],
            "tpr_at_1pct": 100.0 * float(np.interp(0.01, fpr, tpr)),
            "tpr_at_10pct": 100.0 * float(np.interp(0.10, fpr, tpr)),
            "told_apart": 100.0 * float(np.mean([r["told_apart"] for r in rows])),
            "threshold": threshold, "members": [int(held_u.shape[0]), int(held_r.shape[0])],
            "people": rows}
