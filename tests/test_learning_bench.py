"""benchmarks/learning.py: the ASD check on a hand-made ground truth, and learning.json's keys assembled from small
run records (the ceilings themselves: test_ceilings.py)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from finetune.data import MODALITY_SUBSETS
from helpers import load_benchmark
from memobert.schema import Utterance
from preprocessing.synth.ceilings import CUE_FIELDS, bayes_ceilings


@pytest.fixture(scope="module")
def bench():
    return load_benchmark("learning")


def _cues(text: str, audio: str, visual: str) -> dict[str, str]:
    return {"text": text, "audio": audio, "visual": visual}


def test_asd_reads_the_generators_ground_truth(bench, tmp_path: Path) -> None:
    truth = tmp_path / "corpus" / "ground_truth" / "iemocap"
    truth.mkdir(parents=True)
    turns = [{"name": "Ses01F_impro01_F000", "speaker": 0}, {"name": "Ses01F_impro01_M000", "speaker": 1},
             {"name": "Ses01F_impro01_F001", "speaker": 0}]
    (truth / "Ses01F_impro01.json").write_text(json.dumps({"turns": turns}))
    utts = [_utt("Ses01F_impro01_F000", 0, track=0), _utt("Ses01F_impro01_M000", 3, track=0),
            _utt("Ses01F_impro01_F001", 2, track=None)]
    # Only utterances with a face count; the M turn's track 0 is the left (F) actor: wrong.
    assert bench.asd_accuracy(tmp_path / "corpus", utts) == {"accuracy": 0.5, "with_face": 2, "utterances": 3}


def _utt(key: str, label: int, track: int | None) -> Utterance:
    empty = np.zeros((0, 2))
    return Utterance(key=key, meta={"label": label, "speaker_track": track}, tokens=np.zeros(0, np.int64),
                     words=np.zeros(0, np.int64), audio=empty, visual=empty, vprob=empty)


def _records(setting: str, uar: float, seeds=(42,), folds=(1, 2)) -> list[dict]:
    scores = {"wa": uar + 0.01, "uar": uar, "wf1": uar}
    return [{"setting": setting, "seed": seed, "fold": fold, "scores": scores,
             "missing_modalities": {s: {"scores": {**scores, "uar": uar / len(s)}} for s in MODALITY_SUBSETS if s != "tav"}}
            for seed in seeds for fold in folds]


def test_learning_json_has_every_key(bench) -> None:
    ceilings = {**bayes_ceilings([0, 1], [_cues("anger", "anger", "anger")] * 2, {m: 0.7 for m in CUE_FIELDS}),
                "fold_mean_uar": {m: 0.8 for m in [*CUE_FIELDS, "fused"]}}
    settings = [r for i, s in enumerate(bench.SETTINGS) for r in _records(s, 0.3 + 0.05 * i)]
    fractions = {"0.1": [r for s in bench.FRACTION_SETTINGS for r in _records(s, 0.3)],
                 "0.3": [r for s in bench.FRACTION_SETTINGS for r in _records(s, 0.4)]}
    run = {"seeds": [42], "fraction_seeds": [42, 43], "folds": [1, 2], "scale": "tiny", "labeled_scale": 3,
           "generator_seed": 7, "pretrain_seeds": [42], "seconds": {"synth": 1.0}}
    result = bench.assemble(ceilings, {"accuracy": 0.9, "with_face": 10, "utterances": 11}, _records("probe", 0.6),
                            settings, fractions, run)
    assert {"ceilings", "asd_accuracy", "probe_uar", "settings", "label_fraction", "seeds", "folds", "scale",
            "labeled_scale", "seconds"} <= set(result)
    assert set(result["ceilings"]["accuracy"]) == {"text", "audio", "visual", "fused"}
    assert result["asd_accuracy"] == 0.9
    assert result["probe_uar"] == pytest.approx({"text": 0.6, "audio": 0.6, "visual": 0.6})
    assert result["probe_fused_uar"] == pytest.approx(0.6)
    assert set(result["settings"]) == set(bench.SETTINGS)
    direct = result["settings"]["direct"]
    assert set(direct) == {"uar", "wa", "subsets"} and direct["wa"] == pytest.approx(0.31)
    assert set(direct["subsets"]) == {"T", "A", "V", "T+A", "T+V", "A+V", "T+A+V"}
    assert direct["subsets"]["T+A+V"] == direct["uar"] == pytest.approx(0.3)
    assert direct["subsets"]["T+A"] == pytest.approx(0.15)
    expected = {"0.1": {s: 0.3 for s in bench.FRACTION_SETTINGS}, "0.3": {s: 0.4 for s in bench.FRACTION_SETTINGS},
                "1.0": {"direct": 0.3, "pretrain_finetune": 0.4, "pretrain_prompt": 0.45}}  # 1.0: the settings runs
    assert set(result["label_fraction"]) == set(expected)
    for fraction, uar in expected.items():
        assert result["label_fraction"][fraction] == pytest.approx(uar)
    json.dumps(result)  # learning.json is plain JSON
    text = bench.table(result)
    assert "pretrain_finetune" in text and "T+A+V" in text and "label fraction" in text
    assert "seeds [42, 43]" in text and "scale tiny (labeled part x3)" in text
    assert "probe UAR: text 60.00, audio 60.00, visual 60.00, the three fused late 60.00" in text
    assert "test speakers (UAR, fold mean as below): text 80.00, audio 80.00, visual 80.00, fused 80.00" in text
    assert "pretraining seed" not in text  # one checkpoint: no per-seed block


def test_checkpoint_settings_average_over_pretraining_seeds(bench) -> None:
    """pretrain_finetune and pretrain_prompt report the mean over checkpoints, each seed kept; the others use the
    first checkpoint's runs only."""
    ceilings = {**bayes_ceilings([0], [_cues("anger", "anger", "anger")], {m: 0.7 for m in CUE_FIELDS}),
                "fold_mean_uar": {m: 0.8 for m in [*CUE_FIELDS, "fused"]}}
    settings = [*_records("direct", 0.3), *_records("pretrain_finetune", 0.5), *_records("pretrain_prompt", 0.4)]
    fractions = {f: [r for s in bench.FRACTION_SETTINGS for r in _records(s, 0.2)] for f in ("0.1", "0.3")}
    second = {"1.0": [*_records("pretrain_finetune", 0.7), *_records("pretrain_prompt", 0.6)],
              **{f: [*_records("pretrain_finetune", 0.4), *_records("pretrain_prompt", 0.3)] for f in ("0.1", "0.3")}}
    run = {"seeds": [42], "fraction_seeds": [42], "folds": [1, 2], "scale": "tiny", "labeled_scale": 1,
           "generator_seed": 7, "pretrain_seeds": [42, 1], "seconds": {}}
    result = bench.assemble(ceilings, {"accuracy": 1.0, "with_face": 1, "utterances": 1}, _records("probe", 0.6),
                            settings, fractions, run, {1: second})
    assert result["settings"]["direct"]["uar"] == pytest.approx(0.3)
    assert result["settings"]["pretrain_finetune"]["uar"] == pytest.approx(0.6)  # (0.5 + 0.7) / 2
    assert result["settings"]["pretrain_finetune"]["subsets"]["T+A"] == pytest.approx(0.3)  # (0.25 + 0.35) / 2
    assert result["settings"]["pretrain_prompt"]["wa"] == pytest.approx(0.51)
    assert result["label_fraction"]["0.1"] == pytest.approx(
        {"direct": 0.2, "pretrain_finetune": 0.3, "pretrain_prompt": 0.25})
    assert list(result["label_fraction"]["0.1"]) == list(bench.FRACTION_SETTINGS)
    assert result["label_fraction"]["1.0"]["pretrain_finetune"] == pytest.approx(0.6)
    assert result["by_pretrain_seed"]["1"]["label_fraction"]["0.1"] == pytest.approx(
        {"pretrain_finetune": 0.4, "pretrain_prompt": 0.3})
    assert result["by_pretrain_seed"]["42"]["settings"]["pretrain_finetune"]["uar"] == pytest.approx(0.5)
    text = bench.table(result)
    assert "mean over pretraining seeds [42, 1]" in text
    assert "pretraining seed 1: pretrain_finetune 40.00 / 40.00 / 70.00; pretrain_prompt 30.00 / 30.00 / 60.00" in text


