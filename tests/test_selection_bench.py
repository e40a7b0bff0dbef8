"""benchmarks/selection.py: its replayed selection is finetune's, step for step and score for score."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from finetune.config import FinetuneConfig
from finetune.run import run_finetune, run_path
from helpers import load_benchmark
from memobert.config import load_config

# The tiny flavor at a large lr, validated every 4 of 64 steps; patience 1, so that finetuning stops at the first
# validation that is no better: 16 strictly rising validation UARs in a row do not happen.
OVERRIDES = ["model.flavor=tiny", "train.lr=3e-3", "train.batch_size=16", "train.steps=64", "train.direct_steps=64",
             "train.val_every=4", "train.patience=1", "train.device=cpu", "seeds=[42]", "folds=[1, 2]"]


@pytest.fixture(scope="module")
def bench():
    return load_benchmark("selection")


def test_replay_keeps_the_first_best_and_stops_after_patience(bench) -> None:
    history = [{"step": s, "val_uar": u} for s, u in [(8, 0.5), (16, 0.6), (24, 0.6), (32, 0.55), (40, 0.9)]]
    assert bench.replay(history, patience=2) == 16  # 24 ties (no better), 32 is worse: stopped before 40
    assert bench.replay(history, patience=3) == 40
    assert bench.replay(history, patience=10**9) == 40


def test_the_replayed_selection_scores_what_finetune_records(bench, tmp_path: Path, labeled_shards: Path) -> None:
    cfg = load_config(FinetuneConfig, overrides=[f"data.shards={labeled_shards}", "settings=[direct]",
                                                 f"out_dir={tmp_path}", *OVERRIDES])
    run_finetune(cfg)
    curves = bench.fold_curves("direct", 42, cfg, ["tav", "v"])
    assert [c["fold"] for c in curves] == [1, 2]
    for curve in curves:
        record = json.loads(run_path(tmp_path, "direct", 42, curve["fold"]).read_text())
        assert curve["steps"] == list(range(4, 65, 4))  # the whole schedule, past finetune's early stop
        recorded = [h["val_uar"] for h in record["history"]]
        assert curve["val_uar"][:len(recorded)] == recorded
        assert curve["selected_step"] == record["selected_step"]
        at = curve["steps"].index(curve["selected_step"])
        assert curve["test_uar"]["tav"][at] == record["scores"]["uar"]
        assert curve["test_uar"]["v"][at] == record["missing_modalities"]["v"]["scores"]["uar"]
        assert len(recorded) < len(curve["steps"])  # finetune stopped early, so the replay had work to do
