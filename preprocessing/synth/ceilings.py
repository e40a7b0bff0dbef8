"""What a generated corpus allows: the Bayes-optimal rule's accuracy and UAR on its labeled utterances.

The generator writes, per IEMOCAP-layout turn, the class each modality's cue shows (the true one with the
modality's reliability, else another uniformly). From that ground truth, not from any model, follows what
a perfect reader of one cue, or of all three, scores on the utterances actually drawn.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .common import EMOTIONS

CUE_FIELDS = {"text": "text_class", "audio": "audio_class", "visual": "face_class"}  # per turn in ground_truth/
RELIABILITY_KEYS = {"text": "text_reliability", "audio": "audio_reliability", "visual": "face_reliability"}


def iemocap_turns(corpus: Path) -> dict[str, dict[str, Any]]:
    """The generator's ground truth of every IEMOCAP-layout turn, by shard key."""
    from preprocessing.segments import sanitize_key

    turns = {}
    for path in sorted((corpus / "ground_truth" / "iemocap").glob("*.json")):
        for turn in json.loads(path.read_text())["turns"]:
            turns[sanitize_key(turn["name"])] = turn
    return turns


def bayes_ceilings(labels: Sequence[int], cues: Sequence[dict[str, str]], reliability: dict[str, float],
                   prior: Sequence[float] | None = None) -> dict[str, Any]:
    """Accuracy and UAR of the Bayes-optimal rule on these utterances, from each modality's cue and from all three.

    labels: class ids (EMOTIONS' order); cues: per utterance {"text" | "audio" | "visual": class name};
    reliability: per modality, P(cue = true class), else one of the other classes uniformly. The prior is the
    class shares of `labels` unless given. A tie between k classes containing the true one counts 1/k.
    """
    labels = np.asarray(labels)
    n_classes = len(EMOTIONS)
    if prior is None:
        prior = np.bincount(labels, minlength=n_classes) / len(labels)
    credit = {}
    for name, used in [(m, (m,)) for m in CUE_FIELDS] + [("fused", tuple(CUE_FIELDS))]:
        hits = np.zeros(len(labels))
        for i, (label, shown) in enumerate(zip(labels, cues)):
            posterior = np.log(np.maximum(np.asarray(prior, dtype=float), 1e-300))
            for modality in used:
                r = reliability[modality]
                likelihood = np.full(n_classes, (1 - r) / (n_classes - 1))
                likelihood[EMOTIONS.index(shown[modality])] = r
                posterior += np.log(np.maximum(likelihood, 1e-300))
            best = np.flatnonzero(np.isclose(posterior, posterior.max()))
            hits[i] = (label in best) / len(best)
        credit[name] = hits
    present = [c for c in range(n_classes) if (labels == c).any()]
    return {
        "accuracy": {name: float(h.mean()) for name, h in credit.items()},
        "uar": {name: float(np.mean([h[labels == c].mean() for c in present])) for name, h in credit.items()},
        "utterances": int(len(labels)),
    }


def labeled_ceilings(corpus: Path, utts: Sequence[Any], prior: Sequence[float] | None = None) -> dict[str, Any]:
    """bayes_ceilings of labeled utterances (shard samples with meta["label"]), with the generator's reliabilities."""
    return _ceilings(*_ground_truth(corpus), utts, prior)


def fold_ceilings(corpus: Path, utts: Sequence[Any], folds: Sequence[Any]) -> dict[str, Any]:
    """Each fold's test speaker's ceilings, and their UAR's mean over folds: the bound of a fold-averaged table.

    The prior is the class shares of the fold's training speakers, the prior a trained model can know.
    """
    truth, reliability = _ground_truth(corpus)  # read once for every fold
    per_fold = {}
    for fold in folds:
        test = [u for u in utts if u.meta["speaker"] == fold.test]
        train = [u.meta["label"] for u in utts if u.meta["speaker"] in fold.train]
        per_fold[fold.index] = _ceilings(truth, reliability, test, np.bincount(train, minlength=len(EMOTIONS)) / len(train))
    names = [*CUE_FIELDS, "fused"]
    return {"uar": {m: float(np.mean([c["uar"][m] for c in per_fold.values()])) for m in names},
            "per_fold": per_fold}


def _ground_truth(corpus: Path) -> tuple[dict[str, dict[str, Any]], dict[str, float]]:
    config = json.loads((corpus / "synth_summary.json").read_text())["config"]
    return iemocap_turns(corpus), {m: float(config[key]) for m, key in RELIABILITY_KEYS.items()}


def _ceilings(truth: dict[str, dict[str, Any]], reliability: dict[str, float], utts: Sequence[Any],
              prior: Sequence[float] | None) -> dict[str, Any]:
    labels = [u.meta["label"] for u in utts]
    cues = [{m: truth[u.key][field] for m, field in CUE_FIELDS.items()} for u in utts]
    return bayes_ceilings(labels, cues, reliability, prior)
