"""WA, UAR and weighted F1 per run; fold means per seed, then mean +- std over seeds."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np


def confusion(y_true: Sequence[int], y_pred: Sequence[int], num_classes: int) -> np.ndarray:
    """Counts [true class, predicted class]."""
    matrix = np.zeros((num_classes, num_classes), np.int64)
    np.add.at(matrix, (np.asarray(y_true), np.asarray(y_pred)), 1)
    return matrix


def scores(y_true: Sequence[int], y_pred: Sequence[int], num_classes: int) -> dict[str, float]:
    """WA (accuracy), UAR (macro recall over classes present in y_true) and weighted F1."""
    m = confusion(y_true, y_pred, num_classes).astype(np.float64)
    support = m.sum(1)
    predicted = m.sum(0)
    tp = np.diag(m)
    present = support > 0
    recall = np.divide(tp, support, out=np.zeros_like(tp), where=present)
    precision = np.divide(tp, predicted, out=np.zeros_like(tp), where=predicted > 0)
    f1 = np.divide(2 * precision * recall, precision + recall, out=np.zeros_like(tp), where=(precision + recall) > 0)
    return {
        "wa": float(tp.sum() / m.sum()),
        "uar": float(recall[present].mean()),
        "wf1": float((f1 * support).sum() / support.sum()),
    }


@dataclass(frozen=True)
class Summary:
    mean: float
    std: float
    per_seed: tuple[float, ...]


def aggregate(per_fold: dict[int, list[float]]) -> Summary:
    """{seed: [metric of each fold]} -> mean over folds per seed, then mean and (population) std over seeds."""
    seed_means = tuple(float(np.mean(values)) for _, values in sorted(per_fold.items()))
    return Summary(mean=float(np.mean(seed_means)), std=float(np.std(seed_means)), per_seed=seed_means)
