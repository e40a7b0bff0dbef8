"""data.label_fraction: a seeded, per-class share of the training speakers' utterances; the other speakers untouched."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from finetune.config import FinetuneConfig
from finetune.data import label_subset, load_utterances, split_fold
from finetune.protocols import iemocap_folds
from finetune.run import run_finetune, run_path
from memobert.config import ConfigError, load_config
from memobert.schema import Utterance


def _utts(per_class: tuple[int, ...]) -> list[Utterance]:
    """Utterances with `per_class[c]` of class c, keys in a shuffled order (the subset must not depend on it)."""
    labels = [c for c, n in enumerate(per_class) for _ in range(n)]
    order = np.random.default_rng(7).permutation(len(labels))
    return [Utterance(key=f"u{i:04d}", meta={"speaker": "Ses01F", "label": labels[i]}, tokens=np.arange(5, 8),
                      words=np.arange(3), audio=np.ones((2, 4)), visual=np.ones((2, 4)), vprob=np.ones((2, 8)))
            for i in order]


def test_the_subset_keeps_each_class_share_and_follows_the_seed() -> None:
    utts = _utts((40, 20, 100, 10))
    subset = label_subset(utts, 0.3, seed=42)
    assert Counter(u.meta["label"] for u in subset) == {0: 12, 1: 6, 2: 30, 3: 3}
    chosen = {u.key for u in subset}
    assert [u.key for u in subset] == [u.key for u in utts if u.key in chosen]  # input order kept
    assert [u.key for u in label_subset(utts, 0.3, seed=42)] == [u.key for u in subset]
    assert {u.key for u in label_subset(utts, 0.3, seed=43)} != {u.key for u in subset}
    # The draw depends on the keys, not on the order the shards were read in.
    assert {u.key for u in label_subset(utts[::-1], 0.3, seed=42)} == {u.key for u in subset}
    # A class too small for its share keeps one utterance; fraction 1.0 keeps everything.
    assert Counter(u.meta["label"] for u in label_subset(utts, 0.01, seed=0)) == {0: 1, 1: 1, 2: 1, 3: 1}
    assert [u.key for u in label_subset(utts, 1.0, seed=0)] == [u.key for u in utts]


@pytest.mark.parametrize("value", [0, -0.5, 1.5])
def test_a_fraction_outside_0_1_names_the_key(value: float) -> None:
    with pytest.raises(ConfigError, match=r"'data\.label_fraction'"):
        load_config(FinetuneConfig, overrides=[f"data.label_fraction={value}"])


def test_only_training_speakers_lose_labels_and_the_report_says_so(tmp_path: Path, labeled_shards: Path) -> None:
    # The probe setting: the real driver, records and report, without a model to train.
    out = tmp_path / "ft"
    cfg = load_config(FinetuneConfig, overrides=[f"data.shards={labeled_shards}", "settings=probe", "seeds=[1, 2]",
                                                 "folds=[1]", "data.label_fraction=0.25", f"out_dir={out}"])
    md = run_finetune(cfg).read_text()
    fold = iemocap_folds()[0]
    full = split_fold(load_utterances(str(labeled_shards), cfg.data), fold)
    trained = []
    for seed in (1, 2):
        record = json.loads(run_path(out, "probe", seed, 1).read_text())
        assert record["label_fraction"] == 0.25
        # 128 training utterances, 32 per class -> 8 per class; validation and test speakers keep all 16.
        assert record["samples"] == {"train": 32, "val": len(full.val), "test": len(full.test)} == {
            "train": 32, "val": 16, "test": 16}
        assert set(record["predictions"]) == {u.key for u in full.test}
        trained.append({u.key for u in label_subset(full.train, 0.25, seed)})
    assert trained[0] != trained[1]  # each seed draws its own subset
    assert "Label fraction 0.25: a share of 25% of the training speakers' utterances" in md
    assert "validation and test speakers keep all of theirs" in md
