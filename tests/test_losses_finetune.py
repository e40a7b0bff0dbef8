"""Downstream losses pinned: the classifier, the prompt at [MASK] (both loss modes), MFN and M3ER's multiplicative loss.

Each expected value is recomputed independently in numpy from the model's parameters or its intermediate
outputs, on a small hand-made batch with known labels, and compared to 1e-6.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from finetune.baselines.m3er import M3ER
from finetune.baselines.mfn import MFN
from finetune.config import M3ERConfig, MFNConfig, PromptConfig
from finetune.prompt import PromptModel, Template
from finetune.settings import ClassifierModel
from preprocessing.text import TextTokenizer
from tests.test_model import ACOUSTIC_DIM, VISUAL_DIM, batch_of, make_utterance, tiny_model

SHAPES = [(6, 12, 20), (3, 0, 9), (4, 7, 0), (1, 5, 5)]  # (words, visual, acoustic): two lack a modality
LABELS = torch.tensor([2, 0, 3, 1])


def _utterances():
    rng = np.random.default_rng(21)
    return [make_utterance(rng, str(i), *shape) for i, shape in enumerate(SHAPES)]


def _batch():
    batch = batch_of(_utterances())
    batch.labels = LABELS
    return batch


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))


def _nll(logits: np.ndarray, targets: np.ndarray) -> float:
    """Mean negative log-likelihood of `targets` under softmax(logits), rows = samples."""
    return float(-_log_softmax(logits)[np.arange(len(targets)), targets].mean())


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().double().numpy()


def _linear(x: np.ndarray, layer: torch.nn.Linear) -> np.ndarray:
    return x @ _np(layer.weight).T + _np(layer.bias)


def test_classifier_loss_is_cross_entropy_of_the_authors_head_on_cls() -> None:
    torch.manual_seed(0)
    model = ClassifierModel(tiny_model(seed=1), num_classes=4, dropout=0.1).train()
    batch = _batch()
    torch.manual_seed(5)
    loss = model.loss(batch)
    torch.manual_seed(5)  # the same dropout draws
    with torch.no_grad():
        cls = _np(model.backbone(batch).sequence[:, 0])
        dropout_mask = _np(model.head.dropout(torch.ones(4, cls.shape[1])))  # inverted dropout's 0 / 1/(1-p) factors
    head = model.head
    pooled = np.tanh(_linear(cls, head.pooler[0])) * dropout_mask
    hidden = _linear(pooled, head.output[0])
    hidden = 0.5 * hidden * (1 + np.vectorize(math.erf)(hidden / math.sqrt(2)))  # exact GELU
    norm = head.output[2]
    hidden = (hidden - hidden.mean(-1, keepdims=True)) / np.sqrt(hidden.var(-1, keepdims=True) + norm.eps)
    logits = _linear(hidden * _np(norm.weight) + _np(norm.bias), head.output[3])
    assert (dropout_mask == 0).any()  # the dropout draw is part of what is pinned
    assert loss.item() == pytest.approx(_nll(logits, LABELS.numpy()), rel=1e-6)


def test_mean_pooling_reads_the_mean_of_each_samples_valid_positions_only() -> None:
    """model.classifier_pooling=mean: the head on the mean over the valid text, visual and acoustic states (two of
    the samples lack a modality), recomputed from the per-modality outputs; more padding in the batch changes nothing."""
    torch.manual_seed(0)
    model = ClassifierModel(tiny_model(seed=1), num_classes=4, dropout=0.1, pooling="mean").eval()
    batch = _batch()
    with torch.no_grad():
        logits = model(batch)
        encoded = model.backbone.encode(batch)
        means = []
        for i in range(len(SHAPES)):
            valid = [encoded.text[i][batch.text_mask[i]], encoded.visual[i][batch.visual_mask[i]],
                     encoded.acoustic[i][batch.acoustic_mask[i]]]
            means.append(torch.cat(valid).double().mean(0))
        expected = model.head(torch.stack(means).float())
        longer = batch_of([*_utterances(), make_utterance(np.random.default_rng(3), "long", 30, 40, 60)])
        padded = model(longer)[: len(SHAPES)]
    assert sum(len(v) for v in valid) == SHAPES[-1][0] + 2 + SHAPES[-1][1] + SHAPES[-1][2]  # [CLS] words [SEP] frames
    assert torch.allclose(logits, expected, atol=1e-5)
    assert torch.allclose(padded, logits, atol=1e-5)
    cls_model = ClassifierModel(model.backbone, num_classes=4, dropout=0.1).eval()
    cls_model.head.load_state_dict(model.head.state_dict())
    with torch.no_grad():
        assert not torch.allclose(cls_model(batch), logits, atol=1e-3)  # [CLS] alone reads something else


def _prompt(loss: str, position: str) -> tuple[PromptModel, Template, list[int]]:
    tok = TextTokenizer()
    cfg = PromptConfig()
    template = Template.from_text(cfg.template, tok, position)
    label_ids = tok.label_word_ids(list(cfg.label_words))
    return PromptModel(tiny_model(seed=2), template, label_ids, max_text_len=8, loss=loss).eval(), template, label_ids


def _mask_logits_by_hand(model: PromptModel, template: Template, position: str) -> np.ndarray:
    """MLM logits at [MASK], one sample at a time, the prompt's text built token by token in Python."""
    rows = []
    for utt in _utterances():
        one = batch_of([utt])  # the sample alone: no padding
        words = one.text_ids[0, 1:-1].tolist()[: 8 - len(template.ids)]  # the utterance is cut, never the template
        middle = words + list(template.ids) if position == "after" else list(template.ids) + words
        ids = torch.tensor([[one.text_ids[0, 0].item(), *middle, one.text_ids[0, -1].item()]])
        at = 1 + middle.index(template.ids[template.mask_offset])
        one.text_ids, one.text_mask, one.word_ids = ids, torch.ones_like(ids, dtype=torch.bool), torch.full_like(ids, -1)
        with torch.no_grad():
            rows.append(_np(model.backbone.cls(model.backbone(one).text[0, at][None]))[0])
    return np.stack(rows)


