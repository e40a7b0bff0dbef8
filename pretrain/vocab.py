"""The special token ids the pretraining loop needs, from the vocabulary the shards were tokenized with."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from memobert.shard_store import folder_manifest
from pretrain.config import PretrainConfig


@dataclass(frozen=True)
class SpecialIds:
    cls: int
    sep: int
    mask: int
    pad: int
    vocab_size: int
    first_word: int  # ids from here up are real WordPieces (no [unusedN] or specials)

    @property
    def random_ids(self) -> tuple[int, int]:
        """The ids WWMLM's random replacements are drawn from, [low, high)."""
        return self.first_word, self.vocab_size


def vocab_folder(cfg: PretrainConfig) -> str | None:
    """The shards' manifest vocab (extractors.text.vocab), else init_from's vocab.txt, else None (bundled)."""
    manifest = folder_manifest(cfg.data.train_shards) if cfg.data.train_shards else None
    if manifest is not None:
        recorded = manifest.extractors.get("text", {}).get("vocab")
        if recorded:
            return recorded
    folder = cfg.model.text_bert
    if folder is not None and (Path(folder) / "vocab.txt").is_file():
        return folder
    return None


def special_ids(cfg: PretrainConfig) -> SpecialIds:
    """[CLS], [SEP], [MASK], [PAD] ids, the vocab size and the first real word id of the run's vocabulary."""
    from preprocessing.text import TextTokenizer

    tok = TextTokenizer(vocab_folder(cfg))
    return SpecialIds(cls=tok.cls_id, sep=tok.sep_id, mask=tok.mask_id, pad=tok.pad_id, vocab_size=tok.vocab_size,
                      first_word=tok.first_word_id)
