"""CV folds of both protocols and the metrics (checked against scikit-learn)."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import accuracy_score, confusion_matrix, f1_score, recall_score

from finetune.metrics import aggregate, confusion, scores
from finetune.protocols import folds_for, iemocap_folds, msp_improv_folds


def test_iemocap_ten_folds_exact_speakers() -> None:
    folds = iemocap_folds()
    assert len(folds) == 10
    assert (folds[0].test, folds[0].val) == ("Ses01F", "Ses01M")
    assert (folds[1].test, folds[1].val) == ("Ses01M", "Ses01F")
    assert (folds[9].test, folds[9].val) == ("Ses05M", "Ses05F")
    assert folds[4].train == ("Ses01F", "Ses01M", "Ses02F", "Ses02M", "Ses04F", "Ses04M", "Ses05F", "Ses05M")
    for fold in folds:
        assert len(fold.train) == 8 and fold.test[:5] == fold.val[:5]
        assert len({*fold.train, fold.val, fold.test}) == 10  # no overlap, all speakers
    assert sorted(f.test for f in folds) == sorted({s for f in folds for s in (*f.train, f.val, f.test)})


def test_msp_improv_twelve_folds_exact_speakers() -> None:
    folds = msp_improv_folds()
    assert len(folds) == 12
    assert [(f.test, f.val) for f in folds[:4]] == [("F01", "M01"), ("M01", "F01"), ("F02", "M02"), ("M02", "F02")]
    for fold in folds:
        assert len(fold.train) == 10 and fold.test[1:] == fold.val[1:]
        assert fold.test not in fold.train and fold.val not in fold.train
    assert sorted(f.test for f in folds) == sorted(f"{g}{s:02d}" for g in "FM" for s in range(1, 7))
    with pytest.raises(ValueError, match="unknown protocol 'iemo'"):
        folds_for("iemo")


def test_scores_equal_scikit_learn() -> None:
    rng = np.random.default_rng(0)
    y_true = rng.integers(0, 4, 200)
    y_pred = np.where(rng.random(200) < 0.6, y_true, rng.integers(0, 4, 200))
    got = scores(y_true, y_pred, 4)
    assert got["wa"] == pytest.approx(accuracy_score(y_true, y_pred))
    assert got["uar"] == pytest.approx(recall_score(y_true, y_pred, average="macro"))
    assert got["wf1"] == pytest.approx(f1_score(y_true, y_pred, average="weighted"))
    assert (confusion(y_true, y_pred, 4) == confusion_matrix(y_true, y_pred, labels=range(4))).all()


def test_uar_differs_from_wa_on_imbalanced_data() -> None:
    y_true = [0] * 8 + [1] * 2
    y_pred = [0] * 10  # always the majority class
    got = scores(y_true, y_pred, 4)
    assert got["wa"] == pytest.approx(0.8) and got["uar"] == pytest.approx(0.5)


def test_aggregate_fold_mean_then_seed_mean_and_std() -> None:
    summary = aggregate({1234: [0.5, 0.7], 42: [0.6, 0.6, 0.9]})
    assert summary.per_seed == pytest.approx((0.7, 0.6))  # seeds in sorted order: 42, 1234
    assert summary.mean == pytest.approx(0.65) and summary.std == pytest.approx(0.05)