@pytest.mark.parametrize("position", ["after", "before"])
def test_prompt_loss_is_cross_entropy_over_the_vocabulary_at_mask(position: str) -> None:
    model, template, label_ids = _prompt("vocab", position)
    logits = _mask_logits_by_hand(model, template, position)
    assert logits.shape[1] == model.backbone.config.vocab_size
    expected = _nll(logits, np.array(label_ids)[LABELS.numpy()])  # target: the class's label word, in the vocabulary
    with torch.no_grad():
        assert model.loss(_batch()).item() == pytest.approx(expected, rel=1e-6)
        # forward's class scores are the label words' logits at [MASK]
        np.testing.assert_allclose(_np(model(_batch())), logits[:, label_ids], rtol=1e-5, atol=1e-5)


def test_prompt_label_words_loss_is_cross_entropy_over_the_label_words_only() -> None:
    model, template, label_ids = _prompt("label_words", "after")
    logits = _mask_logits_by_hand(model, template, "after")[:, label_ids]
    expected = _nll(logits, LABELS.numpy())
    with torch.no_grad():
        got = model.loss(_batch()).item()
    assert got == pytest.approx(expected, rel=1e-6)
    vocab_model, _, _ = _prompt("vocab", "after")
    with torch.no_grad():
        assert vocab_model.loss(_batch()).item() > got  # the whole vocabulary competes: a larger loss


def _baseline_cfgs() -> tuple[torch.Tensor, dict[str, int], MFNConfig]:
    torch.manual_seed(3)
    embeddings = torch.randn(30522, 24)
    return embeddings, {"acoustic_dim": ACOUSTIC_DIM, "visual_dim": VISUAL_DIM}, MFNConfig(
        steps=4, cells=[8, 4, 6], memory=10, attention_hidden=12, proposal_hidden=8, gate_hidden=8, output_hidden=8)


def test_mfn_loss_is_cross_entropy_of_its_output_network() -> None:
    embeddings, dims, cfg = _baseline_cfgs()
    torch.manual_seed(0)
    model = MFN(embeddings, dims, cfg, 4).eval()
    batch = _batch()
    with torch.no_grad():
        aligned = model.inputs(batch)
        state = model.core(aligned.seqs, aligned.present)
        joint = _np(torch.cat([*state.hidden, state.memory], dim=-1))
        head = model.head  # Linear-ReLU-Dropout-Linear, dropout off in eval
        logits = _linear(np.maximum(_linear(joint, head[0]), 0), head[3])
        assert model.loss(batch).item() == pytest.approx(_nll(logits, LABELS.numpy()), rel=1e-6)


@pytest.mark.parametrize("beta", [0.5, 0.0, 1.0])
def test_m3er_multiplicative_loss_is_the_papers_formula_on_each_views_head(beta: float) -> None:
    # M3ER (Mittal et al. 2020, eq. 2, after Liu et al. 2018), M = 3 modalities, p_i^y the probability
    # view i gives the true class:  L = -sum_i (prod_{j != i} (1 - p_j^y))^(beta / (M - 1)) log p_i^y.
    embeddings, dims, cfg = _baseline_cfgs()
    torch.manual_seed(0)
    m3er = M3ERConfig(modality_check=False, proxy=False, beta=beta)
    model = M3ER(embeddings, dims, cfg, m3er, 4).eval()
    batch = _batch()
    with torch.no_grad():
        state = model.views(batch)
        log_p = []
        for head, h in zip(model.heads, state.hidden):  # each view's head on [h_i; u]
            joint = _np(torch.cat([h, state.memory], dim=-1))
            log_p.append(_log_softmax(_linear(np.maximum(_linear(joint, head[0]), 0), head[3])))
        loss = model.loss(batch).item()
        product = _np(model(batch))
    p_y = np.exp(np.stack(log_p)[:, np.arange(4), LABELS.numpy()])  # [M, B]
    m = len(p_y)
    weights = np.stack([np.prod(np.delete(1 - p_y, i, axis=0), axis=0) ** (beta / (m - 1)) for i in range(m)])
    expected = -(weights * np.log(p_y)).sum(0).mean()  # summed over views, averaged over the batch
    assert loss == pytest.approx(expected, rel=1e-6)
    np.testing.assert_allclose(product, np.stack(log_p).sum(0), rtol=1e-5, atol=1e-6)  # prediction: the product
