"""The `probe` setting: a logistic regression per modality subset on pooled features, a seconds-cheap check that
labeled shards carry the class before any model trains on them.

Features of one utterance, no model involved:
  text    which token ids occur (a bag of ids, L2-normalised): the words themselves, no embedding
  audio   mean and std over the acoustic frames, and a flag for an empty track
  visual  mean and std over the face frames and over the FER+ probabilities, and a flag for no face
Dense blocks are standardised on the training speakers. One probe per modality; classes are weighted inversely
to their frequency, since UAR is the score. A subset of several modalities adds its probes' log-probabilities
(late fusion: the product of experts, the Bayes rule under a uniform prior when the modalities are independent
given the class); one regression on the concatenated blocks fused worse than its best block alone
(docs/benchmarks.md). Since the fusion consumes probabilities, each probe's regularisation C is the one with
the lowest class-balanced log-loss on the validation speaker: the UAR would keep a probe so regularised that its
probabilities are nearly uniform, and its modality would then count for nothing in the product. The test
speaker is predicted once.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from scipy import sparse
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import log_loss
from sklearn.preprocessing import StandardScaler
from sklearn.utils.class_weight import compute_sample_weight

from finetune.data import MODALITY_SUBSETS, FoldData, labels_of
from finetune.metrics import scores
from finetune.protocols import CLASSES
from memobert.schema import Utterance

C_GRID = (0.01, 0.1, 1.0, 10.0)
Features = sparse.csr_matrix


def pooled(frames: np.ndarray) -> np.ndarray:
    """Mean and std over time, then 1.0 when there are frames (all zeros for an empty track)."""
    if len(frames) == 0:
        return np.zeros(2 * frames.shape[1] + 1)
    frames = frames.astype(np.float64)
    return np.concatenate([frames.mean(0), frames.std(0), [1.0]])


def token_bag(utts: Sequence[Utterance], width: int) -> Features:
    """Rows of the token ids each utterance contains, L2-normalised (an empty text is an empty row)."""
    rows, cols, values = [], [], []
    for i, u in enumerate(utts):
        ids = np.unique(u.tokens)
        rows += [i] * len(ids)
        cols += ids.tolist()
        values += [1.0 / np.sqrt(max(len(ids), 1))] * len(ids)
    return sparse.csr_matrix((values, (rows, cols)), shape=(len(utts), width))


def dense_block(utts: Sequence[Utterance], modality: str) -> np.ndarray:
    """Pooled audio ("a") or visual ("v": face features and FER+ probabilities) features, one row per utterance."""
    if modality == "a":
        return np.stack([pooled(u.audio) for u in utts])
    return np.stack([np.concatenate([pooled(u.visual), pooled(u.vprob)]) for u in utts])


class SubsetFeatures:
    """Each modality's features of a fold's train / val / test parts, dense blocks standardised on train."""

    def __init__(self, data: FoldData) -> None:
        parts = {"train": data.train, "val": data.val, "test": data.test}
        width = 1 + max(int(u.tokens.max()) for utts in parts.values() for u in utts if len(u.tokens))
        bags = {k: token_bag(v, width) for k, v in parts.items()}
        # Only ids the training speakers use can get a weight (elsewhere the data's gradient is zero and the L2
        # penalty keeps the weight at 0), so the other columns go: the solver's cost per iteration grows with
        # the columns, ~25k for a BERT vocabulary against a few hundred ids in use.
        in_train = np.unique(bags["train"].indices)
        self.blocks: dict[str, dict[str, Features]] = {"t": {k: bag[:, in_train] for k, bag in bags.items()}}
        for modality in ("a", "v"):
            raw = {k: dense_block(v, modality) for k, v in parts.items()}
            scaler = StandardScaler().fit(raw["train"])
            self.blocks[modality] = {k: sparse.csr_matrix(scaler.transform(x)) for k, x in raw.items()}

    def get(self, subset: str, part: str) -> Features:
        return sparse.hstack([self.blocks[m][part] for m in subset], format="csr")


def fit_by_log_loss(
    x_train: Features | np.ndarray, y_train: np.ndarray, x_val: Features | np.ndarray, y_val: np.ndarray
) -> tuple[LogisticRegression, float, list[dict[str, float]]]:
    """A class-balanced logistic regression for each C of C_GRID; the one with the lowest class-balanced validation
    log-loss, its C and every C's validation log-loss and UAR."""
    balanced_weights = compute_sample_weight("balanced", y_val)
    known = np.isin(y_val, y_train)  # a class no training utterance has is wrong at every C: not a choice
    best, history = None, []
    for c in C_GRID:
        probe = LogisticRegression(C=c, max_iter=2000, class_weight="balanced").fit(x_train, y_train)
        proba = probe.predict_proba(x_val)
        val_loss = log_loss(y_val[known], proba[known], labels=probe.classes_, sample_weight=balanced_weights[known])
        val_uar = scores(y_val, probe.classes_[proba.argmax(1)], len(CLASSES))["uar"]
        history.append({"C": c, "val_log_loss": val_loss, "val_uar": val_uar})
        if best is None or val_loss < best[0]:  # strictly better: ties keep the stronger regularisation
            best = (val_loss, c, probe)
    return best[2], best[1], history


def run_probe(data: FoldData) -> tuple[dict[str, np.ndarray], dict[str, Any], list[dict[str, Any]]]:
    """Fit a probe per modality, C chosen on the validation speaker's log-loss, and fuse them for every subset.

    Returns the test predictions per subset, what was fitted ({"C": {modality: C}}) and the validation history.
    """
    features = SubsetFeatures(data)
    y_train, y_val = labels_of(data.train), labels_of(data.val)
    log_proba, chosen, history = {}, {}, []
    for modality in ("t", "a", "v"):
        probe, chosen[modality], tried = fit_by_log_loss(features.get(modality, "train"), y_train,
                                                         features.get(modality, "val"), y_val)
        history += [{"subset": modality, **entry} for entry in tried]
        classes = probe.classes_  # the training labels' classes, the same for every modality
        log_proba[modality] = {part: probe.predict_log_proba(features.get(modality, part)) for part in ("val", "test")}
    predictions = {}
    for subset in MODALITY_SUBSETS:
        fused = {part: sum(log_proba[m][part] for m in subset) for part in ("val", "test")}
        if len(subset) > 1:
            history.append({"subset": subset, "val_uar": scores(y_val, classes[fused["val"].argmax(1)], len(CLASSES))["uar"]})
        predictions[subset] = classes[fused["test"].argmax(1)]
    return predictions, {"C": chosen}, history
