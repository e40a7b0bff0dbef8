"""DenseNet-FER+: architecture arithmetic, FER+ vote parsing on the real CSV format, training, save/load."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import torch

from memobert.config import ConfigError, load_config
from preprocessing.config import PreprocessConfig, VisualConfig
from preprocessing.fer import (
    CROP,
    FERPLUS_LABELS,
    FLAVORS,
    VOTE_COLUMNS,
    DenseNet,
    FerTrainConfig,
    fer_encoder_from_config,
    load_fer_encoder,
    read_ferplus,
    train_fer,
)

NEU, HAP, SUR, SAD, ANG, DIS, FEA, CON, UNK, NF = range(10)



def votes(**counts: int) -> list[int]:
    """Ten FER+ vote counts from keyword counts, e.g. votes(neutral=6, happiness=3)."""
    return [counts.get(name, 0) for name in VOTE_COLUMNS]


def write_csv_pair(folder: Path, rows: list[tuple[str, str, list[int], np.ndarray]]) -> tuple[Path, Path]:
    """fer2013.csv + fer2013new.csv in the real column layout; rows: (Usage, Image name, votes, 48x48 uint8)."""
    fer, new = folder / "fer2013.csv", folder / "fer2013new.csv"
    with open(fer, "w", newline="") as fa, open(new, "w", newline="") as fb:
        wa, wb = csv.writer(fa), csv.writer(fb)
        wa.writerow(["emotion", "pixels", "Usage"])
        wb.writerow(["Usage", "Image name", *VOTE_COLUMNS])
        for usage, name, vote, image in rows:
            wa.writerow([int(np.argmax(vote[:7])), " ".join(map(str, image.ravel())), usage])
            wb.writerow([usage, name, *vote])
    return fer, new


def test_densenet_bc100_shape_and_size() -> None:
    spec = FLAVORS["full"]
    assert (spec.growth, spec.blocks, spec.init_features, spec.compression) == (12, (16, 16, 16), 24, 0.5)
    net = DenseNet(spec).eval()
    transitions = [m[2].out_channels for m in net.features if isinstance(m, torch.nn.Sequential)]
    assert transitions == [108, 150]  # 24+192=216 -> 108; 108+192=300 -> 150; 150+192 = 342
    with torch.no_grad():
        feats, logits = net(torch.randn(2, 1, 64, 64, generator=torch.Generator().manual_seed(0)))
    assert feats.shape == (2, 342) and logits.shape == (2, 8) and spec.feature_dim == 342
    params = sum(p.numel() for p in net.parameters())
    assert 0.7e6 < params < 0.85e6  # DenseNet-BC-100 (k=12) is ~0.8M parameters
    assert FLAVORS["tiny"].feature_dim == DenseNet(FLAVORS["tiny"]).head.in_features


ROWS = [
    # (Usage, Image name, votes, expected majority target, expected probability target); None = dropped
    ("Training", "fer0000000.png", votes(neutral=6, happiness=3, surprise=1), {NEU: 1}, {NEU: 6 / 9, HAP: 3 / 9}),
    ("Training", "", votes(NF=10), None, None),  # not a face: FER+ leaves the name empty
    ("Training", "fer0000002.png", votes(happiness=7, fear=1, contempt=1, sadness=1), {HAP: 1}, {HAP: 1}),  # single votes are noise
    ("PublicTest", "fer0000003.png", votes(unknown=6, sadness=4), None, None),  # unknown on top
    ("PublicTest", "fer0000004.png", [1, 1, 1, 1, 1, 1, 1, 1, 2, 0], None, None),  # only noise and unknown left
    ("PublicTest", "fer0000005.png", votes(anger=6, sadness=2, unknown=2), {ANG: 1}, {ANG: 0.75, SAD: 0.25}),  # unknown stops the scan
    ("PrivateTest", "fer0000006.png", votes(anger=4, disgust=4, contempt=2), None, {ANG: 0.5, DIS: 0.5}),  # no majority; tie kept
    ("PrivateTest", "fer0000007.png", votes(surprise=5, fear=3, sadness=2), None, {SUR: 5 / 8, FEA: 3 / 8}),  # 5 of 10 is not > half
    ("PrivateTest", "fer0000008.png", votes(neutral=3, happiness=3, surprise=2, sadness=2), None, None),  # 4 emotions: too spread
    ("PrivateTest", "fer0000009.png", votes(happiness=4, unknown=4, neutral=2), None, None),  # kept emotions hold <= half
]


@pytest.mark.parametrize("mode", ["majority", "probability"])
def test_vote_parsing_on_real_csv_format(tmp_path: Path, mode: str) -> None:
    rows = [(u, n, v, np.full((48, 48), 10 * i, np.uint8)) for i, (u, n, v, *_) in enumerate(ROWS)]
    fer, new = write_csv_pair(tmp_path, rows)
    splits = read_ferplus(fer, new, mode)  # type: ignore[arg-type]
    col = 3 if mode == "majority" else 4
    for split, usage in (("train", "Training"), ("val", "PublicTest"), ("test", "PrivateTest")):
        kept = [(i, row[col]) for i, row in enumerate(ROWS) if row[0] == usage and row[col] is not None]
        data = splits[split]
        assert data.images.shape == (len(kept), 64, 64) and data.images.dtype == np.uint8
        assert data.images[:, 0, 0].tolist() == [10 * i for i, _ in kept]  # which rows survived, in order
        for target, (_, expected) in zip(data.targets, kept):
            dense = np.zeros(len(FERPLUS_LABELS), np.float32)
            for k, v in expected.items():
                dense[k] = v
            np.testing.assert_allclose(target, dense, atol=1e-6)


def test_misaligned_csv_pair_is_rejected(tmp_path: Path) -> None:
    img = np.zeros((48, 48), np.uint8)
    fer, new = write_csv_pair(tmp_path, [("Training", "a.png", votes(neutral=10), img)])
    new.write_text(new.read_text().replace("Training,a.png", "PublicTest,a.png"))
    with pytest.raises(ValueError, match="row-aligned"):
        read_ferplus(fer, new, "majority")


def synthetic_ferplus(folder: Path, counts: tuple[int, int, int], seed: int = 0) -> tuple[Path, Path]:
    """A learnable FER+ stand-in: class c is horizontal stripes of c+1 cycles (random phase) plus noise."""
    rng = np.random.default_rng(seed)
    y = np.arange(48)[:, None]
    rows = []
    for usage, n in zip(("Training", "PublicTest", "PrivateTest"), counts):
        for i in range(n):
            c = int(rng.integers(8))
            image = 128 + 50 * np.sin(2 * np.pi * (c + 1) * y / 48 + rng.uniform(0, 2 * np.pi)) + rng.normal(0, 15, (48, 48))
            vote = [0] * 10
            vote[c] = 8
            vote[int(rng.integers(8))] += 2
            rows.append((usage, f"fer{len(rows):07d}.png", vote, np.clip(image, 0, 255).astype(np.uint8)))
    return write_csv_pair(folder, rows)


def test_train_fer_learns_and_checkpoint_roundtrips(tmp_path: Path) -> None:
    fer, new = synthetic_ferplus(tmp_path, (160, 40, 80))
    cfg = FerTrainConfig(epochs=5, batch_size=16, lr=0.1, flavor="tiny", device="cpu", seed=0)
    metrics = train_fer(fer, new, tmp_path / "fer.pt", cfg)
    assert metrics["samples"] == {"train": 160, "val": 40, "test": 80}
    assert metrics["test"] >= 0.5  # chance is 1/8

    enc = load_fer_encoder(tmp_path / "fer.pt", device="cpu", batch_size=32)
    test = read_ferplus(fer, new, "majority")["test"]
    train = read_ferplus(fer, new, "majority")["train"]
    assert enc.mean == pytest.approx(train.images.mean()) and enc.std == pytest.approx(train.images.std())
    feats, probs = enc.features_and_probs(test.images)
    assert feats.shape == (80, FLAVORS["tiny"].feature_dim) and probs.shape == (80, 8)
    np.testing.assert_allclose(probs.sum(1), 1.0, atol=1e-5)
    # The reloaded network reproduces the accuracy measured in memory before saving.
    assert float((probs.argmax(1) == test.targets.argmax(1)).mean()) == pytest.approx(metrics["test"])
    feats_float, _ = enc.features_and_probs(test.images.astype(np.float32))
    np.testing.assert_array_equal(feats, feats_float)
    assert len(enc.weights_sha256) == 64 and "fer.pt" in enc.name


def test_random_encoder_is_seeded_and_checks_input() -> None:
    crops = np.random.default_rng(0).integers(0, 256, (3, 64, 64), dtype=np.uint8)
    cfg = VisualConfig(flavor="tiny", device="cpu", batch_size=2)
    a = fer_encoder_from_config(cfg, seed=1)
    feats, probs = a.features_and_probs(crops)
    dim = FLAVORS["tiny"].feature_dim
    assert feats.shape == (3, dim) and probs.shape == (3, 8) and feats.dtype == np.float32
    again, _ = fer_encoder_from_config(cfg, seed=1).features_and_probs(crops)
    np.testing.assert_array_equal(feats, again)
    other, _ = fer_encoder_from_config(cfg, seed=2).features_and_probs(crops)
    assert not np.allclose(feats, other)
    empty_feats, empty_probs = a.features_and_probs(np.zeros((0, 64, 64), np.uint8))
    assert empty_feats.shape == (0, dim) and empty_probs.shape == (0, 8)
    with pytest.raises(ValueError, match="64, 64"):
        a.features_and_probs(np.zeros((2, 48, 48), np.uint8))


def test_face_crop_size_must_be_the_fer_input_size() -> None:
    assert load_config(PreprocessConfig, overrides=[f"face.crop_size={CROP}"]).face.crop_size == CROP
    with pytest.raises(ConfigError, match="'face.crop_size'.*must be 64"):  # before any work, not in the encoder actor
        load_config(PreprocessConfig, overrides=["face.crop_size=48"])
