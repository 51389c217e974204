"""Task metrics of the reference (SPEC.md 5.1, 5.3).

* Multi-label tasks (CelebA, CelebA-HQ, SynthFaces): macro mean average precision over labels on
  sigmoid scores, as ``torchmetrics.functional.average_precision(task="multilabel")`` in
  torchmetrics 1.3.0: per label, AP = sum_n (R_n - R_{n-1}) P_n over the distinct-score
  precision-recall curve (the same as scikit-learn's ``average_precision_score``); a label
  without any positive gives NaN and is left out of the mean.
* Classification (MUFAC): top-1 accuracy.
Both in percent. ToW compares a model with the retrained one on retain / forget / test.
"""

from __future__ import annotations

import numpy as np

EVAL_SPLITS = ("retain", "forget", "test", "val")  # the identity splits every model is scored on
TABLE_SPLITS = ("retain", "forget", "test")  # the results table's metric columns and ToW's splits


def average_precision(scores: np.ndarray, targets: np.ndarray) -> float:
    """AP of one label; NaN when ``targets`` has no positive."""
    scores = np.asarray(scores, np.float64)
    targets = np.asarray(targets).astype(bool)
    num_pos = int(targets.sum())
    if num_pos == 0:
        return float("nan")
    order = np.argsort(-scores, kind="stable")
    s, t = scores[order], targets[order]
    last_of_run = np.r_[np.flatnonzero(np.diff(s)), len(s) - 1]
    tps = np.cumsum(t)[last_of_run]
    fps = (last_of_run + 1) - tps
    precision = tps / (tps + fps)
    recall = tps / num_pos
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def mean_average_precision(logits: np.ndarray, targets: np.ndarray) -> float:
    """Macro mAP x 100 over labels on ``sigmoid(logits)``; labels without positives are skipped."""
    logits = np.asarray(logits, np.float64)
    scores = 1.0 / (1.0 + np.exp(-logits))
    aps = np.array([average_precision(scores[:, c], targets[:, c])
                    for c in range(scores.shape[1])])
    if np.all(np.isnan(aps)):
        return float("nan")
    return float(np.nanmean(aps) * 100.0)


def accuracy(logits: np.ndarray, targets: np.ndarray) -> float:
    """Top-1 accuracy x 100."""
    return float(np.mean(np.argmax(logits, axis=-1) == np.asarray(targets)) * 100.0)


def task_metric(task: str, logits: np.ndarray, targets: np.ndarray) -> float:
    """The paper's metric for ``task`` ("multilabel" -> mAP, "classification" -> accuracy)."""
    if task == "multilabel":
        return mean_average_precision(logits, targets)
    if task == "classification":
        return accuracy(logits, targets)
    raise ValueError(f"unknown task {task!r}; expected 'multilabel' or 'classification'")


def tow(metrics: dict[str, float], retrain: dict[str, float],
        splits: tuple[str, ...] = TABLE_SPLITS) -> float:
    """Tug-of-War: 100 * prod over splits of (1 - |metric - retrained metric| / 100)."""
    out = 1.0
    for split in splits:
        out *= 1.0 - abs(metrics[split] - retrain[split]) / 100.0
    return out * 100.0
