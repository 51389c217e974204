"""Loss-threshold membership attack printed with every evaluation (SPEC.md 5.4).

The reference (``metrics.py:compute_basic_mia``) trains a random forest on 1-D per-sample losses:
retain losses (label 1, member) then validation losses (label 0, non-member). It tests it on forget
losses (label 1) then test losses (label 0). The grid is ``n_estimators`` in (20, 50, 100) (outer
loop) times ``criterion`` in ("gini", "entropy") (inner loop), with ``random_state=0``. For each
configuration:

* ``auc = roc_auc_score(test labels, predict_proba(test)[:, 1]) * 100``;
* ``acc = (1 - mean(predict(forget losses))) * 100``, the percentage of forget samples the forest
  calls non-members.

The configuration with the highest ``acc`` is reported (strict ``>``, so the first of equal values
wins, and the search starts from 0). When every ``acc`` is 0, no configuration is chosen and the
reported AUC is 0, as in the reference.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from sklearn.ensemble import RandomForestClassifier
from sklearn.metrics import roc_auc_score, roc_curve

N_ESTIMATORS = (20, 50, 100)  # outer loop of the reference's grid
CRITERIA = ("gini", "entropy")  # inner loop
RANDOM_STATE = 0


def _column(losses: Sequence[float] | np.ndarray, name: str) -> np.ndarray:
    """1-D losses as an [n, 1] feature matrix; ValueError when empty or not 1-D."""
    x = np.asarray(losses, dtype=np.float64)
    if x.ndim != 1:
        raise ValueError(f"{name} must be 1-D per-sample losses, got shape {x.shape}")
    if x.size == 0:
        raise ValueError(f"{name} is empty")
    return x[:, None]


def attack(retain_losses, val_losses, forget_losses, test_losses, *, n_jobs: int = 2) -> dict:
    """The loss-based random-forest MIA of SPEC.md 5.4 (``compute_basic_mia``).

    Returns ``{"auc", "acc", "n_estimators", "criterion", "fpr", "tpr", "grid"}``:

    * ``auc`` and ``acc`` in percent, of the chosen configuration (``auc`` is 0 when none is
      chosen, i.e. when every ``acc`` is 0);
    * ``n_estimators`` / ``criterion`` of the chosen configuration, ``None`` when none is chosen;
    * ``fpr`` / ``tpr``: the chosen configuration's ROC points (``sklearn.metrics.roc_curve`` on the
      forget-vs-test task) as lists, for plotting; ``None`` when none is chosen;
    * ``grid``: one ``{"n_estimators", "criterion", "auc", "acc"}`` per configuration, in the
      reference's order.

    ``n_jobs`` only spreads tree fitting over processes; with the fixed ``random_state`` the result
    does not depend on it (the reference used 8).
    """
    x_retain = _column(retain_losses, "retain_losses")
    x_val = _column(val_losses, "val_losses")
    x_forget = _column(forget_losses, "forget_losses")
    x_unseen = _column(test_losses, "test_losses")
    x_train = np.concatenate([x_retain, x_val])  # members first, as the reference
    y_train = np.r_[np.ones(len(x_retain)), np.zeros(len(x_val))]
    x_test = np.concatenate([x_forget, x_unseen])
    y_test = np.r_[np.ones(len(x_forget)), np.zeros(len(x_unseen))]

    grid, best, best_acc, best_auc = [], None, 0.0, 0.0
    for n_estimators in N_ESTIMATORS:
        for criterion in CRITERIA:
            forest = RandomForestClassifier(n_estimators=n_estimators, criterion=criterion,
                                            n_jobs=n_jobs, random_state=RANDOM_STATE)
            forest.fit(x_train, y_train)
            proba = forest.predict_proba(x_test)[:, 1]
            auc = float(roc_auc_score(y_test, proba)) * 100
            acc = float(1.0 - np.mean(forest.predict(x_forget))) * 100
            grid.append({"n_estimators": n_estimators, "criterion": criterion,
                         "auc": auc, "acc": acc})
            if acc > best_acc:  # strict: the first of equal accuracies wins
                best_acc, best_auc = acc, auc
                fpr, tpr, _ = roc_curve(y_test, proba)
                best = {"n_estimators": n_estimators, "criterion": criterion,
                        "fpr": fpr.tolist(), "tpr": tpr.tolist()}
    if best is None:
        best = {"n_estimators": None, "criterion": None, "fpr": None, "tpr": None}
    return {"auc": best_auc, "acc": best_acc, **best, "grid": grid}
