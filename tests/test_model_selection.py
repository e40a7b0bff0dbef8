"""The fine-tuning loop's model selection: validation cadence, strict improvement, patience, the reloaded weights.

A scripted classifier stands in for a network so each validation UAR is known in advance: it counts its
training steps in a buffer (restored with the selected weights), its training loss at step s is s, and
at validation it gets classes 0..k-1 right (UAR k/4) where k is scripted per step.
"""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from torch.nn import functional as F

from finetune.config import FinetuneConfig
from finetune.data import split_fold
from finetune.protocols import iemocap_folds
from finetune.run import Context, Selection, train_and_select
from finetune.settings import Schedule
from memobert.config import load_config
from memobert.schema import Utterance
from preprocessing.text import TextTokenizer
from pretrain.batch import Batch

FOLD = iemocap_folds()[0]  # test Ses01F, validation Ses01M


class ScriptedClassifier(torch.nn.Module):
    """Right on classes below right_classes[step] at validation; training loss = step number."""

    def __init__(self, right_classes: dict[int, int]) -> None:
        super().__init__()
        self.right_classes = right_classes
        self.weight = torch.nn.Parameter(torch.zeros(4))
        self.register_buffer("step", torch.zeros((), dtype=torch.long))
        self.trained_on: list[list[int]] = []  # the labels of each training batch, in order

    def forward(self, batch: Batch) -> torch.Tensor:
        k = self.right_classes[int(self.step)]
        pred = torch.where(batch.labels < k, batch.labels, (batch.labels + 1) % 4)
        return F.one_hot(pred, 4).float() + self.weight

    def loss(self, batch: Batch) -> torch.Tensor:
        self.trained_on.append(batch.labels.tolist())
        self.step += 1
        return self.weight.sum() * 0 + self.step.float()


def _utt(key: str, speaker: str, label: int) -> Utterance:
    return Utterance(key=key, meta={"speaker": speaker, "label": label}, tokens=np.arange(5, 8), words=np.arange(3),
                     audio=np.ones((4, 16)), visual=np.ones((3, 12)), vprob=np.full((3, 8), 1 / 8))


def _select(
    right_classes: dict[int, int], steps: int, val_every: int, patience: int, seed: int = 0
) -> tuple[list, int, ScriptedClassifier]:
    speakers = [*FOLD.train, FOLD.val, FOLD.test]
    utts = [_utt(f"{s}_{i}", s, i % 4) for s in speakers for i in range(8)]  # 64 training utterances: 4 batches
    cfg = load_config(FinetuneConfig, overrides=["train.batch_size=16", f"train.val_every={val_every}",
                                                 f"train.patience={patience}"])
    ctx = Context(utts, TextTokenizer(), {"text": 3, "audio": 16, "visual": 12}, None, torch.device("cpu"), False)
    model = ScriptedClassifier(right_classes)
    data = split_fold(utts, FOLD)
    [selection] = train_and_select(model, data.train, [data.val], cfg, seed, ctx, Schedule(1.0, steps, 0), "test")
    model.load_state_dict(selection.weights)
    return selection.history, selection.step, model


def test_the_best_validation_is_selected_ties_keep_the_earlier_step_and_its_weights_return() -> None:
    script = {2: 2, 4: 3, 6: 3, 8: 1, 10: 4}  # UAR 0.5, 0.75, 0.75 (tie), 0.25, then 1.0 at the last step
    history, selected, model = _select(script, steps=10, val_every=2, patience=3)
    assert [h["step"] for h in history] == [2, 4, 6, 8, 10]
    assert [h["val_uar"] for h in history] == [0.5, 0.75, 0.75, 0.25, 1.0]
    assert selected == 10 and int(model.step) == 10
    history, selected, model = _select({**script, 10: 3}, steps=10, val_every=2, patience=3)
    assert selected == 4 and int(model.step) == 4  # the tie at step 6 keeps step 4; its state is reloaded


def test_patience_counts_validations_without_improvement_and_resets_on_one() -> None:
    script = {2: 1, 4: 2, 6: 2, 8: 3, 10: 1, 12: 1, 14: 4}
    history, selected, model = _select(script, steps=14, val_every=2, patience=2)
    # Step 6 is stale (1), step 8 improves (reset), steps 10 and 12 are stale: stop at 12, before the better 14.
    assert [h["step"] for h in history] == [2, 4, 6, 8, 10, 12]
    assert selected == 8 and int(model.step) == 8


