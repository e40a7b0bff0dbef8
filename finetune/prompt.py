"""Pretrain+Prompt: "[CLS] <text> i am [MASK] . [SEP] <visual> <acoustic>", the MLM head reads the label word.

No new parameters: the template is inserted into the token ids of each batch, and the class scores are
the MLM logits of the label words at [MASK]. Prediction (prompt.scoring): the authors' argmax over the
whole vocabulary, where a word that is not a label word is a wrong prediction (vocab), or the argmax
over the label words only (label_words).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal, Sequence

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from finetune.metrics import NOT_A_CLASS
from pretrain.batch import Batch
from pretrain.model import MEmoBERT
from preprocessing.text import TextTokenizer


@dataclass(frozen=True)
class Template:
    """Template token ids (with one [MASK]), where [MASK] sits in them, and where they go in the text."""

    ids: tuple[int, ...]
    mask_offset: int
    position: Literal["after", "before"] = "after"

    @classmethod
    def from_text(cls, text: str, tokenizer: TextTokenizer, position: Literal["after", "before"]) -> "Template":
        """Tokenize e.g. "i am [MASK] ." with the model's vocabulary."""
        ids = tokenizer.encode(text)[0].tolist()
        masks = [i for i, t in enumerate(ids) if t == tokenizer.mask_id]
        if len(masks) != 1:
            raise ValueError(f"template {text!r} must tokenize to exactly one [MASK], got {ids}")
        return cls(tuple(ids), masks[0], position)


def insert_template(
    text_ids: Tensor, text_mask: Tensor, template: Template, max_text_len: int
) -> tuple[Tensor, Tensor, Tensor]:
    """[CLS] text [SEP] -> [CLS] text template [SEP] (or [CLS] template text [SEP]), per row.

    The utterance text is cut so that text + template fit in `max_text_len` tokens (without [CLS]/[SEP]);
    the template never is. Returns the new ids and mask (right-padded with id 0) and the [MASK] position [B].
    """
    k = len(template.ids)
    if k > max_text_len:
        raise ValueError(f"the template has {k} tokens, more than max_text_len {max_text_len}")
    device = text_ids.device
    n = text_mask.sum(1) - 2  # utterance tokens per row
    keep = n.clamp(max=max_text_len - k)
    total = keep + k + 2
    pos = torch.arange(int(total.max()), device=device)[None]
    one = torch.ones_like(keep)
    tok_start, tpl_start = (one, 1 + keep) if template.position == "after" else (1 + k * one, one)
    tok_start, tpl_start, keep = tok_start[:, None], tpl_start[:, None], keep[:, None]
    in_text = (pos >= tok_start) & (pos < tok_start + keep)
    in_template = (pos >= tpl_start) & (pos < tpl_start + k)
    tpl = torch.tensor(template.ids, dtype=text_ids.dtype, device=device)
    ids = torch.where(in_text, text_ids.gather(1, (pos - tok_start + 1).clamp(0, text_ids.shape[1] - 1)), 0)
    ids = torch.where(in_template, tpl[(pos - tpl_start).clamp(0, k - 1)], ids)
    ids[:, 0] = text_ids[:, 0]  # [CLS]
    sep = text_ids.gather(1, (n + 1)[:, None])  # each row's own [SEP]
    ids = torch.where(pos == total[:, None] - 1, sep, ids)
    return ids, pos < total[:, None], tpl_start[:, 0] + template.mask_offset


def label_word_scores(vocab_logits: Tensor, label_ids: Tensor) -> Tensor:
    """Class scores [N, C]: the MLM logits of the label words only, so no other word can be predicted."""
    return vocab_logits[:, label_ids]


def vocab_predictions(vocab_logits: Tensor, label_ids: Tensor) -> Tensor:
    """Class ids [N] from the argmax over the whole vocabulary; NOT_A_CLASS where it is no label word."""
    best = vocab_logits.argmax(-1)
    hit = best[:, None] == label_ids[None, :]  # [N, C]: at most one True per row (distinct label words)
    return torch.where(hit.any(-1), hit.int().argmax(-1), NOT_A_CLASS)


class PromptModel(nn.Module):
    """A pretrained MEmoBERT as a classifier through its MLM head; adds no parameters."""

    def __init__(
        self,
        backbone: MEmoBERT,
        template: Template,
        label_ids: Sequence[int],
        max_text_len: int,
        loss: Literal["vocab", "label_words"] = "vocab",
        scoring: Literal["vocab", "label_words"] = "vocab",
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.template = template
        self.max_text_len = max_text_len
        self.loss_kind = loss
        self.scoring = scoring
        self.register_buffer("label_ids", torch.tensor(list(label_ids), dtype=torch.long), persistent=False)

    def vocab_logits(self, batch: Batch) -> Tensor:
        """MLM logits over the vocabulary at each sample's [MASK] [B, V]."""
        ids, mask, at = insert_template(batch.text_ids, batch.text_mask, self.template, self.max_text_len)
        batch = dataclasses.replace(batch, text_ids=ids, text_mask=mask, word_ids=torch.full_like(ids, -1))
        positions = torch.arange(ids.shape[0], device=ids.device) * ids.shape[1] + at  # flat [B * Lt] indices
        return self.backbone(batch, head="mlm", positions=positions)  # one row per sample, in batch order

    def forward(self, batch: Batch) -> Tensor:
        return label_word_scores(self.vocab_logits(batch), self.label_ids)

    def classify(self, batch: Batch) -> Tensor:
        """Predicted class ids [B] under the model's scoring (NOT_A_CLASS: a non-label word won, vocab scoring)."""
        logits = self.vocab_logits(batch)
        if self.scoring == "vocab":
            return vocab_predictions(logits, self.label_ids)
        return label_word_scores(logits, self.label_ids).argmax(-1)

    def loss(self, batch: Batch) -> Tensor:
        logits = self.vocab_logits(batch)
        if self.loss_kind == "vocab":
            return F.cross_entropy(logits, self.label_ids[batch.labels])
        return F.cross_entropy(label_word_scores(logits, self.label_ids), batch.labels)
