"""benchmarks/linear_eval.py: readouts of frozen encoder states in finetuning's folds, on tiny labeled shards."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from finetune.config import FinetuneConfig
from finetune.data import labels_of
from finetune.protocols import folds_for
from finetune.run import build_and_prepare, fold_data, load_context
from helpers import TINY_DIMS, load_benchmark
from memobert.config import load_config
from pretrain.config import ModelConfig
from pretrain.model import MEmoBERT


@pytest.fixture(scope="module")
def bench():
    return load_benchmark("linear_eval")


def test_each_readout_reads_its_own_block_in_finetunings_folds(bench, labeled_shards: Path) -> None:
    """Hand-made states: the visual block shows the class, the others are noise; all ten folds."""
    cfg = load_config(FinetuneConfig, overrides=[f"data.shards={labeled_shards}", "folds=[]"])
    ctx = load_context(cfg, needs_checkpoint=False)
    labels = labels_of(ctx.utts)
    rng = np.random.default_rng(0)
    noise = {name: rng.normal(size=(len(labels), 8)) for name in ("cls", "t", "a")}
    visual = np.eye(4)[labels] + 0.3 * rng.normal(size=(len(labels), 4))
    uar = bench.readout_uar({**noise, "v": visual}, ctx, cfg, seed=42)
    assert set(uar) == set(bench.READOUTS)
    assert uar["v"] > 0.9 and uar["late"] > 0.8  # the noise probes' near-uniform probabilities leave v's vote
    assert max(uar["cls"], uar["t"], uar["a"]) < 0.45  # chance 0.25; ten folds of 16 test utterances


def test_frozen_checkpoint_and_random_init_beat_chance_on_shards_with_a_class_signal(
    bench, labeled_shards: Path, tmp_path: Path
) -> None:
    torch.manual_seed(0)
    folder = tmp_path / "model"
    MEmoBERT.from_config(ModelConfig(flavor="tiny", acoustic_dim=TINY_DIMS["audio"], visual_dim=TINY_DIMS["visual"],
                                     vprob_dim=TINY_DIMS["vprob"]), vocab_size=30522).save_pretrained(folder)
    out = tmp_path / "linear_eval.json"
    result = bench.main(["--shards", str(labeled_shards), "--checkpoint", str(folder), "--folds", "[1,2,3,4]",
                         "--fractions", "0.5,1.0", "--seeds", "[42,43]", "--out", str(out)])
    assert json.loads(out.read_text()) == result
    assert list(result) == [bench.RANDOM_INIT, str(folder)]
    for by_fraction in result.values():
        assert list(by_fraction) == ["0.5", "1.0"]
        for uar in by_fraction.values():
            assert set(uar) == set(bench.READOUTS)
            assert uar["cls"] > 0.4 and uar["late"] > 0.4  # chance 0.25: every modality carries the class


def test_the_random_init_is_directs_start(bench, labeled_shards: Path, tmp_path: Path) -> None:
    """The weights finetune's Direct run of the same seed starts from, the checkpoint's shape, not its weights."""
    like = MEmoBERT.from_config(ModelConfig(flavor="tiny", acoustic_dim=TINY_DIMS["audio"],
                                            visual_dim=TINY_DIMS["visual"], vprob_dim=TINY_DIMS["vprob"]),
                                vocab_size=30522)
    cfg = load_config(FinetuneConfig, overrides=[f"data.shards={labeled_shards}", "folds=[1]"])
    ctx = replace(load_context(cfg, needs_checkpoint=False), pretrained=like)
    fold = folds_for("iemocap")[0]
    direct, _ = build_and_prepare("direct", 43, fold, fold_data(fold, 43, cfg, ctx), cfg, ctx)
    start = bench.random_init(ctx, cfg, like, 43).state_dict()
    assert start.keys() == direct.backbone.state_dict().keys()
    assert all(torch.equal(value, direct.backbone.state_dict()[k]) for k, value in start.items())
    embeddings = "bert.embeddings.word_embeddings.weight"
    assert not torch.equal(start[embeddings], like.state_dict()[embeddings])
    assert not torch.equal(start[embeddings], bench.random_init(ctx, cfg, like, 42).state_dict()[embeddings])
