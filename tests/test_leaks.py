"""Leak guards: the test speaker's data is poisoned until model selection is over, and every setting runs clean.

The test speaker's utterances are loaded as PoisonedUtterance: reading their arrays (tokens, words, audio,
visual, FER+ probabilities) or their label raises while the guard is armed. The guard is armed when a run
starts and disarmed when train_and_select returns, so a read by the fit-time hook (prepare), by training, by
validation or by early stopping fails the run; the final evaluation reads them after that. Under
msp_improv_11to1 the validation speaker is the test speaker by design: there the guard allows the reads of
model selection (predictions and labels of the validation speaker) and nothing else.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import BertConfig, BertForMaskedLM

import finetune.run as run
from finetune.config import PAPER_SETTINGS, FinetuneConfig
from finetune.protocols import TEST_SELECTED, folds_for, msp_improv_folds
from helpers import TINY_DIMS, write_tiny_shards
from memobert.config import load_config
from memobert.schema import ARRAYS, Utterance
from pretrain.config import ModelConfig
from pretrain.loader import read_shard, shard_paths
from pretrain.model import MEmoBERT

SETTINGS = [*PAPER_SETTINGS, "mfn", "m3er"]
# A few steps are enough: the guard is about what is read, not about what is learnt.
FAST = ["model.flavor=tiny", "train.batch_size=16", "train.steps=8", "train.direct_steps=8", "train.val_every=4",
        "train.patience=2", "train.device=cpu", "mfn.cells=[8, 4, 4]", "mfn.memory=16", "mfn.steps=4",
        "mfn.word_embeddings=bundled", "seeds=[0]", "folds=[1]"]


class LeakError(AssertionError):
    """The test speaker's data was read before model selection was over."""


class Guard:
    armed = False
    # 11to1 validates on the test speaker: its selection reads are allowed (predict during train_and_select).
    allow_selection = False


class PoisonedMeta(dict):
    """Metadata whose label raises while the guard is armed (the speaker id stays readable: folds split by it)."""

    def __getitem__(self, key):
        _check("label" if key == "label" else None, self)
        return super().__getitem__(key)

    def get(self, key, default=None):
        _check("label" if key == "label" else None, self)
        return super().get(key, default)


class PoisonedUtterance(Utterance):
    """A test-speaker utterance whose arrays raise while the guard is armed."""

    def __getattribute__(self, name: str):
        if name in ARRAYS:
            _check(name, object.__getattribute__(self, "key"))
        return object.__getattribute__(self, name)


def _check(field: str | None, where) -> None:
    if field is not None and Guard.armed:
        raise LeakError(f"the test speaker's {field} was read before model selection was over ({where})")


def _poison(utt: Utterance) -> PoisonedUtterance:
    return PoisonedUtterance(key=utt.key, meta=PoisonedMeta(utt.meta), tokens=utt.tokens, words=utt.words,
                             audio=utt.audio, visual=utt.visual, vprob=utt.vprob)


