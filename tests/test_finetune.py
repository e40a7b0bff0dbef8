"""Finetuning: fold splits, the prompt, every setting end to end on tiny labeled shards, reruns, the report.

One tiny pretraining run (a `memobert pretrain` subprocess) and its export are shared by the module.
The labeled shards use the real IEMOCAP speaker ids and carry a learnable class signal (a class token
in the text, class-shifted frame features), so a few epochs of a tiny model beat chance.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import BertConfig, BertForMaskedLM

from finetune.config import PAPER_SETTINGS, DataConfig, FinetuneConfig, TrainConfig
from finetune.counts import IEMOCAP_RELEASE_TOTAL, log_counts, release_total
from finetune.data import MODALITY_SUBSETS, batches, feature_dims, keep_modalities, load_utterances, split_fold
from finetune.metrics import NOT_A_CLASS, scores
from finetune.prompt import Template, insert_template, label_word_scores, vocab_predictions
from finetune.protocols import CLASSES, folds_for, iemocap_folds, msp_improv_folds
from finetune.report import SETTING_NAMES, uar_se, write_report
import finetune.run as run
from finetune.run import (
    Context,
    check_and_save_config,
    check_ready,
    optimizer_and_schedule,
    resolve_precision,
    run_finetune,
    run_path,
    train_and_select,
)
from finetune.settings import ClassifierModel, Schedule, build_model, schedule_for, text_model
from helpers import TINY_DIMS
from memobert.config import ConfigError, load_config, to_dict
from memobert.demo import DemoConfig, ceilings_summary, demo_finetune_config
from memobert.schema import Manifest, Utterance
from preprocessing.config import PreprocessConfig
from preprocessing.text import TextTokenizer, default_vocab_folder
from pretrain.batch import Batch
from pretrain.config import ModelConfig
from pretrain.export import export, load_model
from pretrain.model import MEmoBERT

REPO = Path(__file__).resolve().parents[1]
# A tiny model learns the class signal within 64 steps (8 passes over 128 training utterances) at a larger lr
# than the recipe's; the step-based schedule with small numbers, validating once per pass.
FAST = ["model.flavor=tiny", "train.lr=3e-3", "prompt.lr=3e-3", "prompt.warmup_steps=4", "train.batch_size=16",
        "train.steps=64", "train.direct_steps=64", "train.val_every=8", "train.patience=4", "train.device=cpu"]


# One thread per process: the machine's 2 cores are shared, and a descheduled OpenMP thread stalls every
# op of a tiny model far longer than a second thread saves.
ONE_THREAD = {**os.environ, "OMP_NUM_THREADS": "1"}




@pytest.fixture(scope="module")
def pretrained(tmp_path_factory: pytest.TempPathFactory, labeled_shards: Path) -> dict[str, Path]:
    """A 10-step tiny pretraining run (DeepSpeed, as users launch it) and its export."""
    root = tmp_path_factory.mktemp("pretrained")
    run = root / "run"
    cmd = [sys.executable, "-m", "memobert.cli", "pretrain", "--config", str(REPO / "configs/pretrain/cpu_tiny.yaml"),
           f"model.acoustic_dim={TINY_DIMS['audio']}", f"model.visual_dim={TINY_DIMS['visual']}",
           f"data.train_shards={labeled_shards}", f"train.out_dir={run}", "train.steps=10", "optim.warmup_steps=2"]
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=600, env=ONE_THREAD)
    assert result.returncode == 0, result.stderr[-4000:]
    return {"run": run, "export": export(run, root / "export")}


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A one-layer text BERT folder (bert-base-uncased vocab size) for bert_direct."""
    folder = tmp_path_factory.mktemp("bert") / "tiny_bert"
    torch.manual_seed(0)
    config = BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)
    BertForMaskedLM(config).save_pretrained(folder)
    return folder


def _utt(key: str, speaker: str, label: int = 0, n_text: int = 3) -> Utterance:
    return Utterance(key=key, meta={"speaker": speaker, "label": label}, tokens=np.arange(5, 5 + n_text),
                     words=np.arange(n_text), audio=np.ones((4, 16)), visual=np.ones((3, 12)), vprob=np.ones((3, 8)))


@pytest.mark.parametrize("folds", [iemocap_folds(), msp_improv_folds()], ids=["iemocap", "msp_improv"])
def test_fold_filtering_puts_each_speaker_in_one_part(folds: list) -> None:
    speakers = sorted({f.test for f in folds})
    utts = [_utt(f"{s}_{i}", s) for s in speakers for i in range(3)] + [_utt("stranger_0", "X99")]
    for fold in folds:
        data = split_fold(utts, fold)
        assert {u.meta["speaker"] for u in data.train} == set(fold.train) and len(fold.train) == len(speakers) - 2
        assert {u.meta["speaker"] for u in data.val} == {fold.val} and {u.meta["speaker"] for u in data.test} == {fold.test}
        keys = [[u.key for u in part] for part in (data.train, data.val, data.test)]
        assert sum(map(len, keys)) == len(set().union(*keys)) == 3 * len(speakers)  # no overlap; the stranger nowhere
    assert (folds[1].test, folds[1].val) == (folds[0].val, folds[0].test)  # a session's two folds swap roles


