"""Finetuning: fold splits, the prompt, every setting end to end on tiny labeled shards, reruns, the report.

One tiny pretraining run (a `memobert pretrain` subprocess) and its export are shared by the module.
The labeled shards use the real IEMOCAP speaker ids and carry a learnable class signal (a class token
in the text, class-shifted frame features), so a few epochs of a tiny model beat chance.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import BertConfig, BertForMaskedLM

from finetune.config import PAPER_SETTINGS, FinetuneConfig
from finetune.data import MODALITY_SUBSETS, batches, feature_dims, keep_modalities, load_utterances, split_fold
from finetune.prompt import Template, insert_template, label_word_scores
from finetune.protocols import CLASSES, folds_for, iemocap_folds, msp_improv_folds
from finetune.report import SETTING_NAMES, write_report
from finetune.run import check_and_save_config, check_ready, resolve_precision, run_finetune, run_path
from finetune.settings import build_model, text_model
from helpers import TINY_DIMS
from memobert.config import ConfigError, load_config
from memobert.schema import Utterance
from preprocessing.text import TextTokenizer, default_vocab_folder
from pretrain.export import export, load_model

REPO = Path(__file__).resolve().parents[1]
# A tiny model learns the class signal within a few epochs at a larger lr than the recipe's.
FAST = ["model.flavor=tiny", "train.lr=3e-3", "train.batch_size=16", "train.epochs=8", "train.patience=4",
        "train.device=cpu"]


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


def test_prompt_prediction_ignores_non_label_words(labeled_shards: Path, pretrained: dict[str, Path]) -> None:
    # The verbaliser alone: the trap word has the highest logit of the vocabulary in every row.
    logits = torch.randn(6, 50)
    label_ids = torch.tensor([7, 3, 11, 20])
    logits[:, 42] = 100.0
    pred = label_word_scores(logits, label_ids).argmax(-1)
    assert (logits.argmax(-1) == 42).all()
    assert pred.tolist() == [max(range(4), key=lambda c: logits[i, label_ids[c]].item()) for i in range(6)]

    # The real model: make a non-label word the MLM head's favourite through its output bias.
    cfg = load_config(FinetuneConfig, overrides=[f"data.shards={labeled_shards}"])
    tok = TextTokenizer()
    utts = load_utterances(str(labeled_shards), cfg.data)
    model = build_model("pretrain_prompt", cfg, feature_dims(utts), tok, load_model(pretrained["export"])).eval()
    vocab = tok.vocab_file.read_text().splitlines()
    assert [vocab[i] for i in model.label_ids.tolist()] == list(cfg.prompt.label_words)  # looked up by word, in CLASSES order
    trap = vocab.index("the")
    model.backbone.cls.predictions.bias.data[trap] = 1e4
    batch = next(batches(utts, 16, cfg.data, tok.cls_id, tok.sep_id))
    with torch.no_grad():
        full = model.vocab_logits(batch)
        scores = model(batch)
    assert (full.argmax(-1) == trap).all()
    assert scores.shape == (16, len(CLASSES))
    assert torch.equal(scores.argmax(-1), full[:, model.label_ids].argmax(-1))


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
        assert 1 <= record["selected_epoch"] <= 8
        assert record["val_uar"] == max(h["val_uar"] for h in record["history"])
        assert record["scores"]["uar"] > 0.5, (setting, record["scores"])  # chance is 0.25
        assert set(record["missing_modalities"]) == set(MODALITY_SUBSETS) - {"tav"}
        assert np.asarray(record["confusion"]).sum() == 16
        assert (out / "confusion" / f"{setting}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    bert = json.loads(run_path(out, "bert_direct", 42, 1).read_text())["text_model"]
    assert bert == {"folder": str(tiny_bert), "name": "tiny_bert", "layers": 1, "hidden": 32}
    assert json.loads(run_path(out, "pretrain_finetune", 42, 1).read_text())["text_model"] is None

    md = (out / "results.md").read_text()
    assert md in result.stdout
    assert "BERT+Direct starts from tiny_bert (layers 1, hidden 32) (the paper's: bert-base-uncased, layers 12, hidden 768)." in md
    assert "| Setting | WA | UAR | WF1 |" in md and "| Setting | T | A | V | T+A | T+V | A+V | T+A+V |" in md
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
    assert "| Direct | 50.00 ± 0.00 | 65.00 ± 5.00 | 40.00 ± 0.00 |" in md
    assert "folds 1, 2 of 10 (partial); seeds 42, 1234" in md
    assert "starts from" not in md and "word embeddings from" not in md  # direct starts from no text model
    assert (tmp_path / "results.csv").read_text().splitlines()[1] == (
        "direct,T+A+V,2,0.500000,0.000000,0.650000,0.050000,0.400000,0.000000")

    # The default bert_direct and MFN start from the bundled MiniLM, not the paper's bert-base-uncased: said under the table.
    cfg = load_config(FinetuneConfig, overrides=["settings=bert_direct,mfn", "seeds=[42, 1234]", "folds=[1, 2]"])
    assert text_model("direct", cfg) is None
    default = text_model("bert_direct", cfg)
    assert default == {"folder": default_vocab_folder(), "name": "MiniLM-L6-H384-uncased", "layers": 6, "hidden": 384}
    assert text_model("mfn", cfg) == default
    models = [{**r, "setting": s, "text_model": default} for s in ("bert_direct", "mfn") for r in records]
    md = write_report(tmp_path, cfg, models).read_text()
    note = md.index("BERT+Direct starts from MiniLM-L6-H384-uncased (layers 6, hidden 384) (the paper's: bert-base-uncased, "
                    "layers 12, hidden 768). MFN takes its word embeddings from MiniLM-L6-H384-uncased (layers 6, hidden 384).")
    assert md.index("| MFN |") < note < md.index("## Missing modalities")  # under the main table


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
