"""WordPiece text encoding: ids as BERT's, word grouping for whole-word masking, truncation, label words."""

from __future__ import annotations

import numpy as np
import pytest

from preprocessing.text import TextTokenizer, default_vocab_folder

SENTENCES = [
    "Hello, the unaffable Mr. O'Neil said: I'm NOT going!!",
    "Café naïve résumé 3.14 — well... ok?",
]


@pytest.fixture(scope="module")
def tok() -> TextTokenizer:
    return TextTokenizer(None)


def test_ids_match_bert_tokenizer(tok: TextTokenizer) -> None:
    from transformers import BertTokenizer  # the slow, pure-Python reference implementation

    ref = BertTokenizer(vocab_file=str(tok.vocab_file), do_lower_case=True)
    for sentence in SENTENCES:
        ids, words = tok.encode(sentence)
        assert ids.dtype == np.int32 and words.dtype == np.int32
        assert ids.tolist() == ref.encode(sentence, add_special_tokens=False)
        # Word grouping: a new word starts exactly at each token that is not a "##" continuation.
        pieces = ref.convert_ids_to_tokens(ids.tolist())
        starts = np.array([not p.startswith("##") for p in pieces])
        assert words.tolist() == (np.cumsum(starts) - 1).tolist()


def test_word_pieces_share_a_word_id_and_punctuation_is_a_word(tok: TextTokenizer) -> None:
    ids, words = tok.encode("the unaffable cat, purring")
    pieces = [tok._tok.id_to_token(i) for i in ids]
    assert pieces[:4] == ["the", "una", "##ffa", "##ble"]
    assert words.tolist()[:4] == [0, 1, 1, 1]
    comma = pieces.index(",")
    assert words[comma] == words[comma - 1] + 1 and words[comma + 1] == words[comma] + 1


def test_truncation_keeps_a_prefix_and_may_cut_a_word(tok: TextTokenizer) -> None:
    full_ids, full_words = tok.encode("the unaffable cat")
    cut = TextTokenizer(None, max_tokens=3)
    ids, words = cut.encode("the unaffable cat")
    assert ids.tolist() == full_ids[:3].tolist() and words.tolist() == [0, 1, 1]
    assert len(full_ids) > 3
    empty_ids, empty_words = tok.encode("")
    assert empty_ids.shape == empty_words.shape == (0,) and empty_ids.dtype == np.int32


def test_special_ids_and_label_words(tok: TextTokenizer) -> None:
    assert (tok.cls_id, tok.sep_id, tok.mask_id, tok.pad_id, tok.vocab_size) == (101, 102, 103, 0, 30522)
    assert tok.first_word_id == 999 and tok._tok.id_to_token(999) == "!"  # after [unused993]: UNITER's v_range
    ids = tok.label_word_ids(["anger", "happy", "neutral", "sad"])
    # bert-base-uncased: anger 4963, happy 3407, neutral 8699, sad 6517 (the ids the authors' prompt scripts use).
    assert ids == [4963, 3407, 8699, 6517]
    assert set(ids) == {8699, 4963, 6517, 3407}
    with pytest.raises(ValueError, match="not one WordPiece"):
        tok.label_word_ids(["unaffable"])


def test_vocab_folder_argument(tmp_path) -> None:
    explicit = TextTokenizer(default_vocab_folder())
    assert explicit.encode(SENTENCES[0])[0].tolist() == TextTokenizer(None).encode(SENTENCES[0])[0].tolist()
    with pytest.raises(FileNotFoundError, match="text.vocab"):
        TextTokenizer(str(tmp_path))
