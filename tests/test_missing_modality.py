"""Missing-modality semantics: each subset's score is what a model can do with the modalities kept, no more.

Through the driver, a model that can only use one modality (it reads the label off that modality and
predicts class 0 without it) must score perfectly on the subsets that contain the modality and exactly
chance (UAR 0.25, one class predicted for a balanced test speaker) on the others; an evaluation that ignored
which modalities are kept would score it perfectly everywhere. The prompt path and the baselines' absent
flags are checked on the real models: a dropped modality reaches them as absent, not as some content.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
from torch import Tensor, nn
from torch.nn import functional as F

import finetune.run as run
from finetune.baselines.m3er import M3ER
from finetune.baselines.mfn import MFN
from finetune.config import FinetuneConfig, M3ERConfig, MFNConfig, PromptConfig
from finetune.data import MODALITY_SUBSETS, batches, keep_modalities
from finetune.prompt import PromptModel, Template, insert_template
from finetune.protocols import CLASSES, iemocap_folds
from memobert.config import load_config
from memobert.schema import Utterance
from pretrain.batch import Batch
from preprocessing.text import TextTokenizer
from tests.test_model import tiny_model

LABEL_TOKEN = 2000  # the text oracle's token for class c is LABEL_TOKEN + c
DIMS = {"acoustic_dim": 16, "visual_dim": 12, "vprob_dim": 8}


def _utterances() -> list[Utterance]:
    """4 utterances per class for each IEMOCAP speaker, every modality present, each carrying the label."""
    rng = np.random.default_rng(0)
    speakers = sorted({s for fold in iemocap_folds() for s in (fold.test, fold.val)})
    utts = []
    for speaker in speakers:
        for i in range(16):
            label = i % len(CLASSES)
            audio = rng.standard_normal((int(rng.integers(3, 20)), DIMS["acoustic_dim"]))
            visual = rng.standard_normal((int(rng.integers(3, 20)), DIMS["visual_dim"]))
            audio[:, label] += 10.0
            visual[:, label] += 10.0
            tokens = np.concatenate([[LABEL_TOKEN + label], rng.integers(3000, 4000, int(rng.integers(2, 9)))])
            utts.append(Utterance(key=f"{speaker}_{i:02d}", meta={"speaker": speaker, "label": label}, tokens=tokens,
                                  words=np.arange(len(tokens)), audio=audio, visual=visual,
                                  vprob=np.full((len(visual), 8), 1 / 8)))
    return utts


class OneModalityOracle(nn.Module):
    """Reads the label off one modality; without it, predicts class 0. Its one parameter only lets it train."""

    def __init__(self, modality: str) -> None:
        super().__init__()
        self.modality = modality
        self.bias = nn.Parameter(torch.zeros(len(CLASSES)))

    def forward(self, batch: Batch) -> Tensor:
        if self.modality == "t":
            present = batch.text_mask.sum(1) > 2  # more than [CLS] [SEP]
            label = (batch.text_ids[:, 1] - LABEL_TOKEN).clamp(0, len(CLASSES) - 1)
        else:
            frames, mask = (batch.acoustic, batch.acoustic_mask) if self.modality == "a" else (batch.visual, batch.visual_mask)
            present = mask.any(1)
            label = frames[:, 0, : len(CLASSES)].float().argmax(-1)
        label = torch.where(present, label, 0)
        return 10.0 * F.one_hot(label, len(CLASSES)).float() + 0.0 * self.bias

    def loss(self, batch: Batch) -> Tensor:
        return F.cross_entropy(self(batch) + self.bias, batch.labels)


@pytest.mark.parametrize("modality", ["t", "a", "v"])
def test_a_one_modality_model_scores_only_where_its_modality_is_kept(modality: str, monkeypatch) -> None:
    monkeypatch.setattr(run, "build_model", lambda *args: OneModalityOracle(modality))
    cfg = load_config(FinetuneConfig, overrides=["train.steps=2", "train.val_every=1", "train.batch_size=16",
                                                 "train.device=cpu"])
    utts = _utterances()
    ctx = run.Context(utts, TextTokenizer(), DIMS, None, torch.device("cpu"), bf16=False)
    [record] = run.run_folds("direct", 0, [iemocap_folds()[0]], cfg, ctx)
    assert record["scores"]["uar"] == 1.0
    for subset in MODALITY_SUBSETS[1:]:
        expected = 1.0 if modality in subset else 0.25  # chance: one class for a balanced test speaker
        got = record["missing_modalities"][subset]["scores"]
        assert got["uar"] == expected and got["wa"] == expected, (subset, got)


def _test_batch(utts: list[Utterance], subset: str) -> Batch:
    tok = TextTokenizer()
    return next(batches(keep_modalities(utts, subset), len(utts), FinetuneConfig().data, tok.cls_id, tok.sep_id))


def _with_other_content(utts: list[Utterance], modality: str) -> list[Utterance]:
    """The same utterances with one modality's content replaced by another utterance's (lengths may change)."""
    donors = utts[1:] + utts[:1]
    field = {"t": ("tokens", "words"), "a": ("audio",), "v": ("visual", "vprob")}[modality]
    return [replace(u, **{f: getattr(d, f) for f in field}) for u, d in zip(utts, donors)]


def _prompt_model() -> PromptModel:
    tok = TextTokenizer()
    template = Template.from_text(PromptConfig().template, tok, "after")
    backbone = tiny_model(seed=4, acoustic_dim=DIMS["acoustic_dim"], visual_dim=DIMS["visual_dim"])
    return PromptModel(backbone, template, tok.label_word_ids(list(PromptConfig().label_words)), 120).eval()


@pytest.mark.parametrize("subset", MODALITY_SUBSETS[1:])
def test_the_prompt_reads_the_kept_modalities_and_nothing_of_the_dropped_ones(subset: str) -> None:
    model = _prompt_model()
    utts = _utterances()[:8]
    with torch.no_grad():
        base = model.vocab_logits(_test_batch(utts, subset))
        for modality in "tav":
            other = model.vocab_logits(_test_batch(_with_other_content(utts, modality), subset))
            if modality in subset:
                assert not torch.allclose(base, other, atol=1e-4), (subset, modality)  # kept: it is read
            else:
                assert torch.equal(base, other), (subset, modality)  # dropped: nothing of it reaches [MASK]
    if "t" not in subset:  # the template alone: [CLS] i am [MASK] . [SEP]
        batch = _test_batch(utts, subset)
        ids, mask, _ = insert_template(batch.text_ids, batch.text_mask, model.template, 120)
        assert mask.all() and ids.shape[1] == len(model.template.ids) + 2


def _fitted(model: nn.Module, utts: list[Utterance]) -> nn.Module:
    tok = TextTokenizer()
    source = lambda: batches(utts, 16, FinetuneConfig().data, tok.cls_id, tok.sep_id)  # noqa: E731
    model.prepare(source, source)
    return model.eval()


BASELINES = {
    "mfn": lambda emb, cfg: MFN(emb, DIMS, cfg, len(CLASSES)),
    "m3er": lambda emb, cfg: M3ER(emb, DIMS, cfg, M3ERConfig(modality_check=False, proxy=False), len(CLASSES)),
}


@pytest.mark.parametrize("name", list(BASELINES))
def test_baselines_see_a_dropped_modality_as_absent_not_as_average_content(name: str) -> None:
    torch.manual_seed(0)
    embeddings = torch.randn(30522, 16, generator=torch.Generator().manual_seed(1))
    cfg = MFNConfig(steps=4, cells=[8, 4, 4], memory=8, dropout=0.0)
    utts = _utterances()[:32]
    model = _fitted(BASELINES[name](embeddings, cfg), utts)
    for subset in MODALITY_SUBSETS[1:]:
        batch = _test_batch(utts, subset)
        aligned = model.inputs(batch)
        kept = torch.tensor(["tav"[i] in subset for i in range(3)])
        assert (aligned.present == kept).all(), subset  # the absent flag follows the subset
        for i in range(3):
            if not kept[i]:
                assert not aligned.seqs[i].any()  # absent: exactly zero after standardization
    # An acoustic track sitting at the training mean standardizes to zeros too: only the flag tells it from absent.
    audio_mean = model.inputs.acoustic_mean.numpy()
    at_mean = [replace(u, audio=np.tile(audio_mean, (len(u.audio), 1))) for u in utts[:8]]
    dropped, average = _test_batch(utts[:8], "tv"), _test_batch(at_mean, "tav")
    with torch.no_grad():
        assert model.inputs(average).seqs[1].abs().max() < 1e-2  # (float16 storage rounds the mean)
        assert not torch.allclose(model(dropped), model(average), atol=1e-4)
        # A dropped modality's content never matters.
        assert torch.equal(model(dropped), model(_test_batch(_with_other_content(utts[:8], "a"), "tv")))
