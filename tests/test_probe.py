"""The probe setting: logistic regressions on pooled features find the modality that carries the class, and
only that one, through the real finetune driver, records and report."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression

from finetune.config import FinetuneConfig
from finetune.data import MODALITY_SUBSETS, FoldData
from finetune.metrics import scores
from finetune.probe import SubsetFeatures, pooled, run_probe, token_bag
from finetune.protocols import iemocap_folds
from finetune.run import run_finetune, run_path
from helpers import write_tiny_shards
from memobert.config import load_config
from memobert.schema import Utterance


@pytest.fixture(scope="module")
def audio_only_shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Real-schema labeled shards of the 10 IEMOCAP speakers where only the audio frames carry the class."""
    speakers = [speaker for fold in iemocap_folds()[::2] for speaker in (fold.test, fold.val)]
    return write_tiny_shards(tmp_path_factory.mktemp("probe") / "shards", 320, 4, seed=3, speakers=speakers,
                             class_signal=1.5, signal_in="a")


def test_pooled_features_and_the_token_bag() -> None:
    frames = np.array([[1.0, 2.0], [3.0, 2.0]])
    assert pooled(frames).tolist() == [2.0, 2.0, 1.0, 0.0, 1.0]  # mean, std, "has frames"
    assert pooled(np.zeros((0, 2))).tolist() == [0.0] * 5
    utts = [Utterance(key=k, meta={}, tokens=np.array(t), words=np.arange(len(t)), audio=np.zeros((0, 2)),
                      visual=np.zeros((0, 2)), vprob=np.zeros((0, 2))) for k, t in (("a", [5, 7, 7, 9]), ("b", []))]
    bag = token_bag(utts, 10).toarray()
    assert np.allclose(bag[0], np.where(np.isin(np.arange(10), [5, 7, 9]), 1 / np.sqrt(3), 0)) and not bag[1].any()


def test_the_text_block_keeps_the_training_ids_and_predicts_as_the_whole_vocabulary_does() -> None:
    rng = np.random.default_rng(0)

    def utterance(label: int, ids: range) -> Utterance:
        tokens = np.concatenate([[100 + label], rng.choice(ids, 6)])  # the class's word and noise words
        return Utterance(key="", meta={"label": label}, tokens=tokens, words=np.arange(7), audio=np.zeros((0, 2)),
                         visual=np.zeros((0, 2)), vprob=np.zeros((0, 2)))

    # Validation and test speakers also use ids no training utterance has (300-399): they cannot get a weight.
    data = FoldData(train=[utterance(i % 4, range(200, 260)) for i in range(80)],
                    val=[utterance(i % 4, range(200, 400)) for i in range(20)],
                    test=[utterance(i % 4, range(200, 400)) for i in range(20)])
    compact = SubsetFeatures(data).blocks["t"]
    in_train = np.unique(np.concatenate([u.tokens for u in data.train]))
    assert compact["train"].shape[1] == len(in_train) == compact["test"].shape[1]
    full = {part: token_bag(getattr(data, part), 400) for part in ("train", "test")}
    labels = [u.meta["label"] for u in data.train]
    narrow = LogisticRegression(C=1.0, max_iter=2000, class_weight="balanced").fit(compact["train"], labels)
    wide = LogisticRegression(C=1.0, max_iter=2000, class_weight="balanced").fit(full["train"], labels)
    assert not wide.coef_[:, np.setdiff1d(np.arange(400), in_train)].any()  # exactly 0 off the training ids
    assert np.allclose(wide.coef_[:, in_train], narrow.coef_, atol=1e-4)
    assert (wide.predict(full["test"]) == narrow.predict(compact["test"])).all()


def test_the_probe_fuses_modalities_that_each_show_the_class_only_sometimes() -> None:
    # As the synthetic corpus draws them: each modality's cue shows the true class with probability 0.6, else
    # another, independently. One cue alone is right ~60% of the time; the product of the three probes reads
    # the majority of cues, right ~65% and more (a fusion that kept one modality would stay at 60).
    rng = np.random.default_rng(0)

    def shown(label: int) -> int:
        return label if rng.random() < 0.6 else int(rng.choice([c for c in range(4) if c != label]))

    def utterance(label: int) -> Utterance:
        frames = lambda: np.eye(4)[[shown(label)] * 3] + rng.normal(0, 0.3, (3, 4))  # noqa: E731
        return Utterance(key="", meta={"label": label}, tokens=np.array([100 + shown(label), 7]), words=np.arange(2),
                         audio=frames(), visual=frames(), vprob=np.zeros((3, 2)))

    data = FoldData(*[[utterance(i % 4) for i in range(n)] for n in (400, 200, 400)])
    predictions, fitted, history = run_probe(data)
    y = np.array([u.meta["label"] for u in data.test])
    uar = {subset: scores(y, p, 4)["uar"] for subset, p in predictions.items()}
    assert all(0.5 < uar[m] < 0.7 for m in "tav")
    assert uar["tav"] > max(uar[m] for m in "tav") + 0.05
    assert set(fitted["C"]) == {"t", "a", "v"} and {h["subset"] for h in history} == set(MODALITY_SUBSETS)
    # A class the training speakers lack (sadness here) cannot be predicted, and C is still chosen on the rest.
    without_sadness = FoldData([u for u in data.train if u.meta["label"] != 3], data.val, data.test)
    predictions, fitted, _ = run_probe(without_sadness)
    assert all(set(p) <= {0, 1, 2} for p in predictions.values()) and set(fitted["C"]) == {"t", "a", "v"}


def test_the_probe_finds_the_modality_that_carries_the_class(tmp_path: Path, audio_only_shards: Path) -> None:
    out = tmp_path / "probe"
    cfg = load_config(FinetuneConfig, overrides=[f"data.shards={audio_only_shards}", "settings=probe", "seeds=[0]",
                                                 f"out_dir={out}"])
    md = run_finetune(cfg).read_text()
    records = [json.loads(run_path(out, "probe", 0, fold).read_text()) for fold in range(1, 11)]
    uar = {subset: np.mean([r["missing_modalities"][subset]["scores"]["uar"] for r in records]) for subset in "tav"}
    fused = np.mean([r["scores"]["uar"] for r in records])
    # Chance is 0.25 (4 balanced classes); 10 test speakers of 32 utterances each.
    assert uar["a"] > 0.6 and fused > 0.5
    assert uar["t"] < 0.4 and uar["v"] < 0.4
    assert all(set(r["fitted"]["C"]) == {"t", "a", "v"} for r in records)
    assert "| Probe (logistic regression) | " in md and "Probe: a logistic regression per modality on" in md