@pytest.mark.slow
def test_prompt_scoring_modes_on_a_logit_trap(labeled_shards: Path, pretrained: dict[str, Path]) -> None:
    # The verbaliser alone: the trap word (id 42, no label word) has the highest logit of the vocabulary in rows 0-3.
    logits = torch.randn(6, 50, generator=torch.Generator().manual_seed(0))
    label_ids = torch.tensor([7, 3, 11, 20])
    logits[:4, 42] = 100.0
    logits[4, 11], logits[5, 3] = 100.0, 100.0  # rows 4 and 5: a label word wins the whole vocabulary
    best_label = [max(range(4), key=lambda c: logits[i, label_ids[c]].item()) for i in range(6)]
    assert label_word_scores(logits, label_ids).argmax(-1).tolist() == best_label  # label_words: never the trap
    assert vocab_predictions(logits, label_ids).tolist() == [NOT_A_CLASS] * 4 + [2, 1]  # vocab: the trap is no class
    # The trap costs the vocab scoring the samples the label words alone get right.
    y_true = best_label
    assert scores(y_true, best_label, 4)["wa"] == 1.0
    assert scores(y_true, vocab_predictions(logits, label_ids).numpy(), 4)["wa"] == pytest.approx(2 / 6)

    # The real model: make a non-label word the MLM head's favourite through its output bias.
    cfg = load_config(FinetuneConfig, overrides=[f"data.shards={labeled_shards}"])
    assert cfg.prompt.scoring == "vocab"  # the authors' scoring is the default
    tok = TextTokenizer()
    utts = load_utterances(str(labeled_shards), cfg.data)
    ckpt = load_model(pretrained["export"])
    model = build_model("pretrain_prompt", cfg, feature_dims(utts), tok, ckpt).eval()
    vocab = tok.vocab_file.read_text().splitlines()
    assert [vocab[i] for i in model.label_ids.tolist()] == list(cfg.prompt.label_words)  # looked up by word, in CLASSES order
    trap = vocab.index("the")
    model.backbone.cls.predictions.bias.data[trap] = 1e4
    batch = next(batches(utts, 16, cfg.data, tok.cls_id, tok.sep_id))
    with torch.no_grad():
        full = model.vocab_logits(batch)
        class_scores = model(batch)
        authors = model.classify(batch)
    assert (full.argmax(-1) == trap).all()
    assert class_scores.shape == (16, len(CLASSES))
    assert (authors == NOT_A_CLASS).all()  # every sample counts as wrong under the authors' scoring
    lenient_cfg = load_config(FinetuneConfig, overrides=[f"data.shards={labeled_shards}", "prompt.scoring=label_words"])
    lenient = build_model("pretrain_prompt", lenient_cfg, feature_dims(utts), tok, ckpt).eval()
    lenient.backbone.cls.predictions.bias.data[trap] = 1e4
    with torch.no_grad():
        assert torch.equal(lenient.classify(batch), full[:, model.label_ids].argmax(-1))


def test_template_placement_and_truncation() -> None:
    tpl_ids = (901, 902, 103, 904)
    cls, sep = 101, 102
    text_ids = torch.tensor([[cls, 11, 12, 13, sep], [cls, 21, sep, 0, 0], [cls, sep, 0, 0, 0]])
    mask = text_ids != 0
    expected = {
        ("after", 120): [[cls, 11, 12, 13, *tpl_ids, sep], [cls, 21, *tpl_ids, sep], [cls, *tpl_ids, sep]],
        ("before", 120): [[cls, *tpl_ids, 11, 12, 13, sep], [cls, *tpl_ids, 21, sep], [cls, *tpl_ids, sep]],
        # 5 tokens: the template keeps its 4, the utterance text is cut to 1.
        ("after", 5): [[cls, 11, *tpl_ids, sep], [cls, 21, *tpl_ids, sep], [cls, *tpl_ids, sep]],
        ("before", 5): [[cls, *tpl_ids, 11, sep], [cls, *tpl_ids, 21, sep], [cls, *tpl_ids, sep]],
    }
    for (position, max_len), rows in expected.items():
        ids, new_mask, at = insert_template(text_ids, mask, Template(tpl_ids, 2, position), max_len)
        got = [row[m].tolist() for row, m in zip(ids, new_mask)]
        assert got == rows, (position, max_len)
        assert (ids[torch.arange(3), at] == 103).all()
        assert new_mask.sum(1).tolist() == [len(r) for r in rows] and (ids[~new_mask] == 0).all()

    # A long utterance at the downstream length: 120 tokens in all, the template whole at the end.
    long = torch.cat([torch.tensor([[cls]]), torch.arange(1000, 1125)[None], torch.tensor([[sep]])], dim=1)
    ids, new_mask, _ = insert_template(long, torch.ones_like(long, dtype=torch.bool), Template(tpl_ids, 2, "after"), 120)
    assert ids.shape[1] == 122 and ids[0, -5:].tolist() == [*tpl_ids, sep] and ids[0, 116].item() == 1115

    tok = TextTokenizer()
    for text in ("i am [MASK] .", "it was [MASK] .", "he is [MASK] ."):
        template = Template.from_text(text, tok, "before")
        assert len(template.ids) == 4 and template.ids[template.mask_offset] == tok.mask_id
    with pytest.raises(ValueError, match="exactly one"):
        Template.from_text("i am happy .", tok, "after")


def test_dropped_modalities_are_empty() -> None:
    utts = [_utt("a", "Ses01F", n_text=5)]
    for subset in MODALITY_SUBSETS:
        (u,) = keep_modalities(utts, subset)
        assert (len(u.tokens) > 0, len(u.audio) > 0, len(u.visual) > 0) == tuple(m in subset for m in "tav"), subset
        assert len(u.vprob) == len(u.visual)
    (empty_text,) = keep_modalities(utts, "av")
    batch = next(batches([empty_text], 1, FinetuneConfig().data, 101, 102))
    assert batch.text_ids.tolist() == [[101, 102]]  # [CLS] [SEP]


