"""The `probe` setting: a logistic regression per modality subset on pooled features, a seconds-cheap check that
labeled shards carry the class before any model trains on them.

Features of one utterance, no model involved:
  text    which token ids occur (a bag of ids, L2-normalised): the words themselves, no embedding
  audio   mean and std over the acoustic frames, and a flag for an empty track
  visual  mean and std over the face frames and over the FER+ probabilities, and a flag for no face
A subset concatenates its modalities' blocks (early fusion); dense blocks are standardised on the training
speakers. The regularisation C is chosen per subset on the validation speaker; the test speaker is predicted
once. Classes are weighted inversely to their frequency, since UAR is the score.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from scipy import sparse
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler

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


def run_probe(data: FoldData) -> tuple[dict[str, np.ndarray], dict[str, Any], list[dict[str, Any]]]:
    """Fit a probe per modality subset, C chosen on the validation speaker.

    Returns the test predictions per subset, what was fitted ({"C": {subset: C}}) and the validation history.
    """
    features = SubsetFeatures(data)
    y_train, y_val = labels_of(data.train), labels_of(data.val)
    predictions, chosen, history = {}, {}, []
    for subset in MODALITY_SUBSETS:
        best = None
        for c in C_GRID:
            probe = LogisticRegression(C=c, max_iter=2000, class_weight="balanced")
            probe.fit(features.get(subset, "train"), y_train)
            val_uar = scores(y_val, probe.predict(features.get(subset, "val")), len(CLASSES))["uar"]
            history.append({"subset": subset, "C": c, "val_uar": val_uar})
            if best is None or val_uar > best[0]:  # strictly better: ties keep the stronger regularisation
                best = (val_uar, c, probe)
        chosen[subset] = best[1]
        predictions[subset] = best[2].predict(features.get(subset, "test"))
    return predictions, {"C": chosen}, history
