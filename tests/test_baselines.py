"""Baselines: M3ER's modality check, proxies and multiplicative loss, MFN's memory step, both through the driver.

The parts are checked on synthetic features with a known correlation structure; the driver run uses tiny
labeled shards with the real IEMOCAP speaker ids and a learnable class signal (as tests/test_finetune.py).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from finetune.baselines.inputs import MODALITIES, Aligned, time_bins, word_vectors
from finetune.baselines.m3er import multiplicative_loss
from finetune.baselines.mfn import MFNCore
from finetune.baselines.modality_check import ModalityCheck
from finetune.baselines.proxy import ProxyMaps
from finetune.config import BASELINE_SETTINGS, FinetuneConfig, MFNConfig
from finetune.data import MODALITY_SUBSETS, batches, feature_dims, keep_modalities, load_utterances
from finetune.report import SETTING_NAMES
from finetune.run import check_and_save_config, run_finetune, run_path
from finetune.settings import build_model
from memobert.config import ConfigError, load_config, to_dict
from preprocessing.text import TextTokenizer

# 48 steps (6 passes) at a larger lr than MFN's 1e-3, without dropout: the class signal is learnt within them.
FAST = ["mfn.lr=3e-3", "mfn.dropout=0.0", "mfn.word_embeddings=bundled", "train.batch_size=16", "train.steps=48",
        "train.val_every=8", "train.patience=3", "train.device=cpu"]
DIMS = (16, 12, 20)  # synthetic text / acoustic / visual feature sizes




def _correlated(rng: np.random.Generator, n: int, steps: int = 1, latent: int = 8) -> list[torch.Tensor]:
    """[n, steps, D_m] per modality: a shared latent mixed into each (fixed mixing), noise, an offset."""
    mix = [np.random.default_rng(100 + m).standard_normal((latent, d)) for m, d in enumerate(DIMS)]
    offsets = [np.random.default_rng(200 + m).standard_normal(d) * 3 for m, d in enumerate(DIMS)]
    z = rng.standard_normal((n, steps, latent))
    return [torch.tensor(z @ a + 0.5 * rng.standard_normal((n, steps, a.shape[1])) + o, dtype=torch.float32)
            for a, o in zip(mix, offsets)]


def _summaries(rng: np.random.Generator, n: int) -> list[torch.Tensor]:
    return [x[:, 0] for x in _correlated(rng, n)]


def _all_present(n: int) -> torch.Tensor:
    return torch.ones(n, len(DIMS), dtype=torch.bool)


def _mse(guess: torch.Tensor, truth: torch.Tensor) -> float:
    return ((guess - truth) ** 2).mean().item()


def test_modality_check_flags_a_noisy_modality_and_not_clean_ones() -> None:
    rng = np.random.default_rng(0)
    check = ModalityCheck(DIMS, pca_dim=10, cca_dim=8)
    check.fit(_summaries(rng, 300), _all_present(300))
    chosen = check.choose_threshold(_summaries(rng, 100), _all_present(100), [0.0, 0.2, 0.4, 0.6, 0.8])
    assert chosen["threshold"] in (0.2, 0.4, 0.6, 0.8) and float(check.threshold) == pytest.approx(chosen["threshold"])

    test = _summaries(rng, 300)
    assert check(test, _all_present(300)).float().mean() < 0.02  # clean samples: (almost) nothing flagged
    noisy = list(test)
    noise = torch.randn(test[1].shape, generator=torch.Generator().manual_seed(2))
    noisy[1] = noise * test[1].std(0) + test[1].mean(0)  # same marginals, no correlation
    flagged = check(noisy, _all_present(300)).float().mean(0)
    assert flagged[1] > 0.9 and flagged[0] < 0.02 and flagged[2] < 0.02, flagged

    # Nothing to trust more: a lone modality, or two that disagree, are never flagged.
    two = torch.tensor([[True, True, False]] * 300)
    assert not check(noisy, two).any() and not check(noisy, torch.tensor([[False, True, False]] * 300)).any()


def test_proxy_features_beat_zero_filling() -> None:
    rng = np.random.default_rng(1)
    maps = ProxyMaps(DIMS, ridge=1e-3)
    train = _correlated(rng, 200, steps=5)
    maps.fit([Aligned(train, _all_present(200))])
    test = _correlated(rng, 100, steps=5)
    removed = [*test[:2], torch.zeros_like(test[2])]  # the visual modality is gone
    ineffective = torch.tensor([[False, False, True]] * 100)
    out, filled = maps(removed, ineffective)
    assert filled.tolist() == ineffective.tolist() and torch.equal(out[0], test[0]) and torch.equal(out[1], test[1])
    assert _mse(out[2], test[2]) < 0.2 * _mse(removed[2], test[2])
    assert _mse(out[2], test[2]) < 0.5 * _mse(train[2].mean((0, 1)), test[2])  # the correlation, not just the mean

    # From the acoustic modality alone (text ineffective too): still far better than zeros.
    out, filled = maps([torch.zeros_like(test[0]), test[1], torch.zeros_like(test[2])],
                       torch.tensor([[True, False, True]] * 100))
    assert filled[:, [0, 2]].all() and _mse(out[2], test[2]) < 0.5 * _mse(removed[2], test[2])


def test_multiplicative_loss_by_hand_and_beta_zero() -> None:
    # Two classes, three modalities, one sample of class 0: p_i^y = 0.5, 0.25, 0.8.
    p = torch.tensor([0.5, 0.25, 0.8])
    log_probs = torch.stack([p, 1 - p], dim=-1).log()[:, None, :]  # [M=3, B=1, C=2]
    label = torch.tensor([0])
    # beta = 0.5, M - 1 = 2: w_i = (prod_{j != i} (1 - p_j))^0.25
    w = [(0.75 * 0.2) ** 0.25, (0.5 * 0.2) ** 0.25, (0.5 * 0.75) ** 0.25]
    by_hand = -(w[0] * math.log(0.5) + w[1] * math.log(0.25) + w[2] * math.log(0.8))
    assert multiplicative_loss(log_probs, label, 0.5).item() == pytest.approx(by_hand, rel=1e-6)
    product_nll = -(math.log(0.5) + math.log(0.25) + math.log(0.8))
    assert multiplicative_loss(log_probs, label, 0.0).item() == pytest.approx(product_nll, rel=1e-6)

    # beta = 0 over a batch: the mean NLL of the product of the modality distributions.
    logits = torch.randn(3, 5, 4, generator=torch.Generator().manual_seed(0)).requires_grad_()
    labels = torch.tensor([0, 3, 1, 2, 0])
    log_probs = logits.log_softmax(-1)
    expected = -log_probs.sum(0).gather(1, labels[:, None]).mean()
    assert torch.allclose(multiplicative_loss(log_probs, labels, 0.0), expected)


def test_mfn_memory_step_and_state_shapes() -> None:
    torch.manual_seed(0)
    cfg = MFNConfig()  # the released MOSI sizes: cells 64 / 16 / 32, memory 128, window 2
    core = MFNCore(DIMS, cfg).eval()
    star = 2 * sum(cfg.cells)
    memory = torch.randn(6, cfg.memory)
    step = core.memory_step(torch.randn(6, star), memory)
    assert step.attention.shape == (6, star) and torch.allclose(step.attention.sum(-1), torch.ones(6))
    assert (step.attention > 0).all()
    for gate in (step.retain, step.update):
        assert gate.shape == (6, cfg.memory) and ((gate > 0) & (gate < 1)).all()
    assert step.proposal.shape == (6, cfg.memory) and (step.proposal.abs() < 1).all()
    assert torch.allclose(step.memory, step.retain * memory + step.update * step.proposal)

    seqs = [torch.randn(6, cfg.steps, d) for d in DIMS]
    state = core(seqs, _all_present(6))
    assert [h.shape for h in state.hidden] == [(6, 64), (6, 16), (6, 32)] and state.memory.shape == (6, 128)
    wide = MFNCore(DIMS, MFNConfig(window=3))
    assert wide.attention[0].in_features == 3 * sum(cfg.cells) and wide(seqs, _all_present(6)).memory.shape == (6, 128)


def test_aligned_inputs_pool_words_and_frames() -> None:
    # 5 frames into 2 bins: adaptive pooling bins 0..2 and 2..4; 1 frame into 3 bins repeats it.
    x = torch.arange(5.0)[None, :, None].repeat(2, 1, 1)
    mask = torch.tensor([[True] * 5, [True] + [False] * 4])
    assert time_bins(x, mask, 2)[..., 0].tolist() == [[1.0, 3.0], [0.0, 0.0]]
    assert time_bins(x, mask, 3)[1, :, 0].tolist() == [0.0, 0.0, 0.0]
    assert not time_bins(x, torch.zeros_like(mask), 4).any()  # an empty modality: zeros
    # Tokens 7, 8 form word 0, token 9 word 1; [CLS] / [SEP] / padding (-1) belong to no word.
    table = torch.arange(20.0)[:, None].repeat(1, 2)
    vectors, words = word_vectors(table, torch.tensor([[1, 7, 8, 9, 2, 0]]), torch.tensor([[-1, 0, 0, 1, -1, -1]]))
    assert vectors[0, :, 0].tolist() == [7.5, 9.0] and words.tolist() == [[True, True]]


def test_m3er_parts_switch_off_and_proxy_missing_modalities(labeled_shards: Path) -> None:
    base = [f"data.shards={labeled_shards}", "mfn.cells=[8, 4, 4]", "mfn.memory=16", "mfn.word_embeddings=bundled"]
    off = ["m3er.modality_check=false", "m3er.proxy=false", "m3er.multiplicative_loss=false"]
    tok = TextTokenizer()
    cfg = load_config(FinetuneConfig, overrides=[*base, *off])
    utts = load_utterances(str(labeled_shards), cfg.data)
    dims = feature_dims(utts)
    batch = next(batches(utts[:16], 16, cfg.data, tok.cls_id, tok.sep_id))
    models = {}
    for setting in BASELINE_SETTINGS:
        torch.manual_seed(0)
        models[setting] = build_model(setting, cfg, dims, tok, None).eval()
        assert models[setting].prepare(lambda: iter([batch]), lambda: iter([batch])) == {}
    with torch.no_grad():  # every part off: M3ER is MFN, weight for weight
        assert torch.equal(models["mfn"](batch), models["m3er"](batch))

    full = build_model("m3er", load_config(FinetuneConfig, overrides=base), dims, tok, None).eval()
    fitted = full.prepare(lambda: iter([batch]), lambda: iter([batch]))
    assert fitted["threshold"] in full.thresholds and set(fitted["val_flagged"]) == set(MODALITIES)
    assert len(full.heads) == 3 and full(batch).shape == (16, 4) and full.loss(batch).ndim == 0
    only_audio = next(batches(keep_modalities(utts[:16], "a"), 16, cfg.data, tok.cls_id, tok.sep_id))
    aligned = full.inputs(only_audio)
    assert aligned.present[:, 1].all() and not aligned.present[:, [0, 2]].any()
    repaired = full.repair(aligned)
    assert repaired.present.all() and repaired.seqs[2].abs().sum() > 0  # text and visual proxied from audio


@pytest.mark.slow
def test_baselines_beat_chance_through_the_driver(tmp_path: Path, labeled_shards: Path) -> None:
    out = tmp_path / "finetune"
    overrides = [f"data.shards={labeled_shards}", "settings=mfn,m3er", "seeds=[42]", "folds=[1]", f"out_dir={out}", *FAST]
    results = run_finetune(load_config(FinetuneConfig, overrides=overrides))
    for setting in BASELINE_SETTINGS:
        record = json.loads(run_path(out, setting, 42, 1).read_text())
        assert record["samples"] == {"train": 128, "val": 16, "test": 16}
        assert record["scores"]["uar"] > 0.5, (setting, record["scores"])  # chance is 0.25
        assert set(record["missing_modalities"]) == set(MODALITY_SUBSETS) - {"tav"}
    fitted = json.loads(run_path(out, "m3er", 42, 1).read_text())["fitted"]
    assert fitted["threshold"] in FinetuneConfig().m3er.thresholds and set(fitted["val_flagged"]) == set(MODALITIES)
    md = results.read_text()
    for setting in BASELINE_SETTINGS:  # one row in the main table, one in the missing-modality table
        assert md.count(f"| {SETTING_NAMES[setting]} | ") == 2
    # The language input's source, the bundled MiniLM by default, under the main table.
    assert ("MFN takes its word embeddings from MiniLM-L6-H384-uncased (layers 6, hidden 384). "
            "M3ER takes its word embeddings from MiniLM-L6-H384-uncased (layers 6, hidden 384).") in md
    assert len((out / "missing_modalities.csv").read_text().splitlines()) == 1 + 7 * len(BASELINE_SETTINGS)

    assert json.loads((out / "config.json").read_text())["mfn"]["lr"] == 3e-3  # the sections are saved


def test_out_dirs_from_before_the_baselines_take_their_defaults(tmp_path: Path) -> None:
    # A config.json written before the mfn / m3er sections existed: their keys count as the defaults.
    old = to_dict(FinetuneConfig())
    del old["mfn"], old["m3er"]
    (tmp_path / "config.json").write_text(json.dumps(old))
    check_and_save_config(tmp_path, load_config(FinetuneConfig, overrides=["settings=mfn,m3er"]))
    assert json.loads((tmp_path / "config.json").read_text())["m3er"]["beta"] == 0.5
    with pytest.raises(ConfigError, match="'mfn.lr'"):  # but not runs made under other baseline values
        check_and_save_config(tmp_path, load_config(FinetuneConfig, overrides=["mfn.lr=3e-3"]))
    with pytest.raises(ConfigError, match="'mfn.window'"):
        load_config(FinetuneConfig, overrides=["mfn.window=1"])
    with pytest.raises(ConfigError, match="'m3er.beta'"):
        load_config(FinetuneConfig, overrides=["m3er.beta=2"])
