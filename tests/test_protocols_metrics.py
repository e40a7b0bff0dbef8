"""CV folds of the protocols and the metrics (checked against scikit-learn)."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from sklearn.metrics import accuracy_score, confusion_matrix, f1_score, recall_score

from finetune.metrics import NOT_A_CLASS, aggregate, confusion, fold_mean_se, scores, uar_test_se
from finetune.protocols import folds_for, iemocap_folds, msp_improv_11to1_folds, msp_improv_folds


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


def test_msp_improv_11to1_trains_on_eleven_and_validates_on_the_test_speaker() -> None:
    leak_free = msp_improv_folds()
    folds = msp_improv_11to1_folds()
    assert len(folds) == 12 and folds_for("msp_improv_11to1") == folds
    everyone = {f"{g}{s:02d}" for g in "FM" for s in range(1, 7)}
    for fold, clean in zip(folds, leak_free):
        assert (fold.index, fold.test) == (clean.index, clean.test)  # the same test speaker per fold number
        assert fold.val == fold.test  # the authors' selection reads the test speaker
        assert len(fold.train) == 11 and set(fold.train) == everyone - {fold.test}
        assert clean.val in fold.train  # the leak-free validation speaker trains here
    assert folds[0].train == ("M01", "F02", "M02", "F03", "M03", "F04", "M04", "F05", "M05", "F06", "M06")


def test_a_non_label_prediction_is_wrong_and_predicts_no_class() -> None:
    y_true = [0, 0, 1, 1, 2, 3]
    y_pred = [0, NOT_A_CLASS, 1, NOT_A_CLASS, 2, 3]
    got = scores(y_true, y_pred, 4)
    assert got["wa"] == pytest.approx(4 / 6) and got["uar"] == pytest.approx((0.5 + 0.5 + 1 + 1) / 4)
    # Precision is 1 for every class (no wrong class predicted), recall as above: F1 2/3, 2/3, 1, 1.
    assert got["wf1"] == pytest.approx((2 * 2 / 3 + 2 * 2 / 3 + 1 + 1) / 6)
    assert confusion(y_true, y_pred, 4).sum() == 4  # the two non-label predictions are in no column


def test_aggregate_fold_mean_then_seed_mean_and_sample_std() -> None:
    summary = aggregate({1234: [0.5, 0.7], 42: [0.6, 0.6, 0.9]})
    assert summary.per_seed == pytest.approx((0.7, 0.6))  # seeds in sorted order: 42, 1234
    # Sample std (ddof=1) over the two seed means, as papers report: sqrt(0.005 / 1); the population std is 0.05.
    assert summary.mean == pytest.approx(0.65) and summary.std == pytest.approx(0.0707107, abs=1e-6)
    four = aggregate({42: [0.80], 1234: [0.82], 4321: [0.78], 5678: [0.84]})
    assert four.std == pytest.approx(np.std([0.80, 0.82, 0.78, 0.84], ddof=1)) and four.std > np.std([0.80, 0.82, 0.78, 0.84])
    assert np.isnan(aggregate({42: [0.5, 0.7]}).std)  # one seed has no sample std


def test_uar_test_se_is_the_spread_of_the_uar_over_test_samples() -> None:
    # By hand: classes 0, 1 and 2 present (4, 1 and 10 utterances, recall 1/2, 0 and 4/5), 3 absent.
    matrix = np.zeros((4, 4), np.int64)
    matrix[0, 0], matrix[0, 1], matrix[1, 0], matrix[2, 2], matrix[2, 3] = 2, 1, 1, 8, 2  # a class-0 one: NOT_A_CLASS
    assert uar_test_se(matrix, [4, 1, 10, 0]) == pytest.approx(np.sqrt(0.25 / 4 + 0 + 0.16 / 10) / 3)
    # Its meaning: the std of the UAR over many test sets of the same class sizes, the model's recalls fixed.
    support, recall = np.array([13, 11, 16, 9]), np.array([9, 4, 12, 3]) / np.array([13, 11, 16, 9])
    hits = np.random.default_rng(0).binomial(support, recall, size=(20000, 4))
    assert uar_test_se(np.diag(recall * support), support) == pytest.approx((hits / support).mean(1).std(), rel=0.03)
    # A perfect classifier's recalls (all 1) do not move with the test sample.
    assert uar_test_se(np.diag(support), support) == 0.0


def test_fold_mean_se_adds_folds_as_independent_and_averages_seeds() -> None:
    # Seed 42: two folds of SE 0.1, their mean's SE sqrt(0.02) / 2; seed 7: sqrt(0.08) / 2.
    assert fold_mean_se({42: [0.1, 0.1], 7: [0.2, 0.2]}) == pytest.approx((np.sqrt(0.02) + np.sqrt(0.08)) / 4)
    assert fold_mean_se({42: [0.1]}) == pytest.approx(0.1)


@pytest.mark.parametrize("protocol, count", [("iemocap", 10), ("msp_improv", 12), ("msp_improv_11to1", 12)])
def test_folds_are_numbered_from_one_and_found_by_their_protocol_name(protocol: str, count: int) -> None:
    folds = folds_for(protocol)
    assert [f.index for f in folds] == list(range(1, count + 1))  # run paths and tables use these numbers
    assert folds == {"iemocap": iemocap_folds, "msp_improv": msp_improv_folds,
                     "msp_improv_11to1": msp_improv_11to1_folds}[protocol]()
    with pytest.raises(ValueError, match="known: iemocap, msp_improv, msp_improv_11to1"):
        folds_for(protocol.upper())


def test_scores_divide_by_no_zero_and_count_in_integers() -> None:
    # Class 3 is never true and never predicted, class 2 is predicted but never right (precision + recall 0),
    # class 1 has precision = recall = 1/2 (F1 1/2, so precision + recall is exactly 1).
    y_true = [0, 0, 1, 1, 2]
    y_pred = [0, 0, 1, 2, 1]
    with np.errstate(all="raise"):  # a 0/0 anywhere would raise instead of being masked out
        got = scores(y_true, y_pred, 4)
    assert got["wa"] == pytest.approx(3 / 5) and got["uar"] == pytest.approx((1 + 0.5 + 0) / 3)
    assert got["wf1"] == pytest.approx((2 * 1 + 2 * 0.5 + 0) / 5)
    assert got["wf1"] == pytest.approx(f1_score(y_true, y_pred, average="weighted", labels=range(4), zero_division=0))
    matrix = confusion(y_true, y_pred, 4)
    assert matrix.dtype == np.int64  # written to the run JSON: counts, not floats


def test_one_seed_has_no_std_and_no_numpy_warning() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # np.std(ddof=1) of one value warns "degrees of freedom <= 0"
        summary = aggregate({42: [0.5, 0.7]})
    assert summary.mean == pytest.approx(0.6) and np.isnan(summary.std)
