"""The prompt classifier on a tiny MEmoBERT: where it reads [MASK], its two scorings and its two losses."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from finetune.metrics import NOT_A_CLASS
from finetune.prompt import PromptModel, Template, insert_template, label_word_scores, vocab_predictions
from preprocessing.text import TextTokenizer
from tests.test_model import MASK_ID, make_batch, tiny_model

TEMPLATE = Template((1045, 2572, MASK_ID, 1012), 2, "after")  # "i am [MASK] ." in bert-base-uncased
LABEL_IDS = (4963, 3407, 8699, 6517)  # anger, happy, neutral, sad


def _prompt(max_text_len: int = 20, **kinds: str) -> PromptModel:
    """The prompt model; loss and scoring left out are PromptModel's defaults (the authors' vocab)."""
    return PromptModel(tiny_model(), TEMPLATE, LABEL_IDS, max_text_len, **kinds).eval()


def _batch():
    batch = make_batch([(3, 4, 6), (7, 2, 5), (1, 3, 3)], seed=1)
    return dataclasses.replace(batch, labels=torch.tensor([2, 0, 3]))


def test_vocab_logits_are_the_mlm_head_at_each_samples_mask() -> None:
    model, batch = _prompt(max_text_len=6), _batch()  # 6 tokens: the 7-word sample is cut to 2 of its tokens
    with torch.no_grad():
        got = model.vocab_logits(batch)
        ids, mask, at = insert_template(batch.text_ids, batch.text_mask, TEMPLATE, 6)
        templated = dataclasses.replace(batch, text_ids=ids, text_mask=mask, word_ids=torch.full_like(ids, -1))
        for i in range(batch.size):
            # Sample i alone, read at its own [MASK]: the batch's row i is exactly that.
            alone = model.backbone(templated, head="mlm", positions=torch.tensor([i * ids.shape[1] + int(at[i])]))
            assert torch.allclose(got[i], alone[0], atol=1e-5)
            assert ids[i, at[i]] == MASK_ID


def test_forward_gives_the_label_words_logits_in_class_order() -> None:
    model, batch = _prompt(), _batch()
    with torch.no_grad():
        vocab = model.vocab_logits(batch)
        assert torch.equal(model(batch), vocab[:, list(LABEL_IDS)])


def test_label_words_scoring_is_the_argmax_over_the_label_words() -> None:
    model, batch = _prompt(scoring="label_words"), _batch()
    with torch.no_grad():
        assert torch.equal(model.classify(batch), model.vocab_logits(batch)[:, list(LABEL_IDS)].argmax(-1))


def test_vocab_scoring_names_no_class_unless_a_label_word_wins_the_vocabulary() -> None:
    model, batch = _prompt(), _batch()  # the default scoring
    with torch.no_grad():
        winner = model.vocab_logits(batch).argmax(-1)
        expected = [LABEL_IDS.index(w) if w in LABEL_IDS else NOT_A_CLASS for w in winner.tolist()]
        assert model.classify(batch).tolist() == expected
        # Make label word 2 ("neutral") win sample 1's vocabulary through the MLM output bias.
        model.backbone.cls.predictions.bias.data[LABEL_IDS[2]] = 1e4
        assert model.classify(batch).tolist() == [2, 2, 2]


def test_verbaliser_on_hand_made_logits() -> None:
    logits = torch.zeros(4, 30)
    label_ids = torch.tensor([7, 3, 11, 20])
    logits[0, 11] = 5.0  # label word of class 2 wins
    logits[1, 3] = 5.0  # class 1
    logits[2, 29] = 5.0  # no label word wins
    logits[3, 20], logits[3, 0] = 5.0, 6.0  # class 3 leads the label words, a non-label word the vocabulary
    assert vocab_predictions(logits, label_ids).tolist() == [2, 1, NOT_A_CLASS, NOT_A_CLASS]
    assert label_word_scores(logits, label_ids).argmax(-1).tolist() == [2, 1, 0, 3]
    assert torch.equal(label_word_scores(logits, label_ids), logits[:, [7, 3, 11, 20]])


@pytest.mark.parametrize("kind", ["vocab", "label_words"])
def test_losses_are_cross_entropy_over_the_vocabulary_or_the_label_words(kind: str) -> None:
    model, batch = (_prompt() if kind == "vocab" else _prompt(loss=kind)), _batch()  # vocab: the default
    with torch.no_grad():
        vocab = model.vocab_logits(batch).double()
        loss = model.loss(batch).double()
    if kind == "vocab":  # the label word's log-probability among all words
        expected = -(vocab.log_softmax(-1)[torch.arange(3), torch.tensor(LABEL_IDS)[batch.labels]]).mean()
    else:  # among the label words only
        expected = -(vocab[:, list(LABEL_IDS)].log_softmax(-1)[torch.arange(3), batch.labels]).mean()
    assert loss.item() == pytest.approx(expected.item(), abs=1e-5)


@pytest.mark.parametrize("position", ["after", "before"])
def test_a_template_from_text_keeps_its_position_and_finds_its_mask(position: str) -> None:
    template = Template.from_text("i am [MASK] .", TextTokenizer(), position)
    assert template == Template(TEMPLATE.ids, 2, position)


def test_the_prompt_model_adds_no_state_to_the_backbone() -> None:
    model = _prompt()
    assert set(model.state_dict()) == {f"backbone.{key}" for key in model.backbone.state_dict()}
    assert model.label_ids.dtype == torch.long and model.label_ids.tolist() == list(LABEL_IDS)


def test_a_template_may_fill_max_text_len_but_not_exceed_it() -> None:
    batch = _batch()
    ids, mask, at = insert_template(batch.text_ids, batch.text_mask, TEMPLATE, max_text_len=4)
    assert ids[:, 1:5].tolist() == [list(TEMPLATE.ids)] * 3 and at.tolist() == [3, 3, 3]  # no utterance token left
    with pytest.raises(ValueError, match="^the template has 4 tokens, more than max_text_len 3$"):
        insert_template(batch.text_ids, batch.text_mask, TEMPLATE, max_text_len=3)
