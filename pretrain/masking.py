"""Masking for the pretraining tasks: whole-word masking of text, span masking of frames (docs/recipe.md).

All randomness comes from the caller's torch.Generator, drawn on the generator's device and moved
to the data's, so a seed reproduces the masks whatever device the batch lives on.
"""

from __future__ import annotations

import torch
from torch import Tensor

IGNORE_INDEX = -100  # label at positions without an MLM target (torch cross_entropy's default ignore_index)


def _uniform(shape: tuple[int, ...], generator: torch.Generator, device: torch.device) -> Tensor:
    return torch.rand(shape, generator=generator, device=generator.device).to(device)


def whole_word_mask(
    text_ids: Tensor,
    word_ids: Tensor,
    prob: float,
    mask_id: int,
    random_ids: tuple[int, int],
    generator: torch.Generator,
) -> tuple[Tensor, Tensor]:
    """Mask whole words with probability `prob` each (at least one per sample that has words), 80/10/10 per word.

    word_ids [B, Lt] is the word index per token, -1 at [CLS]/[SEP]/padding (never masked). Random
    replacements are drawn from ids [low, high) = `random_ids` (the authors' v_range: no special tokens).
    Returns (masked ids, labels): labels hold the original id at masked tokens, IGNORE_INDEX elsewhere.
    """
    device = text_ids.device
    batch = text_ids.shape[0]
    is_word = word_ids >= 0
    num_words = int(word_ids.max()) + 1  # one host sync; word indices are per utterance, so this is small
    if num_words <= 0:  # no sample has a word: nothing to mask
        return text_ids.clone(), torch.full_like(text_ids, IGNORE_INDEX)
    # Per-sample word presence; non-word tokens go to an extra column that is dropped.
    column = torch.where(is_word, word_ids, num_words)
    present = torch.zeros(batch, num_words + 1, dtype=torch.bool, device=device).scatter_(1, column, True)
    present = present[:, :num_words]

    chosen = (_uniform((batch, num_words), generator, device) < prob) & present
    # The authors' "at least one word masked": a sample that drew none gets one word picked uniformly.
    needs_one = present.any(1) & ~chosen.any(1)
    pick = ((_uniform((batch, num_words), generator, device) + 1.0) * present).argmax(1)
    chosen |= needs_one[:, None] & (torch.arange(num_words, device=device)[None] == pick[:, None])

    masked = _per_token(chosen, column)
    labels = torch.where(masked, text_ids, IGNORE_INDEX)
    # 80% [MASK], 10% random tokens, 10% unchanged, decided once per word as the authors' random_wwm_word
    # does (Google's BERT decides per token), so a word is never half [MASK], half itself.
    r = _per_token(_uniform((batch, num_words), generator, device), column)
    low, high = random_ids
    replacements = torch.randint(low, high, tuple(text_ids.shape), generator=generator, device=generator.device).to(device)
    ids = torch.where(masked & (r < 0.8), mask_id, text_ids)
    ids = torch.where(masked & (r >= 0.8) & (r < 0.9), replacements, ids)
    return ids, labels


def _per_token(per_word: Tensor, column: Tensor) -> Tensor:
    """[B, W] word values -> [B, Lt] token values through column (W at non-word tokens: False / 0 there)."""
    pad = torch.zeros(per_word.shape[0], 1, dtype=per_word.dtype, device=per_word.device)
    return torch.cat([per_word, pad], 1).gather(1, column)


def span_mask(
    lengths: Tensor,
    ratio: float,
    span: int,
    generator: torch.Generator,
    max_len: int | None = None,
) -> Tensor:
    """Mockingjay-style span mask over frames: bool [B, max_len] (max_len defaults to the longest length).

    Per sample of real length n: floor(n * ratio / span) spans whose starts are drawn without
    replacement from range(n - span - 1) (spans may overlap); with 0 spans, one random frame.
    Frames at or beyond n (padding) are never masked; n = 0 masks nothing.
    """
    device = lengths.device
    n = lengths.long()
    width = int(n.max()) if max_len is None else max_len
    batch = n.shape[0]
    if batch == 0 or width == 0:
        return torch.zeros(batch, width, dtype=torch.bool, device=device)
    starts_range = (n - span - 1).clamp(min=0)  # the authors' range; the last two starts are never drawn
    num_spans = torch.minimum(torch.floor(n.double() * ratio / span).long(), starts_range)

    # Random keys with out-of-range starts pushed last: the first num_spans of the argsort are a
    # uniform draw without replacement from range(starts_range).
    pos = torch.arange(width, device=device)[None]
    keys = _uniform((batch, width), generator, device).masked_fill(pos >= starts_range[:, None], 2.0)
    starts = keys.argsort(dim=1)
    take = (pos < num_spans[:, None]).long()
    hits = torch.zeros(batch, width + span, dtype=torch.long, device=device)
    for offset in range(span):
        hits.scatter_add_(1, starts + offset, take)
    mask = hits[:, :width] > 0

    # Clips too short for a span: mask one random real frame.
    single = (num_spans == 0) & (n > 0)
    frame = torch.minimum((_uniform((batch,), generator, device) * n).long(), (n - 1).clamp(min=0))
    return mask | (single[:, None] & (pos == frame[:, None]))