@pytest.mark.slow
def test_settings_build_the_right_models(labeled_shards: Path, pretrained: dict[str, Path], tiny_bert: Path) -> None:
    cfg = load_config(FinetuneConfig, overrides=[f"data.shards={labeled_shards}", "model.flavor=tiny",
                                                 f"model.bert_folder={tiny_bert}", "prompt.position=before"])
    tok = TextTokenizer()
    dims = feature_dims(load_utterances(str(labeled_shards), cfg.data))
    ckpt = load_model(pretrained["export"])
    reference = {k: v.clone() for k, v in ckpt.state_dict().items()}
    n_ckpt = sum(p.numel() for p in ckpt.parameters())
    torch.manual_seed(0)
    models = {s: build_model(s, cfg, dims, tok, ckpt) for s in PAPER_SETTINGS}
    key = "bert.encoder.layer.0.attention.self.query.weight"

    direct = models["direct"].backbone  # the checkpoint's shape, fresh weights
    assert direct.config.hidden_size == ckpt.config.hidden_size and not torch.equal(direct.state_dict()[key], reference[key])
    scratch = build_model("direct", cfg, dims, tok, None).backbone  # no checkpoint: the flavor's shape
    assert scratch.config.hidden_size == 64 and scratch.model_cfg.acoustic_dim == TINY_DIMS["audio"]
    text_bert = BertForMaskedLM.from_pretrained(tiny_bert)
    bert = models["bert_direct"].backbone
    assert bert.config.hidden_size == 32
    assert torch.equal(bert.bert.embeddings.word_embeddings.weight, text_bert.bert.embeddings.word_embeddings.weight)
    assert torch.equal(models["pretrain_finetune"].backbone.state_dict()[key], reference[key])
    prompt = models["pretrain_prompt"]
    assert sum(p.numel() for p in prompt.parameters()) == n_ckpt  # no new parameters
    assert prompt.template.position == "before"
    assert sum(p.numel() for p in models["pretrain_finetune"].parameters()) > n_ckpt  # a new classifier

    # Training a copy never changes the loaded checkpoint.
    batch = next(batches(load_utterances(str(labeled_shards), cfg.data), 8, cfg.data, tok.cls_id, tok.sep_id))
    for setting in ("pretrain_finetune", "pretrain_prompt"):
        models[setting].loss(batch).backward()
        torch.optim.SGD(models[setting].parameters(), lr=1.0).step()
    assert all(torch.equal(v, reference[k]) for k, v in ckpt.state_dict().items())
    assert default_vocab_folder() and (Path(default_vocab_folder()) / "config.json").is_file()  # bert_direct's default


@pytest.mark.slow
def test_export_and_deepspeed_checkpoint_load_the_same_model(labeled_shards: Path, pretrained: dict[str, Path]) -> None:
    from_export, from_run = load_model(pretrained["export"]), load_model(pretrained["run"])
    assert from_export.state_dict().keys() == from_run.state_dict().keys()
    for name, value in from_export.state_dict().items():
        assert torch.equal(value, from_run.state_dict()[name]), name
    cfg = load_config(FinetuneConfig, overrides=[f"data.shards={labeled_shards}"])
    tok = TextTokenizer()
    utts = load_utterances(str(labeled_shards), cfg.data)
    batch = next(batches(utts, 16, cfg.data, tok.cls_id, tok.sep_id))
    logits = []
    for ckpt in (from_export, from_run):
        model = build_model("pretrain_prompt", cfg, feature_dims(utts), tok, ckpt).eval()
        with torch.no_grad():
            logits.append(model.vocab_logits(batch))
    assert torch.equal(logits[0], logits[1])


