"""preprocessing/synth/ceilings.py: the Bayes ceilings of a generated corpus on hand-made ground truths."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from finetune.protocols import CLASSES, iemocap_folds
from memobert.schema import Utterance
from preprocessing.synth.ceilings import bayes_ceilings, fold_ceilings, labeled_ceilings
from preprocessing.synth.common import EMOTIONS

RELIABLE = {"text": 0.7, "audio": 0.7, "visual": 0.7}


def _cues(text: str, audio: str, visual: str) -> dict[str, str]:
    return {"text": text, "audio": audio, "visual": visual}


def test_the_generator_and_finetuning_number_the_classes_alike() -> None:
    assert EMOTIONS == CLASSES  # the ceilings read class names by the generator's order, labels by finetuning's


def test_bayes_ceilings_on_a_hand_made_ground_truth() -> None:
    # Classes: 0 anger, 1 happiness, 2 neutral, 3 sadness; each cue right with probability 0.7, else one of 3.
    labels = [0, 1, 2, 3]
    cues = [
        _cues("anger", "anger", "happiness"),  # two of three agree on the truth: fused right
        _cues("anger", "sadness", "happiness"),  # all disagree: a three-way tie holding the truth, 1/3
        _cues("happiness", "happiness", "neutral"),  # two agree on a wrong class: fused wrong
        _cues("anger", "happiness", "neutral"),  # a three-way tie without the truth
    ]
    got = bayes_ceilings(labels, cues, RELIABLE)
    assert got["accuracy"] == pytest.approx({"text": 0.25, "audio": 0.25, "visual": 0.5, "fused": (1 + 1 / 3) / 4})
    assert got["uar"]["fused"] == pytest.approx((1 + 1 / 3) / 4)  # one utterance per class: UAR = accuracy
    assert got["utterances"] == 4
    # An unreliable modality (0.25: the cue says nothing) is outvoted, and the prior decides alone: the majority class.
    got = bayes_ceilings([0, 0, 0, 1], [_cues("happiness", "anger", "anger")] * 4,
                         {"text": 0.25, "audio": 0.25, "visual": 0.25})
    assert got["accuracy"]["text"] == got["accuracy"]["fused"] == 0.75
    assert got["uar"]["fused"] == 0.5
    # A given prior replaces the labels' shares: here it names happiness, and the uninformative cues follow it.
    got = bayes_ceilings([0, 0, 0, 1], [_cues("happiness", "anger", "anger")] * 4,
                         {"text": 0.25, "audio": 0.25, "visual": 0.25}, prior=[0.1, 0.6, 0.2, 0.1])
    assert got["accuracy"]["fused"] == 0.25


def _corpus(root: Path, turns: list[dict]) -> Path:
    corpus = root / "corpus"
    (corpus / "ground_truth" / "iemocap").mkdir(parents=True)
    (corpus / "synth_summary.json").write_text(json.dumps({"config": {
        "text_reliability": 0.7, "audio_reliability": 0.7, "face_reliability": 0.7}}))
    (corpus / "ground_truth" / "iemocap" / "dialogs.json").write_text(json.dumps({"turns": turns}))
    return corpus


def _turn(name: str, text: str, audio: str, face: str) -> dict:
    return {"name": name, "text_class": text, "audio_class": audio, "face_class": face}


def _utt(key: str, label: int, speaker: str = "Ses01F") -> Utterance:
    empty = np.zeros((0, 2))
    return Utterance(key=key, meta={"label": label, "speaker": speaker}, tokens=np.zeros(0, np.int64),
                     words=np.zeros(0, np.int64), audio=empty, visual=empty, vprob=empty)


def test_labeled_ceilings_read_the_generators_ground_truth(tmp_path: Path) -> None:
    # Each modality right on two of three turns, never on the same turn wrong: fusion gets all three. (Wrong cues
    # name drawn classes: a cue for a class no utterance has is overruled by its zero prior.)
    corpus = _corpus(tmp_path, [_turn("Ses01F_impro01_F000", "anger", "sadness", "anger"),
                                _turn("Ses01F_impro01_M000", "sadness", "sadness", "neutral"),
                                _turn("Ses01F_impro01_F001", "anger", "neutral", "neutral")])
    utts = [_utt("Ses01F_impro01_F000", 0), _utt("Ses01F_impro01_M000", 3), _utt("Ses01F_impro01_F001", 2)]
    ceilings = labeled_ceilings(corpus, utts)
    assert ceilings["accuracy"] == pytest.approx({"text": 2 / 3, "audio": 2 / 3, "visual": 2 / 3, "fused": 1.0})


def test_fold_ceilings_score_each_test_speaker_with_the_training_speakers_prior(tmp_path: Path) -> None:
    folds = iemocap_folds()[:2]  # 1: Ses01F tests, Ses01M validates; 2: the swap; sessions 2-5 train both
    train = [("Ses02F_a", 0), ("Ses02F_b", 0), ("Ses03M_a", 0), ("Ses04F_a", 1), ("Ses05M_a", 2), ("Ses05M_b", 3)]
    turns = [_turn(key, *[CLASSES[label]] * 3) for key, label in train]
    utts = [_utt(key, label, speaker=key[:6]) for key, label in train]
    # Ses01F: the all-disagree turn (anger) is a tie between anger and neutral that only the prior breaks: the
    # training speakers' (anger 3 of 6) makes it right; Ses01F's own (neutral 2 of 3) or one counting the
    # validation speaker's four neutral turns would make it wrong.
    turns += [_turn("Ses01F_x_F000", "anger", "happiness", "neutral"), _turn("Ses01F_x_F001", "neutral", "neutral", "neutral"),
              _turn("Ses01F_x_F002", "anger", "anger", "sadness")]
    utts += [_utt("Ses01F_x_F000", 0), _utt("Ses01F_x_F001", 2), _utt("Ses01F_x_F002", 2)]
    turns += [_turn(f"Ses01F_x_M00{i}", "neutral", "neutral", "neutral") for i in range(4)]
    utts += [_utt(f"Ses01F_x_M00{i}", 2, speaker="Ses01M") for i in range(4)]
    got = fold_ceilings(_corpus(tmp_path, turns), utts, folds)
    assert sorted(got["per_fold"]) == [1, 2]
    # Fold 1: anger recalled 1 of 1, neutral 1 of 2 (the anger-anger-sadness turn reads as anger): UAR 0.75.
    assert got["per_fold"][1]["uar"]["fused"] == pytest.approx(0.75)
    assert got["per_fold"][1]["utterances"] == 3
    assert bayes_ceilings([0, 2, 2], [_cues("anger", "happiness", "neutral"), _cues("neutral", "neutral", "neutral"),
                                      _cues("anger", "anger", "sadness")], RELIABLE)["uar"]["fused"] == pytest.approx(0.25)
    assert got["per_fold"][2]["uar"]["fused"] == 1.0  # Ses01M: four neutral turns, every cue neutral
    assert got["uar"]["fused"] == pytest.approx((0.75 + 1.0) / 2)  # the mean over folds, as finetuning's tables
    assert set(got["uar"]) == {"text", "audio", "visual", "fused"}
