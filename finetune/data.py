"""Labeled utterances in memory: loading, fold splits by speaker, dropped modalities, batches.

Downstream corpora are small (IEMOCAP: ~5.5K utterances, well under 1 GB once cut to the downstream
lengths), so every sample is read once and kept in memory for all settings, seeds and folds.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from finetune.config import DataConfig
from finetune.protocols import CLASSES, Fold
from memobert.schema import Utterance
from pretrain.batch import Batch, collate
from pretrain.loader import read_shard, shard_paths

# Non-empty subsets of t(ext), a(coustic), v(isual); the first is the full input.
MODALITY_SUBSETS = ("tav", "ta", "tv", "av", "t", "a", "v")
LABEL_KEY = "label"


@dataclass(frozen=True)
class FoldData:
    train: list[Utterance]
    val: list[Utterance]
    test: list[Utterance]


def load_utterances(source: str, cfg: DataConfig) -> list[Utterance]:
    """Every labeled sample of `source`, cut to the downstream lengths (copies: the shard bytes are freed)."""
    utts = []
    for path in shard_paths(source):
        for utt in read_shard(path, cfg.read):
            label = utt.meta.get(LABEL_KEY)
            if not isinstance(label, int) or not 0 <= label < len(CLASSES) or "speaker" not in utt.meta:
                raise ValueError(f"{path}: sample {utt.key!r} needs an int 'label' in 0..{len(CLASSES) - 1} and a 'speaker'")
            utts.append(
                Utterance(
                    key=utt.key,
                    meta=utt.meta,
                    tokens=utt.tokens[: cfg.max_text_len].copy(),
                    words=utt.words[: cfg.max_text_len].copy(),
                    audio=utt.audio[: cfg.max_acoustic_len].copy(),
                    visual=utt.visual[: cfg.max_visual_len].copy(),
                    vprob=utt.vprob[: cfg.max_visual_len].copy(),
                )
            )
    if not utts:
        raise ValueError(f"no samples in {source!r}")
    return utts


def feature_dims(utts: Sequence[Utterance]) -> dict[str, int]:
    """ModelConfig's feature dims, as the shards store them."""
    first = utts[0]
    return {"acoustic_dim": first.audio.shape[1], "visual_dim": first.visual.shape[1], "vprob_dim": first.vprob.shape[1]}


def split_fold(utts: Sequence[Utterance], fold: Fold) -> FoldData:
    """Train / validation / test samples of a fold, by speaker; speakers outside the fold are left out."""
    train = set(fold.train)
    return FoldData(
        train=[u for u in utts if u.meta["speaker"] in train],
        val=[u for u in utts if u.meta["speaker"] == fold.val],
        test=[u for u in utts if u.meta["speaker"] == fold.test],
    )


def label_subset(utts: Sequence[Utterance], fraction: float, seed: int) -> list[Utterance]:
    """A seeded share `fraction` of `utts` drawn per class (at least one of each class present), in input order.

    Draws depend only on the seed and the utterance keys, not on the order the shards were read in.
    """
    if fraction >= 1.0:
        return list(utts)
    rng = np.random.default_rng(seed)
    chosen: set[str] = set()
    for label in sorted({u.meta[LABEL_KEY] for u in utts}):
        keys = sorted(u.key for u in utts if u.meta[LABEL_KEY] == label)
        count = max(1, round(fraction * len(keys)))
        chosen.update(keys[int(i)] for i in rng.choice(len(keys), size=count, replace=False))
    return [u for u in utts if u.key in chosen]


def keep_modalities(utts: Sequence[Utterance], subset: str) -> list[Utterance]:
    """The utterances with the modalities outside `subset` made empty: no text tokens, zero frames."""
    if subset == "tav":
        return list(utts)
    out = []
    for u in utts:
        changes = {}
        if "t" not in subset:  # collate then gives [CLS] [SEP]
            changes.update(tokens=u.tokens[:0], words=u.words[:0])
        if "a" not in subset:
            changes.update(audio=u.audio[:0])
        if "v" not in subset:
            changes.update(visual=u.visual[:0], vprob=u.vprob[:0])
        out.append(dataclasses.replace(u, **changes))
    return out


def batches(
    utts: Sequence[Utterance],
    batch_size: int,
    cfg: DataConfig,
    cls_id: int,
    sep_id: int,
    generator: torch.Generator | None = None,
) -> Iterator[Batch]:
    """Batches with labels, shuffled when a generator is given (training), else in order."""
    order = torch.randperm(len(utts), generator=generator).tolist() if generator is not None else list(range(len(utts)))
    for start in range(0, len(order), batch_size):
        chunk = [utts[i] for i in order[start : start + batch_size]]
        yield collate(chunk, cls_id, sep_id, cfg.max_text_len, cfg.max_visual_len, cfg.max_acoustic_len, LABEL_KEY)


def labels_of(utts: Sequence[Utterance]) -> np.ndarray:
    """The class ids of the utterances, in order."""
    return np.array([u.meta[LABEL_KEY] for u in utts], dtype=np.int64)