def test_pretraining_seeds_are_parsed_and_a_kept_checkpoint_of_another_seed_is_refused(bench, tmp_path: Path) -> None:
    base = ["--seed", "7", "--out", str(tmp_path)]
    assert bench.parse_args(base).pretrain_seeds == [42]  # the recipe's pretraining seed
    args = bench.parse_args([*base, "--pretrain-seeds", "[42,1,2]"])
    assert args.pretrain_seeds == [42, 1, 2]
    for bad in (["--pretrain-seeds", "[1,1]"], ["--pretrain-seeds", "7"], ["--pretrain-override", "train.seed=3"]):
        with pytest.raises(SystemExit):
            bench.parse_args([*base, *bad])
    kept = tmp_path / "pretrain_seed_1" / "pretrain" / "config.json"
    kept.parent.mkdir(parents=True)
    kept.write_text(json.dumps({"train": {"seed": 2}}))
    with pytest.raises(SystemExit, match="pretrain_seed_1/pretrain/config.json: pretrained with train.seed 2, not 1"):
        bench.Stages(tmp_path, args).pretrained({}, 1, tmp_path / "pretrain_seed_1")


def test_fraction_seeds_default_to_the_finetuning_seeds(bench) -> None:
    base = ["--seed", "7", "--out", "runs/x"]
    assert bench.parse_args([*base, "--seeds", "[1,2]"]).fraction_seeds == "[1,2]"
    args = bench.parse_args([*base, "--fraction-seeds", "[42,43,44]", "train.lr=1e-3"])
    assert (args.seeds, args.fraction_seeds, args.overrides) == ("[42]", "[42,43,44]", ["train.lr=1e-3"])


def test_a_larger_labeled_part_keeps_the_finetuning_schedule_in_passes(bench) -> None:
    assert bench.parse_args(["--seed", "8", "--out", "x"]).overrides == []
    args = bench.parse_args(["--seed", "8", "--out", "x", "--labeled-scale", "3", "train.steps=100"])
    # configs/finetune/demo_cpu.yaml: 240 steps (direct 320), validated every 16, the prompt's warm-up 16
    assert args.overrides == ["train.steps=720", "train.direct_steps=960", "train.val_every=48",
                              "train.warmup_steps=0", "prompt.warmup_steps=48", "train.steps=100"]