@pytest.mark.slow
def test_every_setting_beats_chance_and_a_rerun_skips(
    tmp_path: Path, labeled_shards: Path, pretrained: dict[str, Path], tiny_bert: Path, caplog: pytest.LogCaptureFixture
) -> None:
    out = tmp_path / "finetune"
    args = ["--data", str(labeled_shards), "--protocol", "iemocap", "--settings", ",".join(PAPER_SETTINGS),
            "--checkpoint", str(pretrained["run"]), "--seeds", "42", "--folds", "1", "--out", str(out)]
    overrides = [*FAST, f"model.bert_folder={tiny_bert}"]
    result = subprocess.run([sys.executable, "-m", "memobert.cli", "finetune", *args, *overrides], capture_output=True, text=True,
                            cwd=REPO, timeout=600, env=ONE_THREAD)
    assert result.returncode == 0, result.stderr[-4000:]
    fold = iemocap_folds()[0]
    for setting in PAPER_SETTINGS:
        record = json.loads(run_path(out, setting, 42, 1).read_text())
        assert (record["speakers"]["val"], record["speakers"]["test"]) == (fold.val, fold.test)
        assert record["samples"] == {"train": 128, "val": 16, "test": 16} and record["num_predictions"] == 16
        steps = [h["step"] for h in record["history"]]
        assert steps == list(range(8, 8 * len(steps) + 1, 8)) and steps[-1] <= 64  # a validation every 8 steps
        assert record["selected_step"] in steps
        assert record["val_uar"] == max(h["val_uar"] for h in record["history"])
        assert record["scores"]["uar"] > 0.5, (setting, record["scores"])  # chance is 0.25
        assert set(record["missing_modalities"]) == set(MODALITY_SUBSETS) - {"tav"}
        assert np.asarray(record["confusion"]).sum() == 16
        assert record["support"] == np.asarray(record["confusion"]).sum(1).tolist()  # every prediction is a class
        assert (out / "confusion" / f"{setting}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    bert = json.loads(run_path(out, "bert_direct", 42, 1).read_text())["text_model"]
    assert bert == {"folder": str(tiny_bert), "name": "tiny_bert", "layers": 1, "hidden": 32}
    assert json.loads(run_path(out, "pretrain_finetune", 42, 1).read_text())["text_model"] is None

    md = (out / "results.md").read_text()
    assert md in result.stdout
    assert "BERT+Direct starts from tiny_bert (layers 1, hidden 32) (the paper's: bert-base-uncased, layers 12, hidden 768)." in md
    assert "| Setting | WA | UAR | WF1 | UAR SE (test) |" in md and "| Setting | T | A | V | T+A | T+V | A+V | T+A+V |" in md
    assert "std is the sample standard deviation over seeds (ddof=1)" in md
    missed = json.loads(run_path(out, "pretrain_prompt", 42, 1).read_text())["not_a_class"]
    assert (f"Pretrain+Prompt predicts the argmax over the whole vocabulary at [MASK], as the authors score it: a word "
            f"that is no label word counts as wrong ({missed} of 16 test predictions).") in md
    for setting in PAPER_SETTINGS:
        assert md.count(f"| {SETTING_NAMES[setting]} | ") == 2  # one row in each table
    assert len((out / "results.csv").read_text().splitlines()) == 1 + len(PAPER_SETTINGS)
    assert len((out / "missing_modalities.csv").read_text().splitlines()) == 1 + 7 * len(PAPER_SETTINGS)

    # The rerun finds every run on disk: nothing is trained again, only the report is rewritten.
    mtimes = {s: run_path(out, s, 42, 1).stat().st_mtime_ns for s in PAPER_SETTINGS}
    same = [f"data.shards={labeled_shards}", f"settings={','.join(PAPER_SETTINGS)}", f"checkpoint={pretrained['run']}", "seeds=[42]",
            "folds=[1]", f"out_dir={out}", *overrides]
    cfg = load_config(FinetuneConfig, overrides=same)
    with caplog.at_level(logging.INFO, logger="finetune.run"):
        assert run_finetune(cfg) == out / "results.md"
    assert sum("skipping" in r.message for r in caplog.records) == len(PAPER_SETTINGS)
    assert not any(r.message.startswith("run ") for r in caplog.records)
    assert {s: run_path(out, s, 42, 1).stat().st_mtime_ns for s in PAPER_SETTINGS} == mtimes
    assert (out / "results.md").read_text() == md

    # Finished runs are reused only under the config that made them.
    with pytest.raises(ConfigError, match="'train.lr'"):
        run_finetune(load_config(FinetuneConfig, overrides=[*same, "train.lr=2e-3"]))


def test_paired_folds_train_once_and_record_what_separate_runs_record(
    tmp_path: Path, labeled_shards: Path, pretrained: dict[str, Path], monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture
) -> None:
    # Folds 1 and 2 share their training speakers (Ses01F and Ses01M swap test and validation).
    steps = {"n": 0}
    real_step = run.train_step

    def counting_step(*args, **kwargs):
        steps["n"] += 1
        return real_step(*args, **kwargs)

    monkeypatch.setattr(run, "train_step", counting_step)
    settings = ["direct", "pretrain_prompt", "mfn"]  # MFN: a fit-time hook on the training speakers only

    def finetune(out: Path, folds: str) -> int:
        steps["n"] = 0
        overrides = [f"data.shards={labeled_shards}", f"settings={','.join(settings)}", f"checkpoint={pretrained['run']}",
                     "seeds=[42]", f"folds={folds}", f"out_dir={out}", *FAST, "train.patience=2",
                     "mfn.word_embeddings=bundled", "mfn.cells=[8, 4, 4]", "mfn.memory=16"]
        run_finetune(load_config(FinetuneConfig, overrides=overrides))
        return steps["n"]

    with caplog.at_level(logging.INFO, logger="finetune.run"):
        paired_steps = finetune(tmp_path / "paired", "[1, 2]")
    assert [r.message for r in caplog.records if r.message.startswith("run ")] == [
        "run 1/3: direct seed 42 fold 1 and 2", "run 2/3: pretrain_prompt seed 42 fold 1 and 2",
        "run 3/3: mfn seed 42 fold 1 and 2"]
    separate_steps = finetune(tmp_path / "fold1", "[1]") + finetune(tmp_path / "fold2", "[2]")
    last_steps = {}
    for setting in settings:
        for fold in (1, 2):
            paired = json.loads(run_path(tmp_path / "paired", setting, 42, fold).read_text())
            alone = json.loads(run_path(tmp_path / f"fold{fold}", setting, 42, fold).read_text())
            assert paired.pop("trained_with_folds") == [1, 2] and alone.pop("trained_with_folds") == [fold]
            assert paired == alone, (setting, fold)  # history, selection, predictions, every score
            last_steps[setting, fold] = paired["history"][-1]["step"]
    # One training per setting, as long as its later-stopping fold's; the separate runs train twice.
    assert paired_steps == sum(max(last_steps[s, 1], last_steps[s, 2]) for s in settings)
    assert separate_steps == sum(last_steps.values()) > paired_steps


def test_trainings_pair_folds_only_where_the_training_is_the_same() -> None:
    pending = [("direct", 42, 1), ("direct", 42, 2), ("direct", 42, 3), ("direct", 7, 2), ("direct", 7, 1),
               ("mfn", 42, 1), ("mfn", 42, 2), ("m3er", 42, 1), ("m3er", 42, 2), ("probe", 42, 1), ("probe", 42, 2)]
    units = [(setting, seed, [f.index for f in unit]) for setting, seed, unit in run.trainings(pending, "iemocap")]
    assert units == [("direct", 42, [1, 2]), ("direct", 42, [3]), ("direct", 7, [2, 1]), ("mfn", 42, [1, 2]),
                     # M3ER fits its threshold on the validation speaker; the probe chooses C on it
                     ("m3er", 42, [1]), ("m3er", 42, [2]), ("probe", 42, [1]), ("probe", 42, [2])]
    # The authors' MSP-IMPROV folds validate on the test speaker, so no two share their training speakers.
    all_but_test = [("direct", 0, f.index) for f in folds_for("msp_improv_11to1")]
    assert all(len(unit) == 1 for _, _, unit in run.trainings(all_but_test, "msp_improv_11to1"))


def test_report_aggregates_folds_then_seeds(tmp_path: Path) -> None:
    uar = {(42, 1): 0.5, (42, 2): 0.7, (1234, 1): 0.8, (1234, 2): 0.6}  # seed means 0.6 and 0.7
    records = []
    for (seed, fold), value in uar.items():
        scores = {"wa": 0.5, "uar": value, "wf1": 0.4}
        records.append({"setting": "direct", "seed": seed, "fold": fold, "scores": scores,
                        "confusion": np.eye(4, dtype=int).tolist(),
                        "missing_modalities": {s: {"scores": scores} for s in MODALITY_SUBSETS if s != "tav"}})
    cfg = load_config(FinetuneConfig, overrides=["settings=direct", "seeds=[42, 1234]", "folds=[1, 2]"])
    md = write_report(tmp_path, cfg, records).read_text()
    # Sample std (ddof=1) of 0.6 and 0.7; every test recall is 1 (identity confusions), so no test-sample error.
    assert "| Direct | 50.00 ± 0.00 | 65.00 ± 7.07 | 40.00 ± 0.00 | 0.00 |" in md
    assert "folds 1, 2 of 10 (partial); seeds 42, 1234" in md
    assert "starts from" not in md and "word embeddings from" not in md  # direct starts from no text model
    assert "classifier_pooling" not in md  # the authors' [CLS] head goes unsaid
    pooled = load_config(FinetuneConfig, overrides=["settings=direct", "seeds=[42, 1234]", "folds=[1, 2]",
                                                    "model.classifier_pooling=mean"])
    (tmp_path / "mean").mkdir()
    assert "reads the mean of all valid text, visual and acoustic states (model.classifier_pooling=mean)" in write_report(
        tmp_path / "mean", pooled, records).read_text()
    assert md.startswith("# Finetuning results: iemocap\n") and "test-selected" not in md
    # The authors' MSP-IMPROV folds selected on the test speaker: the title says so.
    test_selected = load_config(FinetuneConfig, overrides=["settings=direct", "seeds=[42, 1234]", "folds=[1, 2]",
                                                           "data.protocol=msp_improv_11to1"])
    (tmp_path / "11to1").mkdir()
    md_11to1 = write_report(tmp_path / "11to1", test_selected, records).read_text()
    assert md_11to1.startswith("# Finetuning results: msp_improv_11to1 (test-selected, not a clean estimate)\n")
    assert "the test speaker also validates" in md_11to1 and "selection and early stopping on the validation" not in md_11to1
    assert (tmp_path / "results.csv").read_text().splitlines()[1] == (
        "direct,T+A+V,2,0.500000,0.000000,0.650000,0.070711,0.400000,0.000000")

    # With "bundled", bert_direct and MFN start from the small offline MiniLM, not the paper's bert-base-uncased:
    # said under the table.
    cfg = load_config(FinetuneConfig, overrides=["settings=bert_direct,mfn", "seeds=[42, 1234]", "folds=[1, 2]",
                                                 "model.bert_folder=bundled", "mfn.word_embeddings=bundled"])
    assert text_model("direct", cfg) is None
    default = text_model("bert_direct", cfg)
    assert default == {"folder": default_vocab_folder(), "name": "MiniLM-L6-H384-uncased", "layers": 6, "hidden": 384}
    assert text_model("mfn", cfg) == default
    models = [{**r, "setting": s, "text_model": default} for s in ("bert_direct", "mfn") for r in records]
    md = write_report(tmp_path, cfg, models).read_text()
    note = md.index("BERT+Direct starts from MiniLM-L6-H384-uncased (layers 6, hidden 384) (the paper's: bert-base-uncased, "
                    "layers 12, hidden 768). MFN takes its word embeddings from MiniLM-L6-H384-uncased (layers 6, hidden 384).")
    assert md.index("| MFN |") < note < md.index("## Missing modalities")  # under the main table


def test_uar_se_counts_the_test_utterances_a_non_label_prediction_left_out_of_the_confusion() -> None:
    # The prompt predicted a non-label word for half of each class: the confusion holds 1 of 2 utterances a class.
    record = {"setting": "pretrain_prompt", "seed": 42, "fold": 1, "confusion": np.eye(4, dtype=int).tolist()}
    assert uar_se([{**record, "support": [2, 2, 2, 2]}], "pretrain_prompt") == pytest.approx(np.sqrt(4 * 0.25 / 2) / 4)
    assert uar_se([record], "pretrain_prompt") == 0.0  # an older record without support: the rows, all recalls 1


def test_a_device_change_that_changes_auto_precision_is_a_config_change(
    tmp_path: Path, labeled_shards: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "ft"
    common = [f"data.shards={labeled_shards}", "settings=direct", f"out_dir={out}"]
    # out_dir holds runs made on the CPU with precision auto, i.e. in fp32 (as run_finetune saves their config) ...
    cpu = load_config(FinetuneConfig, overrides=[*common, "train.device=cpu"])
    check_and_save_config(out, resolve_precision(cpu, cuda=False))
    assert json.loads((out / "config.json").read_text())["train"]["precision"] == "fp32"
    # ... a rerun with device auto where there is no GPU computes the same ...
    auto = load_config(FinetuneConfig, overrides=[*common, "train.device=auto"])
    check_and_save_config(out, resolve_precision(auto, cuda=False))
    # ... but on a GPU auto means bf16: not the runs in out_dir, refused before any work.
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    with pytest.raises(ConfigError, match="'train.precision': .* made with 'fp32', now 'bf16'"):
        run_finetune(auto)
    assert resolve_precision(load_config(FinetuneConfig, overrides=["train.precision=fp32"]), cuda=True).train.precision == "fp32"
    assert not (out / "runs").exists()


def test_config_defaults_and_preflight(tmp_path: Path, labeled_shards: Path) -> None:
    cfg = load_config(FinetuneConfig)
    assert (cfg.train.lr, cfg.train.batch_size, cfg.seeds) == (5e-5, 32, [42, 1234, 4321, 5678])
    assert (cfg.data.max_text_len, cfg.data.max_visual_len, cfg.data.max_acoustic_len) == (120, 36, 64)
    assert cfg.settings == list(PAPER_SETTINGS) and cfg.prompt.template == "i am [MASK] ." and cfg.prompt.position == "after"
    assert cfg.prompt.label_words == ["anger", "happy", "neutral", "sad"] and cfg.fold_numbers == list(range(1, 11))
    assert load_config(FinetuneConfig, overrides=["data.protocol=msp_improv"]).fold_numbers == list(range(1, 13))
    with pytest.raises(ConfigError, match="'folds'"):
        load_config(FinetuneConfig, overrides=["folds=[11]"])
    with pytest.raises(ConfigError, match="'prompt.template'"):
        load_config(FinetuneConfig, overrides=["prompt.template=i am happy"])
    # A max norm of 0 would zero every gradient.
    with pytest.raises(ConfigError, match="'train.grad_clip': must be positive"):
        load_config(FinetuneConfig, overrides=["train.grad_clip=0"])
    with pytest.raises(ConfigError, match="'train.weight_decay': must be >= 0"):
        load_config(FinetuneConfig, overrides=["train.weight_decay=-0.01"])
    assert load_config(FinetuneConfig, overrides=["train.weight_decay=0"]).train.weight_decay == 0
    out = tmp_path / "never"
    with pytest.raises(ConfigError, match="'checkpoint': required by pretrain_finetune, pretrain_prompt"):
        run_finetune(load_config(FinetuneConfig, overrides=[f"data.shards={labeled_shards}", f"out_dir={out}"]))
    with pytest.raises(ConfigError, match="'data.shards'"):
        run_finetune(load_config(FinetuneConfig, overrides=[f"data.shards={tmp_path}", "settings=direct", f"out_dir={out}"]))
    # The prompt's words and template are checked against the vocabulary before the grid, not when the first
    # pretrain_prompt run builds its model ("melancholia" is 4 WordPieces).
    prompt = [f"data.shards={labeled_shards}", "settings=direct,pretrain_prompt", f"checkpoint={tmp_path}", f"out_dir={out}"]
    with pytest.raises(ConfigError, match="'prompt.label_words': label word 'melancholia' is not one WordPiece token"):
        run_finetune(load_config(FinetuneConfig, overrides=[*prompt, "prompt.label_words=[anger, happy, neutral, melancholia]"]))
    with pytest.raises(ConfigError, match=r"'prompt.template': 'i am \[MASK\] \.' is 4 tokens, more than data.max_text_len \(3\)"):
        run_finetune(load_config(FinetuneConfig, overrides=[*prompt, "data.max_text_len=3"]))
    check_ready(load_config(FinetuneConfig, overrides=[*prompt[:1], "settings=direct", "prompt.label_words=[a, b, c, melancholia]"]))
    assert not out.exists()  # failed before any work
    assert len(folds_for("msp_improv")) == 12


def test_classifier_head_is_the_authors() -> None:
    torch.manual_seed(0)
    backbone = MEmoBERT.from_config(ModelConfig(flavor="tiny", acoustic_dim=16, visual_dim=12))
    model = ClassifierModel(backbone, len(CLASSES), dropout=0.1)
    h = backbone.config.hidden_size
    pooler, output = model.head.pooler, model.head.output
    assert [type(m) for m in pooler] == [torch.nn.Linear, torch.nn.Tanh] and pooler[0].weight.shape == (h, h)
    assert [type(m) for m in output] == [torch.nn.Linear, torch.nn.GELU, torch.nn.LayerNorm, torch.nn.Linear]
    assert output[0].weight.shape == (2 * h, h) and output[2].normalized_shape == (2 * h,)
    assert output[3].weight.shape == (len(CLASSES), 2 * h) and model.head.dropout.p == 0.1
    cls = torch.randn(3, h, generator=torch.Generator().manual_seed(0))
    model.eval()
    expected = output[3](output[2](torch.nn.functional.gelu(output[0](torch.tanh(pooler[0](cls))))))
    assert torch.allclose(model.head(cls), expected)


def test_lr_schedules_warm_up_and_decay_linearly_to_zero() -> None:
    cfg = FinetuneConfig()
    assert schedule_for("pretrain_finetune", cfg) == schedule_for("bert_direct", cfg) == Schedule(5e-5, 1500, 0)
    assert schedule_for("direct", cfg) == Schedule(5e-5, 2000, 0)
    assert schedule_for("pretrain_prompt", cfg) == Schedule(3e-5, 1500, 100)
    assert schedule_for("mfn", cfg) == schedule_for("m3er", cfg) == Schedule(1e-3, 1500, 0)
    # train.bert_lr moves bert_direct alone (the demo's MiniLM beside a tiny MEmoBERT)
    own = load_config(FinetuneConfig, overrides=["train.lr=2e-3", "train.bert_lr=1e-4"])
    assert schedule_for("bert_direct", own) == Schedule(1e-4, 1500, 0)
    assert schedule_for("pretrain_finetune", own) == Schedule(2e-3, 1500, 0)
    assert schedule_for("direct", own) == Schedule(2e-3, 2000, 0)
    with pytest.raises(ConfigError, match="bert_lr"):
        load_config(FinetuneConfig, overrides=["train.bert_lr=0"])
    train = TrainConfig()
    assert (train.batch_size, train.betas, train.weight_decay, train.grad_clip) == (32, (0.9, 0.98), 0.01, 5.0)
    assert (train.val_every, train.patience) == (100, 5)

    def lrs(schedule: Schedule) -> list[float]:
        optimizer, scheduler = optimizer_and_schedule(torch.nn.Linear(2, 2), schedule, train)
        assert optimizer.defaults["betas"] == (0.9, 0.98)
        assert [g["weight_decay"] for g in optimizer.param_groups] == [0.01, 0.0]  # no decay on the bias
        out = []
        for _ in range(schedule.steps):
            out.append(scheduler.get_last_lr()[0])
            optimizer.step()
            scheduler.step()
        return [*out, scheduler.get_last_lr()[0]]  # the lr after the last step

    finetune = lrs(Schedule(5e-5, 1500, 0))
    assert finetune[0] == pytest.approx(5e-5)  # no warm-up: the first step at the peak
    assert finetune[750] == pytest.approx(2.5e-5) and finetune[-2] == pytest.approx(5e-5 / 1500)
    assert finetune[-1] == 0.0 and np.all(np.diff(finetune) < 0)  # linear to 0 at step 1,500
    assert np.allclose(np.diff(finetune), -5e-5 / 1500)
    prompt = lrs(Schedule(3e-5, 1500, 100))
    assert prompt[0] == pytest.approx(3e-5 / 100) and prompt[99] == pytest.approx(3e-5)  # 100 warm-up steps
    assert np.all(np.diff(prompt[:100]) > 0) and prompt[100] == pytest.approx(3e-5)  # then decay from step 100 on
    assert np.all(np.diff(prompt[100:]) < 0) and prompt[-1] == 0.0
    assert prompt[800] == pytest.approx(3e-5 * (1500 - 800) / 1400)


def test_the_fused_optimizer_makes_the_for_loop_update() -> None:
    """finetune's AdamW is fused (one pass over all tensors on a CPU too): same decay groups, betas, lr and result."""
    train = TrainConfig()
    torch.manual_seed(0)
    start = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.LayerNorm(8), torch.nn.Linear(8, 4))
    x, y = torch.randn(16, 8), torch.randint(0, 4, (16,))
    weights = {}
    for fused in (False, True):
        model = copy.deepcopy(start)
        optimizer, scheduler = optimizer_and_schedule(model, Schedule(1e-2, 10, 2), train, fused=fused)
        assert optimizer.defaults["fused"] is fused
        for _ in range(3):
            optimizer.zero_grad()
            torch.nn.functional.cross_entropy(model(x), y).backward()
            optimizer.step()
            scheduler.step()
        weights[fused] = torch.cat([p.detach().flatten() for p in model.parameters()])
    assert not torch.equal(weights[True], torch.cat([p.detach().flatten() for p in start.parameters()]))
    assert torch.allclose(weights[True], weights[False], atol=1e-6)
    assert optimizer_and_schedule(start, Schedule(1e-2, 10, 2), train)[0].defaults["fused"] is True


class _ConstantClassifier(torch.nn.Module):
    """Predicts one class for every sample (so every validation UAR is 0.25) and learns its class scores."""

    def __init__(self) -> None:
        super().__init__()
        self.scores = torch.nn.Parameter(torch.tensor([1.0, 0.0, 0.0, 0.0]))

    def forward(self, batch: Batch) -> torch.Tensor:
        return self.scores.expand(batch.size, -1)

    def loss(self, batch: Batch) -> torch.Tensor:
        return torch.nn.functional.cross_entropy(self(batch), batch.labels)


def _fit(labeled_shards: Path, overrides: list[str]) -> tuple[list[dict[str, float]], int]:
    cfg = load_config(FinetuneConfig, overrides=[f"data.shards={labeled_shards}", "train.batch_size=16", *overrides])
    utts = load_utterances(str(labeled_shards), cfg.data)
    ctx = Context(utts, TextTokenizer(), feature_dims(utts), None, torch.device("cpu"), False)
    data = split_fold(utts, iemocap_folds()[0])
    [selection] = train_and_select(_ConstantClassifier(), data.train, [data.val], cfg, 42, ctx, Schedule(1e-2, cfg.train.steps, 0))
    return selection.history, selection.step


def test_training_stops_after_patience_validations_without_a_better_uar(labeled_shards: Path) -> None:
    # Validation UAR never improves after the first validation: 5 more validations, then stop (of 1,000 steps).
    history, selected = _fit(labeled_shards, ["train.steps=1000", "train.val_every=3", "train.patience=5"])
    assert [h["step"] for h in history] == [3, 6, 9, 12, 15, 18] and selected == 3
    assert all(h["val_uar"] == 0.25 for h in history)
    # Without early stopping the run takes every step, validating every 4 and after the last; the lr decays to 0.
    history, _ = _fit(labeled_shards, ["train.steps=10", "train.val_every=4", "train.patience=100"])
    assert [h["step"] for h in history] == [4, 8, 10]
    assert [h["lr"] for h in history] == pytest.approx([1e-2 * 7 / 10, 1e-2 * 3 / 10, 1e-2 * 1 / 10])


def test_per_speaker_counts_and_a_total_unlike_the_release(
    labeled_shards: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    cfg = load_config(FinetuneConfig, overrides=[f"data.shards={labeled_shards}"])
    utts = load_utterances(str(labeled_shards), cfg.data)
    with caplog.at_level(logging.INFO, logger="finetune.counts"):
        log_counts(utts, cfg.data)
    speakers = [s for f in iemocap_folds()[::2] for s in (f.test, f.val)]
    expected = ", ".join(f"{s} 16" for s in sorted(speakers))
    assert f"utterances per speaker: {expected} (total 160)" in caplog.text
    warning = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warning) == 1 and f"the shards hold 160 utterances, the release {IEMOCAP_RELEASE_TOTAL}" in warning[0].message
    assert IEMOCAP_RELEASE_TOTAL == 5531

    # MSP-IMPROV: the release's total is its Evaluation.txt's distinct 4-class "S" records.
    release, shards = tmp_path / "msp", tmp_path / "shards"
    release.mkdir()
    shards.mkdir()
    (release / "Evaluation.txt").write_text("\n".join([
        "UTD-IMPROV-S01A-F01-S-FM01.avi; A; A:4.0; V:2.0; D:3.0;",
        "UTD-IMPROV-S01A-F01-S-FM01.avi; A; A:4.0; V:2.0; D:3.0;",  # the same recording again
        "UTD-IMPROV-S02H-M01-S-MF01.avi; H; A:3.0;",
        "UTD-IMPROV-S03N-F02-S-FM02.avi; N; A:3.0;",
        "UTD-IMPROV-S04S-M02-R-MF02.avi; S; A:2.0;",  # not a target sentence
        "UTD-IMPROV-S05A-F03-S-FM03.avi; X; A:2.0;",  # no 4-class label
        "Averaged scores",
    ]))
    Manifest(settings={"source": str(release)}).save(shards)
    msp = load_config(FinetuneConfig, overrides=[f"data.shards={shards}", "data.protocol=msp_improv"]).data
    assert release_total(msp) == (3, f"{release}/Evaluation.txt (4-class target-sentence records)")
    three = [_utt(f"u{i}", s) for i, s in enumerate(("F01", "M01", "F02"))]
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="finetune.counts"):
        log_counts(three, msp)
        assert "F01 1, F02 1, M01 1 (total 3)" in caplog.text and not any(r.levelno == logging.WARNING for r in caplog.records)
        log_counts(three[:2], msp)
    assert "the shards hold 2 utterances, the release 3" in caplog.text
    (release / "Evaluation.txt").unlink()
    assert release_total(msp) == (None, f"no Evaluation.txt in {release}, the release the shards were made from")


