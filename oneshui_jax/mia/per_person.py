"""Membership inference at the level of people (an extra to SPEC.md 5.5, not in the reference).

1-SHUI unlearns identities, so the question an auditor asks is "was this *person* in the training
set?", not "was this image?". Each person's per-image membership scores (higher = more likely a
member, e.g. the RMIA scores of ``rmia.score_grid``) are aggregated by their mean and by their
maximum, and the people are then attacked: members are the forget identities, non-members the
unseen (validation) identities. Reported per aggregation: ROC AUC (a fraction) and the TPR at an
FPR of 1% and 10%, ``np.interp(fpr_target, fpr, tpr)`` on ``sklearn.metrics.roc_curve`` (at an FPR
the curve reaches exactly, ``np.interp`` returns the highest TPR there).
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
from sklearn.metrics import roc_auc_score, roc_curve

AGGREGATIONS = {"mean": np.mean, "max": np.max}
TARGET_FPRS = {"tpr_at_fpr_1pct": 0.01, "tpr_at_fpr_10pct": 0.10}


def _group(ids: Iterable, name: str) -> list:
    group = list(dict.fromkeys(np.asarray(list(ids)).tolist()))  # unique, first-seen order
    if not group:
        raise ValueError(f"{name} is empty")
    return group


def attack(scores, identities, member_identities, nonmember_identities) -> dict:
    """Person-level attack from per-image ``scores`` and the ``identities`` of those images.

    Images whose identity is in neither group are left out (their count is
    ``n_images_ignored``). ValueError, naming the problem, when ``scores`` and ``identities``
    differ in length or are not 1-D, a group is empty, an identity is in both groups, a person
    of a group has no image, or a score is not finite.

    Returns ``{"mean": {...}, "max": {...}, "n_members", "n_nonmembers", "n_images_ignored"}``;
    each aggregation holds ``auc``, ``tpr_at_fpr_1pct``, ``tpr_at_fpr_10pct``, the ROC (``fpr``,
    ``tpr``) and the per-person ``member_scores`` / ``nonmember_scores`` (in group order).
    """
    scores = np.asarray(scores, dtype=np.float64)
    identities = np.asarray(identities)
    if scores.ndim != 1 or identities.ndim != 1:
        raise ValueError(f"scores and identities must be 1-D, got shapes {scores.shape} and "
                         f"{identities.shape}")
    if len(scores) != len(identities):
        raise ValueError(f"scores ({len(scores)}) and identities ({len(identities)}) differ in "
                         "length")
    if not np.all(np.isfinite(scores)):
        raise ValueError("scores contain NaN or infinite values")
    members = _group(member_identities, "member_identities")
    nonmembers = _group(nonmember_identities, "nonmember_identities")
    both = sorted(set(members) & set(nonmembers), key=str)
    if both:
        raise ValueError(f"identities in both groups: {both[:10]}"
                         + (f" and {len(both) - 10} more" if len(both) > 10 else ""))

    by_person: dict = {}
    ids = identities.tolist()
    for i, person in enumerate(ids):
        by_person.setdefault(person, []).append(i)
    missing = [p for p in members + nonmembers if p not in by_person]
    if missing:
        raise ValueError(f"identities without any image: {missing[:10]}"
                         + (f" and {len(missing) - 10} more" if len(missing) > 10 else ""))
    used = set(members) | set(nonmembers)
    labels = np.r_[np.ones(len(members)), np.zeros(len(nonmembers))]

    out = {"n_members": len(members), "n_nonmembers": len(nonmembers),
           "n_images_ignored": sum(1 for p in ids if p not in used)}
    for name, aggregate in AGGREGATIONS.items():
        person_scores = np.array([aggregate(scores[by_person[p]])
                                  for p in members + nonmembers])
        fpr, tpr, _ = roc_curve(labels, person_scores)
        out[name] = {"auc": float(roc_auc_score(labels, person_scores)),
                     **{k: float(np.interp(f, fpr, tpr)) for k, f in TARGET_FPRS.items()},
                     "fpr": fpr, "tpr": tpr,
                     "member_scores": person_scores[:len(members)],
                     "nonmember_scores": person_scores[len(members):]}
    return out
