"""Task metrics of the reference (SPEC.md 5.1, 5.3).

* Multi-label tasks (CelebA, CelebA-HQ, SynthFaces): macro mean average precision over labels on
  sigmoid scores, as ``torchmetrics.functional.average_precision(task="multilabel")`` in
  torchmetrics 1.3.0: per label, AP = sum_n (R_n - R_{n-1}) P_n over the distinct-score
  precision-recall curve (the same as scikit-learn's ``average_precision_score``); a label
  without any positive gives NaN and is left out of the mean.
* Classification (MUFAC): top-1 accuracy.
Both in percent.

**Scores of the mAP (SPEC Q4).** The reference takes ``torch.sigmoid`` of its bf16 autocast
logits, so its scores are rounded to bfloat16 (8 significant bits: from 0.5 to 1 they step by
2^-8, and every score above 1 - 2^-9 = 0.998 becomes 1.0), which ties many images.
``score_dtype="bfloat16"`` reproduces that; ``None`` scores in float64 (no rounding beyond the
logits'). Which one a study uses is ``config.train.ap_scores`` (``train.ap_score_dtype``).

ToW compares a model with the retrained one on retain / forget / test.
"""

from __future__ import annotations

import ml_dtypes
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


def sigmoid_scores(logits: np.ndarray, score_dtype: str | None = None) -> np.ndarray:
    """``sigmoid(logits)`` in float64, rounded to ``score_dtype`` (e.g. "bfloat16", as
    ``torch.sigmoid`` of bf16 logits returns them) when given."""
    scores = 1.0 / (1.0 + np.exp(-np.asarray(logits, np.float64)))
    if score_dtype is not None:
        dtype = ml_dtypes.bfloat16 if score_dtype == "bfloat16" else np.dtype(score_dtype)
        scores = scores.astype(dtype).astype(np.float64)
    return scores


def mean_average_precision(logits: np.ndarray, targets: np.ndarray,
                           score_dtype: str | None = None) -> float:
    """Macro mAP x 100 over labels on ``sigmoid(logits)`` (rounded to ``score_dtype`` if given:
    :func:`sigmoid_scores`); labels without positives are skipped."""
    scores = sigmoid_scores(logits, score_dtype)
    aps = np.array([average_precision(scores[:, c], targets[:, c])
                    for c in range(scores.shape[1])])
    if np.all(np.isnan(aps)):
        return float("nan")
    return float(np.nanmean(aps) * 100.0)


def accuracy(logits: np.ndarray, targets: np.ndarray) -> float:
    """Top-1 accuracy x 100."""
    return float(np.mean(np.argmax(logits, axis=-1) == np.asarray(targets)) * 100.0)


def task_metric(task: str, logits: np.ndarray, targets: np.ndarray,
                score_dtype: str | None = None) -> float:
    """The paper's metric for ``task`` ("multilabel" -> mAP on scores rounded to
    ``score_dtype`` if given, "classification" -> accuracy)."""
    if task == "multilabel":
        return mean_average_precision(logits, targets, score_dtype)
    if task == "classification":
        return accuracy(logits, targets)
    raise ValueError(f"unknown task {task!r}; expected 'multilabel' or 'classification'")


SECOND_ORACLE = "retrain_2"
"""The stage that retrains again (the same data, every other draw from ``seed + 1``): its ToW
against retrain is the noise floor of ToW (study and report)."""


def tow(metrics: dict[str, float], retrain: dict[str, float],
        splits: tuple[str, ...] = TABLE_SPLITS) -> float:
    """Tug-of-War: 100 * prod over splits of (1 - |metric - retrained metric| / 100)."""
    out = 1.0
    for split in splits:
        out *= 1.0 - abs(metrics[split] - retrain[split]) / 100.0
    return out * 100.0
