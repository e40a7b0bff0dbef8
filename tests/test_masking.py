"""Whole-word masking and span masking: ratios, shapes of the masks, untouched specials/padding, seeding."""

from __future__ import annotations

import math

import pytest
import torch

from pretrain import masking
from pretrain.masking import IGNORE_INDEX, span_mask, whole_word_mask
from tests.test_model import MASK_ID, RANDOM_IDS, make_batch


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _word_status(word_ids: torch.Tensor, masked: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per (sample, word): how many of its tokens are masked, and how many tokens it has."""
    num_words = int(word_ids.max()) + 1
    col = torch.where(word_ids >= 0, word_ids, num_words)
    tokens = torch.zeros(word_ids.shape[0], num_words + 1).scatter_add_(1, col, torch.ones(word_ids.shape))
    hits = torch.zeros(word_ids.shape[0], num_words + 1).scatter_add_(1, col, masked.float())
    return hits[:, :num_words], tokens[:, :num_words]


def test_whole_word_mask_ratio_whole_words_and_80_10_10() -> None:
    batch = make_batch([(30, 1, 1)] * 400, seed=1)
    ids, labels = whole_word_mask(batch.text_ids, batch.word_ids, 0.15, MASK_ID, RANDOM_IDS, _gen(0))
    masked = labels != IGNORE_INDEX
    hits, tokens = _word_status(batch.word_ids, masked)
    # Whole words: a word is masked in all its tokens or in none.
    assert torch.all((hits == 0) | (hits == tokens))
    word_rate = (hits > 0).float().sum() / (tokens > 0).float().sum()
    assert abs(word_rate.item() - 0.15) < 0.01  # 12,000 words: std ~0.003
    assert torch.equal(labels[masked], batch.text_ids[masked])
    kept = (ids[masked] == batch.text_ids[masked]).float().mean().item()
    as_mask = (ids[masked] == MASK_ID).float().mean().item()
    assert abs(as_mask - 0.8) < 0.03 and abs(kept - 0.1) < 0.03 and abs(1 - as_mask - kept - 0.1) < 0.03
    assert torch.equal(ids[~masked], batch.text_ids[~masked])
    # The authors decide 80/10/10 per word: a masked word is [MASK] in all its tokens or in none.
    as_mask_hits, _ = _word_status(batch.word_ids, masked & (ids == MASK_ID))
    assert torch.all((as_mask_hits == 0) | (as_mask_hits == tokens))
    assert ((as_mask_hits > 0) & (tokens > 1)).any()  # multi-token words were masked: the check above bites
    replaced = masked & (ids != MASK_ID) & (ids != batch.text_ids)
    assert replaced.any() and ids[replaced].min() >= RANDOM_IDS[0]  # never a special or [unusedN] token


def test_whole_word_mask_at_least_one_word_and_specials_untouched() -> None:
    batch = make_batch([(1, 1, 1), (2, 1, 1), (0, 1, 1), (12, 1, 1)], seed=2)
    specials = batch.word_ids < 0  # [CLS], [SEP], padding
    for seed in range(50):
        ids, labels = whole_word_mask(batch.text_ids, batch.word_ids, 0.15, MASK_ID, RANDOM_IDS, _gen(seed))
        masked = labels != IGNORE_INDEX
        assert masked.sum(1).tolist()[2] == 0  # no words: nothing masked
        assert all(masked[i].any() for i in (0, 1, 3))
        assert not masked[specials].any()
        assert torch.equal(ids[specials], batch.text_ids[specials])


def test_whole_word_mask_no_words_anywhere() -> None:
    batch = make_batch([(0, 1, 1), (0, 1, 1)])
    ids, labels = whole_word_mask(batch.text_ids, batch.word_ids, 0.15, MASK_ID, RANDOM_IDS, _gen(0))
    assert torch.equal(ids, batch.text_ids) and torch.all(labels == IGNORE_INDEX)


def test_whole_word_mask_reproducible_from_seed() -> None:
    batch = make_batch([(20, 1, 1)] * 8, seed=3)
    a = whole_word_mask(batch.text_ids, batch.word_ids, 0.15, MASK_ID, RANDOM_IDS, _gen(7))
    b = whole_word_mask(batch.text_ids, batch.word_ids, 0.15, MASK_ID, RANDOM_IDS, _gen(7))
    c = whole_word_mask(batch.text_ids, batch.word_ids, 0.15, MASK_ID, RANDOM_IDS, _gen(8))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[1], c[1])


def _runs(row: torch.Tensor) -> list[int]:
    """Lengths of the maximal runs of True in a 1-d bool tensor."""
    runs, current = [], 0
    for value in row.tolist() + [False]:
        if value:
            current += 1
        elif current:
            runs.append(current)
            current = 0
    return runs


def test_span_mask_ratio() -> None:
    lengths = torch.full((2000,), 100)
    mask = span_mask(lengths, 0.15, 3, _gen(0))
    # 5 spans of 3 out of 100 frames; overlapping draws make it slightly less than 15%.
    rate = mask.float().mean().item()
    assert 0.13 < rate <= 0.15


def test_span_mask_spans_padding_and_short_clips() -> None:
    lengths = torch.arange(0, 65).repeat(8)  # every length 0..64, several draws each
    ratio, span, width = 0.2, 3, 70
    mask = span_mask(lengths, ratio, span, _gen(1), max_len=width)
    assert mask.shape == (len(lengths), width)
    for row, n in zip(mask, lengths.tolist()):
        assert not row[n:].any()  # padding never masked
        spans = math.floor(n * ratio / span)
        if n == 0:
            assert not row.any()
        elif spans == 0:
            assert row.sum() == 1  # too short for a span: one random frame
        else:
            runs = _runs(row)
            assert all(r >= span for r in runs)  # contiguous spans of 3 (overlaps merge into longer runs)
            assert span <= row.sum() <= spans * span
            assert not row[n - 2 :].any()  # starts come from range(n - span - 1)


def test_span_mask_reproducible_from_seed() -> None:
    lengths = torch.tensor([36, 20, 64, 5, 0])
    assert torch.equal(span_mask(lengths, 0.2, 3, _gen(3)), span_mask(lengths, 0.2, 3, _gen(3)))
    draws = {tuple(span_mask(lengths, 0.2, 3, _gen(s)).flatten().tolist()) for s in range(5)}
    assert len(draws) > 1


def test_whole_word_mask_of_one_word_utterances_masks_that_word() -> None:
    text_ids = torch.tensor([[101, 2000, 2001, 102], [101, 3000, 102, 0]])
    word_ids = torch.tensor([[-1, 0, 0, -1], [-1, 0, -1, -1]])
    _, labels = whole_word_mask(text_ids, word_ids, 0.15, MASK_ID, RANDOM_IDS, torch.Generator().manual_seed(0))
    assert labels.tolist() == [[IGNORE_INDEX, 2000, 2001, IGNORE_INDEX], [IGNORE_INDEX, 3000, IGNORE_INDEX, IGNORE_INDEX]]


def test_span_mask_edge_shapes_and_the_authors_start_range() -> None:
    gen = torch.Generator().manual_seed(0)
    empty = span_mask(torch.zeros(0, dtype=torch.long), 0.15, 3, gen, max_len=4)
    assert empty.shape == (0, 4) and empty.dtype == torch.bool
    silent = span_mask(torch.zeros(2, dtype=torch.long), 0.15, 3, gen)
    assert silent.shape == (2, 0) and silent.dtype == torch.bool
    assert span_mask(torch.tensor([1]), 0.15, 3, gen).tolist() == [[True]]  # one sample, one frame: masked
    # n = 5, span 3: starts from range(5 - 3 - 1) = {0}, one span (floor(5 * 0.8 / 3) = 1): frames 0-2.
    assert span_mask(torch.tensor([5]), 0.8, 3, gen).tolist() == [[True, True, True, False, False]]
    # n = 4: range(0) is empty, so no span however high the ratio: one random frame.
    assert int(span_mask(torch.tensor([4]), 0.8, 3, gen).sum()) == 1


def test_the_single_frame_of_a_short_clip_is_drawn_uniformly() -> None:
    frames = [int(span_mask(torch.tensor([2]), 0.15, 3, torch.Generator().manual_seed(s)).long().argmax()) for s in range(40)]
    assert set(frames) == {0, 1}


def test_whole_word_mask_draw_boundaries(monkeypatch: pytest.MonkeyPatch) -> None:
    # The three uniform draws set by hand, to pin the interval ends: a word is chosen when its draw is
    # below prob (strictly); a chosen word becomes [MASK] on [0, 0.8), a random id on [0.8, 0.9), itself on [0.9, 1).
    text_ids = torch.tensor([[101, 2000, 2001, 2002, 2003, 102]])
    word_ids = torch.tensor([[-1, 0, 1, 2, 3, -1]])
    draws = iter([
        torch.tensor([[0.5, 0.0, 0.0, 0.0]]),  # choice: word 0 exactly at prob 0.5, so not chosen
        torch.zeros(1, 4),  # the "at least one word" pick, unused here
        torch.tensor([[0.0, 0.8, 0.9, 0.0]]),  # 80/10/10: word 1 exactly at 0.8, word 2 exactly at 0.9
    ])
    monkeypatch.setattr(masking, "_uniform", lambda shape, generator, device: next(draws))
    ids, labels = whole_word_mask(text_ids, word_ids, 0.5, MASK_ID, (999, 1000), _gen(0))  # random ids: 999 only
    assert labels.tolist() == [[IGNORE_INDEX, IGNORE_INDEX, 2001, 2002, 2003, IGNORE_INDEX]]
    assert ids.tolist() == [[101, 2000, 999, 2002, MASK_ID, 102]]


def test_span_mask_follows_the_device_of_its_lengths() -> None:
    # "meta" holds no values, so any tensor left on the generator's (CPU) device mixes devices and raises;
    # the draws on the CPU generator are moved over (a CUDA batch with a CPU generator is the real case).
    for lengths in (torch.tensor([0, 4, 30]), torch.zeros(0, dtype=torch.long)):
        mask = span_mask(lengths.to("meta"), 0.2, 3, _gen(0), max_len=30)
        assert mask.device.type == "meta" and mask.shape == (len(lengths), 30) and mask.dtype == torch.bool