def test_labeled_corpora_keep_faceless_utterances_by_default() -> None:
    shards = PreprocessConfig().shards
    assert not shards.drops_faceless(labeled=True)  # every test utterance stays, with an empty visual track
    assert shards.drops_faceless(labeled=False)  # pretraining videos drop such clips, as the recipe
    keep = load_config(PreprocessConfig, [REPO / "configs/preprocess/labeled.yaml"]).shards
    assert not keep.drops_faceless(labeled=True) and not keep.drops_faceless(labeled=False)
    assert load_config(PreprocessConfig, overrides=["shards.missing_modality=drop"]).shards.drops_faceless(labeled=True)


def test_the_demo_finetunes_all_ten_folds_and_adds_bert_direct_on_request(tmp_path: Path) -> None:
    paths = (tmp_path / "shards", tmp_path / "model", tmp_path / "finetune")
    demo, full = (demo_finetune_config(DemoConfig(bert_direct=flag), *paths) for flag in (False, True))
    assert demo.fold_numbers == full.fold_numbers == list(range(1, 11))
    assert (full.data.shards, full.checkpoint, full.out_dir) == tuple(str(p) for p in paths)
    assert demo.settings == ["direct", "pretrain_finetune", "pretrain_prompt", "mfn", "m3er", "probe"]
    assert full.settings == ["direct", "bert_direct", "pretrain_finetune", "pretrain_prompt", "mfn", "m3er", "probe"]
    # Only the settings differ, and they are free to change in a finished out_dir: the demo's runs are reused.
    assert "settings" in run.RERUN_FREE_KEYS
    assert {**to_dict(demo), "settings": full.settings} == to_dict(full)


