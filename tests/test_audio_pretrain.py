"""`memobert train-audio`: wav2vec 2.0 self-supervised training of the audio encoder, on tiny real audio files."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from safetensors.torch import load_file

from memobert.cli import main
from memobert.config import ConfigError, load_config
from preprocessing.audio_encoder import Wav2Vec2Encoder, load_audio
from preprocessing.audio_pretrain import (
    REPORT_NAME, AudioPretrainConfig, build_model, negative_indices, span_mask, train_audio_encoder,
)
from preprocessing.config import AudioConfig
from preprocessing.synth.audio import SR, random_voice, speech


def test_span_mask_masks_about_half_in_spans() -> None:
    mask = span_mask(np.random.default_rng(0), 64, 100, 0.65, 10)
    assert mask.shape == (64, 100)
    assert 0.35 < mask.mean() < 0.65  # 6-7 spans of 10 with overlaps: wav2vec 2.0's ~49%
    for row in mask:
        runs = np.diff(np.flatnonzero(np.diff(np.r_[0, row.astype(int), 0])))[::2]
        assert runs.min() >= 10  # every masked run is at least one whole span


def test_negatives_are_other_masked_frames_of_the_same_crop() -> None:
    rng = np.random.default_rng(1)
    mask = span_mask(rng, 3, 40, 0.65, 5)
    negatives = negative_indices(rng, mask, 20)
    assert negatives.shape == (3, 40, 20) and negatives.dtype == np.int64
    for b in range(3):
        for t in np.flatnonzero(mask[b]):
            drawn = negatives[b, t]
            assert (drawn // 40 == b).all()  # flattened index of the same crop
            assert mask[b, drawn % 40].all()  # masked frames only
            assert (drawn % 40 != t).all()  # never the positive itself


def test_bad_config_names_the_key() -> None:
    with pytest.raises(ConfigError, match="crop_seconds"):
        load_config(AudioPretrainConfig, [], ["crop_seconds=0.1"])
    with pytest.raises(ConfigError, match="mask_length"):
        load_config(AudioPretrainConfig, [], ["mask_length=1"])
    with pytest.raises(ConfigError, match="codevector_dim"):
        load_config(AudioPretrainConfig, [], ["codebooks=3"])


def test_load_audio_mixes_down_resamples_and_names_an_undecodable_file(tmp_path: Path) -> None:
    stereo = np.stack([np.full(8000, 0.5), np.full(8000, -0.1)], 1).astype(np.float32)
    sf.write(tmp_path / "stereo_8k.wav", stereo, 8000)
    wave = load_audio(tmp_path / "stereo_8k.wav")
    assert wave.dtype == np.float32 and len(wave) == 16000  # 1 s at 8 kHz -> 16 kHz
    assert abs(float(np.median(wave)) - 0.2) < 1e-3  # the channels' mean
    (tmp_path / "broken.wav").write_bytes(b"RIFF not really a wave")
    with pytest.raises(ValueError, match="broken.wav"):
        load_audio(tmp_path / "broken.wav")


@pytest.fixture(scope="module")
def audio_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Three 2-s synthetic utterances, one too short for a crop and one that does not decode."""
    folder = tmp_path_factory.mktemp("unlabeled")
    rng = np.random.default_rng(3)
    for i, emotion in enumerate(("anger", "neutral", "sadness")):
        sf.write(folder / f"utt{i}.wav", speech(rng, 2.0, random_voice(rng, i % 2 == 0), emotion), SR)
    sf.write(folder / "short.wav", speech(rng, 0.3, random_voice(rng, True), "happiness"), SR)
    (folder / "broken.wav").write_bytes(b"RIFF not really a wave")
    return folder


OVERRIDES = ["steps=12", "batch_size=4", "crop_seconds=1.0", "num_negatives=10", "log_every=4", "device=cpu"]


def test_train_audio_writes_an_encoder_that_preprocess_loads(audio_folder: Path, tmp_path: Path,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "w2v"
    main(["train-audio", "--input", str(audio_folder), "--out", str(out), *OVERRIDES])
    assert "contrastive loss" in capsys.readouterr().out

    report = json.loads((out / REPORT_NAME).read_text())
    assert set(report["skipped"]) == {str(audio_folder / "short.wav"), str(audio_folder / "broken.wav")}
    assert "broken.wav" in report["skipped"][str(audio_folder / "broken.wav")]
    assert report["files"] == 5 and report["files_used"] == 3 and report["audio_seconds"] == 6.0
    assert [r["step"] for r in report["history"]] == [1, 5, 9, 12]
    assert all(np.isfinite(r["loss"]) for r in report["history"])

    # Trained: the saved encoder differs from the same seed's initialisation, and preprocess loads it by folder.
    cfg = load_config(AudioPretrainConfig, [], OVERRIDES)
    torch.manual_seed(cfg.seed)
    initial = build_model(cfg).wav2vec2.state_dict()
    saved = load_file(out / "model.safetensors")
    assert set(saved) <= set(initial)
    assert not torch.equal(saved["encoder.layers.0.attention.q_proj.weight"], initial["encoder.layers.0.attention.q_proj.weight"])
    encoder = Wav2Vec2Encoder(AudioConfig(weights=str(out), device="cpu"))
    assert encoder.name.startswith("wav2vec2/transformers/w2v/") and encoder.dim == 64
    features = encoder.encode([load_audio(audio_folder / "utt0.wav")])[0]
    assert features.shape == (encoder.frames(2 * SR), 64) and np.isfinite(features).all()


def test_train_audio_is_a_function_of_its_seed(audio_folder: Path, tmp_path: Path) -> None:
    cfg = load_config(AudioPretrainConfig, [], OVERRIDES)
    train_audio_encoder([audio_folder], tmp_path / "a", cfg)
    train_audio_encoder([audio_folder], tmp_path / "b", cfg)
    assert (tmp_path / "a/model.safetensors").read_bytes() == (tmp_path / "b/model.safetensors").read_bytes()


def test_train_audio_without_usable_audio_names_the_input(tmp_path: Path) -> None:
    (tmp_path / "only.wav").write_bytes(b"RIFF not really a wave")
    with pytest.raises(ValueError, match="none of 1 files"):
        train_audio_encoder([tmp_path], tmp_path / "out", AudioPretrainConfig(device="cpu"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no video"):
        train_audio_encoder([tmp_path / "empty"], tmp_path / "x", AudioPretrainConfig(device="cpu"))