@pytest.fixture
def guarded(monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, set[str]]]:
    """Poison fold 1's test speaker at load time (the runs are fold 1's); arm per run, disarm when selection returns."""
    seen: dict[str, set[str]] = {}
    real_load, real_run_folds, real_select = run.load_utterances, run.run_folds, run.train_and_select

    def load(source, cfg):
        test_speaker = folds_for(protocol["name"])[0].test
        utts = [_poison(u) if u.meta["speaker"] == test_speaker else u for u in real_load(source, cfg)]
        seen["test_keys"] = {u.key for u in utts if isinstance(u, PoisonedUtterance)}
        return utts

    def run_folds(setting, seed, folds, cfg, ctx):
        Guard.armed = True
        try:
            return real_run_folds(setting, seed, folds, cfg, ctx)
        finally:
            Guard.armed = False

    def train_and_select(*args, **kwargs):
        out = real_select(*args, **kwargs)
        Guard.armed = False  # selection is over: the final evaluation may read the test speaker
        return out

    def selection_read(real):
        def read(*args, **kwargs):
            armed = Guard.armed
            Guard.armed = armed and not Guard.allow_selection
            try:
                return real(*args, **kwargs)
            finally:
                Guard.armed = armed
        return read

    protocol = {"name": "iemocap"}
    monkeypatch.setattr(run, "load_utterances", load)
    monkeypatch.setattr(run, "run_folds", run_folds)
    monkeypatch.setattr(run, "train_and_select", train_and_select)
    for name in ("predict", "labels_of"):  # what selection reads: predictions and labels of the validation speaker
        monkeypatch.setattr(run, name, selection_read(getattr(run, name)))
    seen["protocol"] = protocol  # type: ignore[assignment]
    yield seen
    Guard.armed, Guard.allow_selection = False, False


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny MEmoBERT 'checkpoint' (an export folder, random weights) and a one-layer text BERT for bert_direct."""
    root = tmp_path_factory.mktemp("models")
    torch.manual_seed(0)
    model = MEmoBERT.from_config(ModelConfig(flavor="tiny", acoustic_dim=TINY_DIMS["audio"], visual_dim=TINY_DIMS["visual"]))
    config = BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)
    BertForMaskedLM(config).save_pretrained(root / "bert")
    return {"checkpoint": model.save_pretrained(root / "checkpoint"), "bert": root / "bert"}


@pytest.fixture(scope="module")
def msp_shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """8 utterances per MSP-IMPROV speaker (2 per class)."""
    speakers = [speaker for fold in msp_improv_folds() for speaker in [fold.test]]
    return write_tiny_shards(tmp_path_factory.mktemp("msp") / "shards", 96, 2, seed=1, speakers=speakers,
                             class_signal=3.0)


def _finetune(tmp_path: Path, shards: Path, models: dict[str, Path], protocol: str) -> Path:
    out = tmp_path / protocol
    overrides = [f"data.shards={shards}", f"data.protocol={protocol}", f"settings={','.join(SETTINGS)}",
                 f"checkpoint={models['checkpoint']}", f"model.bert_folder={models['bert']}", f"out_dir={out}", *FAST]
    run.run_finetune(load_config(FinetuneConfig, overrides=overrides))
    return out


@pytest.mark.parametrize("protocol", ["iemocap", "msp_improv", "msp_improv_11to1"])
def test_no_setting_reads_the_test_speaker_before_selection_is_over(
    protocol: str, tmp_path: Path, guarded: dict, labeled_shards: Path, msp_shards: Path, models: dict[str, Path]
) -> None:
    guarded["protocol"]["name"] = protocol
    Guard.allow_selection = protocol in TEST_SELECTED
    shards = labeled_shards if protocol == "iemocap" else msp_shards
    out = _finetune(tmp_path, shards, models, protocol)
    fold = folds_for(protocol)[0]
    speaker_keys = _keys_of(shards, fold.test)
    assert speaker_keys and speaker_keys <= guarded["test_keys"]  # the fold's test speaker was poisoned
    for setting in SETTINGS:
        record = json.loads(run.run_path(out, setting, 0, 1).read_text())
        # The predictions are exactly the test speaker's utterances, each once.
        assert set(record["predictions"]) == speaker_keys and record["num_predictions"] == len(speaker_keys), setting
        assert record["samples"]["test"] == len(speaker_keys)


def _keys_of(shards: Path, speaker: str) -> set[str]:
    return {u.key for path in shard_paths(str(shards)) for u in read_shard(path) if u.meta["speaker"] == speaker}


def test_the_guard_catches_a_read_of_the_test_speaker() -> None:
    # The sentinel itself: armed, any array or the label raises; disarmed, the utterance reads normally.
    utt = _poison(Utterance(key="k", meta={"speaker": "Ses01F", "label": 2}, tokens=np.arange(3), words=np.arange(3),
                            audio=np.zeros((2, 4)), visual=np.zeros((1, 3)), vprob=np.ones((1, 8)) / 8))
    Guard.armed = True
    try:
        for name in ARRAYS:
            with pytest.raises(LeakError, match=name):
                getattr(utt, name)
        with pytest.raises(LeakError, match="label"):
            utt.meta["label"]
        assert utt.meta["speaker"] == "Ses01F" and utt.key == "k"
    finally:
        Guard.armed = False
    assert utt.meta["label"] == 2 and len(utt.tokens) == 3
