"""A padded batch of utterances, as the model consumes it, and the collate that builds it."""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Sequence

import numpy as np
import torch

from memobert.schema import Utterance


@dataclass
class Batch:
    """Right-padded tensors; *_mask is True at real positions. text_ids include [CLS] and [SEP].

    Features stay float16 (as stored) until `to()`: converting on the CPU in the loader was two
    thirds of its time (docs/benchmarks.md), casting on the device is nearly free.
    """

    text_ids: torch.Tensor  # long [B, Lt]
    text_mask: torch.Tensor  # bool [B, Lt]
    word_ids: torch.Tensor  # long [B, Lt], word index per token, -1 at [CLS]/[SEP]/padding
    visual: torch.Tensor  # float16 [B, Lv, Dv]
    visual_mask: torch.Tensor  # bool [B, Lv]
    vprob: torch.Tensor  # float16 [B, Lv, 8]
    acoustic: torch.Tensor  # float16 [B, La, Da]
    acoustic_mask: torch.Tensor  # bool [B, La]
    labels: torch.Tensor | None = None  # long [B], downstream only

    @property
    def size(self) -> int:
        return self.text_ids.shape[0]

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> "Batch":
        """Move to a device, then cast floating tensors to `dtype` there (when given)."""
        moved = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if value is not None:
                value = value.to(device, non_blocking=True)
                if dtype is not None and value.is_floating_point():
                    value = value.to(dtype)
            moved[f.name] = value
        return replace(self, **moved)


def collate(
    utts: Sequence[Utterance],
    cls_id: int,
    sep_id: int,
    max_text_len: int,
    max_visual_len: int,
    max_acoustic_len: int,
    label_key: str | None = None,
) -> Batch:
    """Truncate to the max lengths, add [CLS]/[SEP], pad to the longest item of the batch (dynamic padding)."""
    n = len(utts)
    tokens = [u.tokens[:max_text_len] for u in utts]
    lt = max(len(t) for t in tokens) + 2
    text_ids = np.zeros((n, lt), np.int64)
    word_ids = np.full((n, lt), -1, np.int64)
    text_mask = np.zeros((n, lt), bool)
    for i, (utt, tok) in enumerate(zip(utts, tokens)):
        text_ids[i, 0] = cls_id
        text_ids[i, 1 : len(tok) + 1] = tok
        text_ids[i, len(tok) + 1] = sep_id
        word_ids[i, 1 : len(tok) + 1] = utt.words[: len(tok)]
        text_mask[i, : len(tok) + 2] = True

    visual, visual_mask = _pad_frames([u.visual[:max_visual_len] for u in utts])
    vprob, _ = _pad_frames([u.vprob[:max_visual_len] for u in utts])
    acoustic, acoustic_mask = _pad_frames([u.audio[:max_acoustic_len] for u in utts])
    labels = torch.tensor([int(u.meta[label_key]) for u in utts]) if label_key else None
    return Batch(
        text_ids=torch.from_numpy(text_ids),
        text_mask=torch.from_numpy(text_mask),
        word_ids=torch.from_numpy(word_ids),
        visual=visual,
        visual_mask=visual_mask,
        vprob=vprob,
        acoustic=acoustic,
        acoustic_mask=acoustic_mask,
        labels=labels,
    )


def _pad_frames(arrays: list[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
    # Keep at least one (masked-out) column so every batch has the same rank and the model's
    # concatenation never sees an empty modality tensor.
    length = max(1, max(a.shape[0] for a in arrays))
    dim = arrays[0].shape[1]
    out = np.zeros((len(arrays), length, dim), np.float16)
    mask = np.zeros((len(arrays), length), bool)
    for i, a in enumerate(arrays):
        out[i, : a.shape[0]] = a
        mask[i, : a.shape[0]] = True
    return torch.from_numpy(out), torch.from_numpy(mask)