def test_the_demo_prints_what_the_generators_cues_allow_on_its_folds(tmp_path: Path, labeled_shards: Path) -> None:
    # A ground truth for the shards' utterances: the text cue always names the class, the audio cue never, the
    # face cue does except for Ses01M (fold 2's test speaker), whose wrong face and audio cues agree and outvote it.
    wrong = lambda label: CLASSES[(label + 1) % 4]  # noqa: E731
    turns = [{"name": u.key, "text_class": CLASSES[u.meta["label"]], "audio_class": wrong(u.meta["label"]),
              "face_class": wrong(u.meta["label"]) if u.meta["speaker"] == "Ses01M" else CLASSES[u.meta["label"]]}
             for u in load_utterances(str(labeled_shards), DataConfig())]
    corpus = tmp_path / "corpus"
    (corpus / "ground_truth" / "iemocap").mkdir(parents=True)
    (corpus / "ground_truth" / "iemocap" / "all.json").write_text(json.dumps({"turns": turns}))
    (corpus / "synth_summary.json").write_text(json.dumps({"config": {
        "text_reliability": 0.7, "audio_reliability": 0.7, "face_reliability": 0.7}}))
    demo = demo_finetune_config(DemoConfig(), labeled_shards, tmp_path / "model", tmp_path / "finetune")
    full = ceilings_summary(corpus, demo)
    assert full.endswith("fused per fold: 1: 100.0, 2: 0.0, " + ", ".join(f"{i}: 100.0" for i in range(3, 11)))
    assert "fused 90.0, text alone 100.0, audio alone 0.0, visual alone 90.0" in full
    two = ceilings_summary(corpus, replace(demo, folds=[1, 2]))  # the mean and the list follow the folds run
    assert "fused 50.0, text alone 100.0, audio alone 0.0, visual alone 50.0 (chance 25)" in two
    assert two.endswith("fused per fold: 1: 100.0, 2: 0.0")


