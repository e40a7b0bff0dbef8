"""WA, UAR and weighted F1 per run; fold means per seed, then mean +- sample std over seeds."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

# A prediction that is no class: the prompt's argmax over the whole vocabulary landed on a non-label word.
NOT_A_CLASS = -1


def confusion(y_true: Sequence[int], y_pred: Sequence[int], num_classes: int) -> np.ndarray:
    """Counts [true class, predicted class]; NOT_A_CLASS predictions are in no column."""
    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    matrix = np.zeros((num_classes, num_classes), np.int64)
    is_class = y_pred != NOT_A_CLASS
    np.add.at(matrix, (y_true[is_class], y_pred[is_class]), 1)
    return matrix


def scores(y_true: Sequence[int], y_pred: Sequence[int], num_classes: int) -> dict[str, float]:
    """WA (accuracy), UAR (macro recall over classes present in y_true) and weighted F1.

    A NOT_A_CLASS prediction is wrong for its sample and predicts no class (no class's precision counts it).
    """
    m = confusion(y_true, y_pred, num_classes).astype(np.float64)
    support = np.bincount(np.asarray(y_true), minlength=num_classes).astype(np.float64)
    predicted = m.sum(0)
    tp = np.diag(m)
    present = support > 0
    recall = np.divide(tp, support, out=np.zeros_like(tp), where=present)
    precision = np.divide(tp, predicted, out=np.zeros_like(tp), where=predicted > 0)
    f1 = np.divide(2 * precision * recall, precision + recall, out=np.zeros_like(tp), where=(precision + recall) > 0)
    return {
        "wa": float(tp.sum() / support.sum()),
        "uar": float(recall[present].mean()),
        "wf1": float((f1 * support).sum() / support.sum()),
    }


def uar_test_se(matrix: np.ndarray, support: Sequence[int]) -> float:
    """Standard error of one test set's UAR from its test utterances alone, the trained model held fixed.

    Each class's recall is a binomial proportion over that class's `support` test utterances (the confusion
    rows can hold fewer: NOT_A_CLASS predictions), so Var(UAR) = sum_c r_c (1 - r_c) / n_c / C^2 over the C
    classes present.
    """
    support = np.asarray(support)
    present = support > 0
    recall = np.diag(np.asarray(matrix))[present] / support[present]
    return float(np.sqrt(np.sum(recall * (1 - recall) / support[present])) / present.sum())


def fold_mean_se(per_fold: dict[int, list[float]]) -> float:
    """{seed: [test SE of each fold]} -> the SE of each seed's fold mean (the folds test different speakers, so
    their errors are independent), averaged over seeds (every seed tests the same utterances)."""
    return float(np.mean([np.sqrt(np.sum(np.square(ses))) / len(ses) for _, ses in sorted(per_fold.items())]))


@dataclass(frozen=True)
class Summary:
    mean: float
    std: float  # sample std over seeds (ddof=1); NaN with a single seed
    per_seed: tuple[float, ...]


def aggregate(per_fold: dict[int, list[float]]) -> Summary:
    """{seed: [metric of each fold]} -> mean over folds per seed, then mean and sample std (ddof=1) over seeds.

    The sample std is what papers report for a few seeds; one seed has none (NaN).
    """
    seed_means = tuple(float(np.mean(values)) for _, values in sorted(per_fold.items()))
    std = float(np.std(seed_means, ddof=1)) if len(seed_means) > 1 else float("nan")
    return Summary(mean=float(np.mean(seed_means)), std=std, per_seed=seed_means)
