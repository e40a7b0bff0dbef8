"""The baselines on the same shards, folds and tables: MFN (mfn.py) and M3ER (m3er.py)."""

from __future__ import annotations

from torch import nn

from finetune.baselines.inputs import load_word_embeddings
from finetune.baselines.m3er import M3ER
from finetune.baselines.mfn import MFN
from finetune.config import FinetuneConfig
from finetune.protocols import CLASSES
from memobert.config import ConfigError
from preprocessing.text import TextTokenizer, text_bert_folder


def build_baseline(setting: str, cfg: FinetuneConfig, dims: dict[str, int], tokenizer: TextTokenizer) -> nn.Module:
    """A fresh `mfn` or `m3er` model (seed torch first), its language input from frozen word embeddings."""
    folder = text_bert_folder(cfg.mfn.word_embeddings)
    embeddings = load_word_embeddings(folder)
    if embeddings.shape[0] < tokenizer.vocab_size:
        raise ConfigError(f"config key 'mfn.word_embeddings': {folder} embeds {embeddings.shape[0]} tokens, "
                          f"the vocabulary has {tokenizer.vocab_size}")
    if setting == "mfn":
        return MFN(embeddings, dims, cfg.mfn, len(CLASSES))
    if setting == "m3er":
        return M3ER(embeddings, dims, cfg.mfn, cfg.m3er, len(CLASSES))
    raise ValueError(f"unknown baseline {setting!r}")