def test_text_bert_folders_default_to_bert_base_and_a_missing_one_is_a_config_error(
    tmp_path: Path, labeled_shards: Path
) -> None:
    cfg = FinetuneConfig()
    assert cfg.model.bert_folder == cfg.mfn.word_embeddings == "checkpoints/bert-base-uncased"
    for name in ("iemocap", "msp_improv"):
        production = load_config(FinetuneConfig, [REPO / f"configs/finetune/{name}.yaml"])
        assert production.model.bert_folder == production.mfn.word_embeddings == "checkpoints/bert-base-uncased"
    demo = load_config(FinetuneConfig, [REPO / "configs/finetune/demo_cpu.yaml"])
    assert demo.model.bert_folder == demo.mfn.word_embeddings == "bundled"
    assert text_model("bert_direct", demo)["folder"] == default_vocab_folder()
    missing = tmp_path / "bert-base-uncased"
    common = [f"data.shards={labeled_shards}", f"out_dir={tmp_path / 'never'}"]
    with pytest.raises(ConfigError, match=f"config key 'model.bert_folder': no text-BERT folder {missing}"):
        check_ready(load_config(FinetuneConfig, overrides=[*common, "settings=bert_direct", f"model.bert_folder={missing}"]))
    with pytest.raises(ConfigError, match=f"config key 'mfn.word_embeddings': no text-BERT folder {missing}"):
        check_ready(load_config(FinetuneConfig, overrides=[*common, "settings=m3er", f"mfn.word_embeddings={missing}"]))
    # A setting that reads no text BERT does not need the folder.
    check_ready(load_config(FinetuneConfig, overrides=[*common, "settings=direct", f"model.bert_folder={missing}"]))
