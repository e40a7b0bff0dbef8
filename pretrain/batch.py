"""A padded batch of utterances, the collate that builds it, and its staging onto the device.

Staging keeps the training step free of host-device syncs: whatever the step needs to know (masks,
the packed layout, target positions, counts) is computed on the host copy and uploaded, so the
host never waits for the device to learn a value and keeps queueing kernels ahead of it.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import NamedTuple, Sequence

import numpy as np
import torch
from torch import Tensor

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

    def pin_memory(self) -> "Batch":
        """Page-locked copy (DataLoader(pin_memory=True) calls this): its uploads then need no sync."""
        return replace(self, **{f.name: v.pin_memory() for f in fields(self) if (v := getattr(self, f.name)) is not None})


class PackedLayout(NamedTuple):
    """Where each modality's positions go when the three are packed compactly per sample."""

    gather: Tensor  # long [B, L]: index into the modalities concatenated along dim 1
    mask: Tensor  # bool [B, L]: real positions of the packed sequence (L = longest total)
    unpack: tuple[Tensor, ...]  # per modality long [B, Lm]: packed position of each position (0 at padding)


def compact_layout(masks: Sequence[Tensor]) -> PackedLayout:
    """Index maps for packing right-padded modalities (valid text, valid visual, valid acoustic, then padding).

    Reads one value (the packed width) from the masks: pass host masks (stage() does) to avoid a sync.
    """
    lengths = [m.sum(1) for m in masks]
    total = torch.stack(lengths).sum(0)
    width = int(total.max())
    device = masks[0].device
    pos = torch.arange(width, device=device)[None]
    gather = torch.zeros(total.shape[0], width, dtype=torch.long, device=device)
    start = torch.zeros_like(total)
    offset = 0
    unpack = []
    for m, n in zip(masks, lengths):
        s = start[:, None]
        inside = (pos >= s) & (pos < s + n[:, None])
        gather = torch.where(inside, offset + pos - s, gather)
        own = torch.arange(m.shape[1], device=device)[None]
        unpack.append(torch.where(m, s + own, 0))
        start = start + n
        offset += m.shape[1]
    return PackedLayout(gather, pos < total[:, None], tuple(unpack))


def flat_positions(mask: Tensor) -> Tensor:
    """Indices of the True entries of a [B, L] mask in its flattened [B * L] form (the heads' `positions`)."""
    return mask.flatten().nonzero().squeeze(1)


def at_positions(values: Tensor, positions: Tensor) -> Tensor:
    """Rows of `values` [B, L, ...] at flat `positions` [N] -> [N, ...], without reading the device."""
    return values.flatten(0, 1).index_select(0, positions)


@dataclass
class Staged:
    """A micro-batch ready for the model: the host batch (masks are drawn from it), its device copy and layout.

    `device` holds the features in the model's dtype, its inputs; `stored` holds them as the shards do
    (float16), the targets of frame regression and KL: bf16 would round them to 3 significant digits.
    """

    host: Batch
    device: Batch
    layout: PackedLayout
    stored: Batch

    def upload(self, tensor: Tensor) -> Tensor:
        """A host tensor on the device, copied asynchronously (pinned first, since pageable copies sync)."""
        return _upload(tensor, self.device.text_ids.device)

    @property
    def num_positions(self) -> int:
        """Real (non-padding) positions of the packed sequences, counted on the host."""
        h = self.host
        return int(h.text_mask.sum() + h.visual_mask.sum() + h.acoustic_mask.sum())


def stage(batch: Batch, device: torch.device | str = "cpu", dtype: torch.dtype | None = None) -> Staged:
    """Upload a host batch (features cast to `dtype` on the device) with its packed layout computed on the host."""
    layout = compact_layout([batch.text_mask, batch.visual_mask, batch.acoustic_mask])
    device = torch.device(device)
    stored = batch.to(device)  # one upload, in the shards' precision; the cast below runs on the device
    return Staged(
        host=batch,
        device=stored if dtype is None else stored.to(device, dtype=dtype),
        layout=PackedLayout(
            _upload(layout.gather, device), _upload(layout.mask, device), tuple(_upload(u, device) for u in layout.unpack)
        ),
        stored=stored,
    )


def _upload(tensor: Tensor, device: torch.device) -> Tensor:
    if device.type == "cuda" and tensor.device.type == "cpu" and not tensor.is_pinned():
        tensor = tensor.pin_memory()
    return tensor.to(device, non_blocking=True)


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