def test_validation_every_n_steps_and_after_the_last_with_the_mean_loss_and_lr_since_the_last(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG, logger="finetune.run")
    history, selected, _ = _select({3: 1, 6: 2, 7: 3}, steps=7, val_every=3, patience=5)
    assert [h["step"] for h in history] == [3, 6, 7] and selected == 7
    # Training loss at step s is s: the mean over the steps since the previous validation (equal batch sizes).
    assert [h["train_loss"] for h in history] == pytest.approx([(1 + 2 + 3) / 3, (4 + 5 + 6) / 3, 7.0])
    # The lr the validated step trained with: linear decay from 1.0 over 7 steps, no warm-up.
    assert [h["lr"] for h in history] == pytest.approx([5 / 7, 2 / 7, 1 / 7])
    # What --log-level debug shows per validation.
    assert [r.getMessage() for r in caplog.records if r.name == "finetune.run"] == [
        "test step 3: lr 0.714, train loss 2.0000, validation UAR 0.2500 (Ses01M)",
        "test step 6: lr 0.286, train loss 5.0000, validation UAR 0.5000 (Ses01M)",
        "test step 7: lr 0.143, train loss 7.0000, validation UAR 0.7500 (Ses01M)",
    ]


class PerSpeakerScript(ScriptedClassifier):
    """A script per validation speaker, told apart by the value of their face frames (the speaker's number)."""

    def forward(self, batch: Batch) -> torch.Tensor:
        speaker = int(batch.visual[0, 0, 0])
        k = self.right_classes[speaker][int(self.step)] if speaker in self.right_classes else 4
        pred = torch.where(batch.labels < k, batch.labels, (batch.labels + 1) % 4)
        return F.one_hot(pred, 4).float() + self.weight


def test_two_validation_speakers_select_and_stop_apart_as_they_would_alone() -> None:
    # Fold 1 validates on Ses01M, fold 2 (same training speakers) on Ses01F. Patience 2, a validation every 2 steps.
    scripts = {1: {2: 1, 4: 2, 6: 1, 8: 1, 10: 4},  # best at 4, stops after 8: never sees its better step 10
               2: {2: 1, 4: 1, 6: 3, 8: 3, 10: 4}}  # a tie at 4, better at 6, a tie at 8, best at 10
    vals = {1: FOLD.val, 2: FOLD.test}
    number = {FOLD.val: 1, FOLD.test: 2}  # training speakers: 0
    utts = [Utterance(key=f"{s}_{i}", meta={"speaker": s, "label": i % 4}, tokens=np.arange(5, 8), words=np.arange(3),
                      audio=np.ones((4, 16)), visual=np.full((3, 12), number.get(s, 0)), vprob=np.full((3, 8), 1 / 8))
             for s in [*FOLD.train, FOLD.val, FOLD.test] for i in range(8)]
    cfg = load_config(FinetuneConfig, overrides=["train.batch_size=16", "train.val_every=2", "train.patience=2"])
    ctx = Context(utts, TextTokenizer(), {"text": 3, "audio": 16, "visual": 12}, None, torch.device("cpu"), False)
    data = split_fold(utts, FOLD)

    def select(which: list[int]) -> tuple[list[Selection], PerSpeakerScript]:
        model = PerSpeakerScript(scripts)
        val_sets = [[u for u in utts if u.meta["speaker"] == vals[v]] for v in which]
        return train_and_select(model, data.train, val_sets, cfg, 0, ctx, Schedule(1.0, 10, 0)), model

    (first, second), model = select([1, 2])
    assert [h["step"] for h in first.history] == [2, 4, 6, 8] and first.step == 4 and first.uar == 0.5
    assert [h["step"] for h in second.history] == [2, 4, 6, 8, 10] and second.step == 10 and second.uar == 1.0
    assert int(first.weights["step"]) == 4 and int(second.weights["step"]) == 10 and int(model.step) == 10
    for selection, alone in ((first, select([1])), (second, select([2]))):
        [single], single_model = alone
        assert (single.history, single.step, single.uar) == (selection.history, selection.step, selection.uar)
        assert int(single.weights["step"]) == selection.step
    assert int(select([1])[1].step) == 8  # alone, fold 1 trains only until its own stop


def test_training_batches_are_a_seeded_shuffle_of_the_training_speakers() -> None:
    def order(seed: int) -> list[list[int]]:
        return _select({4: 1, 8: 1}, steps=8, val_every=4, patience=5, seed=seed)[2].trained_on

    first = order(0)
    assert first == order(0) and first != order(1)  # the seed decides the order, and only the seed
    unshuffled = [[0, 1, 2, 3] * 4] * 4  # speaker order: every batch of 16 is two speakers' labels 0-3, 0-3
    assert len(first) == 8 and first[:4] != unshuffled
    assert sorted(sum(first[:4], [])) == [c for c in range(4) for _ in range(16)]  # a pass sees each utterance once
