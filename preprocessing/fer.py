"""DenseNet-FER+ visual encoder: the network, FER+ data, training and the inference wrapper.

DenseNet-BC-100 as MEmoBERT used it (docs/recipe.md): growth 12, three dense blocks of 16
bottleneck layers, 24 initial features, compression 0.5, on 64x64 grey faces. Feature width:
24 -> +16*12 = 216 -> transition 108 -> +192 = 300 -> transition 150 -> +192 = 342, then an 8-way head
over the FER+ classes. Inputs are grey values on the 0..255 scale, normalised by the mean/std of the
FER+ training split that the checkpoint stores.
"""

from __future__ import annotations

import copy
import csv
import itertools
import logging
import math
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm import tqdm

from memobert.config import check
from preprocessing.audio_encoder import resolve_device, sha256_file, sha256_state
from preprocessing.config import VisualConfig

log = logging.getLogger(__name__)

FERPLUS_LABELS = ("neutral", "happiness", "surprise", "sadness", "anger", "disgust", "fear", "contempt")
VOTE_COLUMNS = FERPLUS_LABELS + ("unknown", "NF")  # fer2013new.csv vote columns, in file order
SPLITS = {"Training": "train", "PublicTest": "val", "PrivateTest": "test"}
CROP = 64  # network input side; FER2013's 48x48 images are upscaled to it
CHECKPOINT_FORMAT = "memobert.densenet_fer.v1"


@dataclass(frozen=True)
class DenseNetSpec:
    """DenseNet-BC settings; the defaults are DenseNet-BC-100 (k=12)."""

    growth: int = 12
    blocks: tuple[int, ...] = (16, 16, 16)
    init_features: int = 24
    compression: float = 0.5
    bottleneck: int = 4  # 1x1 bottleneck conv width = bottleneck * growth (the "B" of BC)

    @property
    def feature_dim(self) -> int:
        """Width of the pooled feature (342 for DenseNet-BC-100)."""
        width = self.init_features
        for i, layers in enumerate(self.blocks):
            width += layers * self.growth
            if i < len(self.blocks) - 1:
                width = math.floor(width * self.compression)
        return width


FLAVORS = {
    "full": DenseNetSpec(),
    # CPU tests and demo: 2 layers per block, growth 6, 12 initial features, 2x bottleneck -> 24-d features.
    "tiny": DenseNetSpec(growth=6, blocks=(2, 2, 2), init_features=12, bottleneck=2),
}


class _DenseLayer(nn.Module):
    def __init__(self, width: int, growth: int, bottleneck: int) -> None:
        super().__init__()
        inner = bottleneck * growth
        self.net = nn.Sequential(
            nn.BatchNorm2d(width), nn.ReLU(inplace=True), nn.Conv2d(width, inner, 1, bias=False),
            nn.BatchNorm2d(inner), nn.ReLU(inplace=True), nn.Conv2d(inner, growth, 3, padding=1, bias=False),
        )

    def forward(self, x: Tensor) -> Tensor:
        return torch.cat([x, self.net(x)], 1)


def _transition(width: int, out: int) -> nn.Sequential:
    return nn.Sequential(nn.BatchNorm2d(width), nn.ReLU(inplace=True), nn.Conv2d(width, out, 1, bias=False), nn.AvgPool2d(2))


class DenseNet(nn.Module):
    """DenseNet-BC on 1x64x64 inputs: (pooled features [N, feature_dim], logits [N, classes])."""

    def __init__(self, spec: DenseNetSpec, num_classes: int = len(FERPLUS_LABELS)) -> None:
        super().__init__()
        self.spec = spec
        layers: list[nn.Module] = [nn.Conv2d(1, spec.init_features, 3, padding=1, bias=False)]
        width = spec.init_features
        for i, count in enumerate(spec.blocks):
            for _ in range(count):
                layers.append(_DenseLayer(width, spec.growth, spec.bottleneck))
                width += spec.growth
            if i < len(spec.blocks) - 1:
                out = math.floor(width * spec.compression)
                layers.append(_transition(width, out))
                width = out
        layers += [nn.BatchNorm2d(width), nn.ReLU(inplace=True)]
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(width, num_classes)
        for m in self.modules():  # the DenseNet reference initialisation
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight)
            elif isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        feats = self.features(x).mean((2, 3))
        return feats, self.head(feats)


# ---------------------------------------------------------------------------- FER+ data


def parse_votes(votes: Sequence[float], mode: Literal["majority", "probability"]) -> np.ndarray | None:
    """FER+ reference label processing (Microsoft FERPlus `_process_data`): 8-way target, or None to drop.

    Votes are the 10 counts in VOTE_COLUMNS order. Single votes are zeroed as noise. "majority" keeps the
    argmax only with more than half of the remaining votes (one-hot). "probability" keeps the top emotions
    (up to 3, greedily until 75% of the votes, ties taken together; unknown/NF stop the scan) as a
    distribution, and drops the face when they hold no more than half the votes or are more than 3.
    Faces whose top label is unknown or NF are dropped; the 8 emotions are renormalised.
    """
    raw = [0.0 if v < 1.0 + sys.float_info.epsilon else float(v) for v in votes]
    total = sum(raw)
    kept = [0.0] * len(raw)
    count = 0
    if mode == "majority":
        top = max(raw)
        if top <= 0.5 * total:
            return None
        kept[int(np.argmax(raw))] = top
    else:
        part, valid = 0.0, True
        while part < 0.75 * total and count < 3 and valid:
            top = max(raw)
            for i in range(len(raw)):
                if raw[i] == top:
                    kept[i], raw[i] = top, 0.0
                    part += top
                    count += 1
                    if i >= len(FERPLUS_LABELS):  # unknown / NF reached: stop, and drop it if emotions came first
                        valid = False
                        if sum(kept) > top:
                            kept[i] = 0.0
                            count -= 1
                        break
        if sum(kept) <= 0.5 * total or count > 3:
            return None
    if int(np.argmax(kept)) >= len(FERPLUS_LABELS):
        return None
    emotions = np.asarray(kept[: len(FERPLUS_LABELS)], dtype=np.float32)
    return emotions / emotions.sum()


@dataclass
class FerSplit:
    """One FER+ split: upscaled grey faces and their 8-way targets."""

    images: np.ndarray  # uint8 [N, 64, 64]
    targets: np.ndarray  # float32 [N, 8]; one-hot in majority mode


def read_ferplus(fer2013: Path, ferplus: Path, mode: Literal["majority", "probability"]) -> dict[str, FerSplit]:
    """train/val/test splits from fer2013.csv (pixels) and fer2013new.csv (FER+ votes), row-aligned."""
    with open(fer2013, newline="") as fa, open(ferplus, newline="") as fb:
        images_rows, votes_rows = csv.DictReader(fa), csv.DictReader(fb)
        missing = [c for c in ("Usage", "Image name", *VOTE_COLUMNS) if c not in (votes_rows.fieldnames or [])]
        if missing:
            raise ValueError(f"{ferplus}: missing columns {missing} (expected the FER+ fer2013new.csv header)")
        faces: dict[str, list[np.ndarray]] = {s: [] for s in SPLITS.values()}
        targets: dict[str, list[np.ndarray]] = {s: [] for s in SPLITS.values()}
        line = 1
        for line, (img, lab) in enumerate(itertools.zip_longest(images_rows, votes_rows), start=2):
            if img is None or lab is None:
                raise ValueError(f"{fer2013} and {ferplus} differ in length (line {line}): they must be row-aligned")
            if img["Usage"] != lab["Usage"]:
                raise ValueError(
                    f"{fer2013} and {ferplus} are not row-aligned at line {line}: Usage {img['Usage']!r} vs {lab['Usage']!r}"
                )
            if not lab["Image name"].strip():  # FER+ left the name empty where NF = 10 (not a face)
                continue
            target = parse_votes([float(lab[c]) for c in VOTE_COLUMNS], mode)
            if target is None:
                continue
            split = SPLITS.get(img["Usage"])
            if split is None:
                raise ValueError(f"{fer2013} line {line}: unknown Usage {img['Usage']!r} (expected {list(SPLITS)})")
            pixels = np.array(img["pixels"].split(), dtype=np.uint8)
            if pixels.size != 48 * 48:
                raise ValueError(f"{fer2013} line {line}: expected 2304 pixels, got {pixels.size}")
            faces[split].append(pixels.reshape(48, 48))
            targets[split].append(target)
    log.info("FER+ (%s): %s faces kept of %d rows", mode, {s: len(v) for s, v in faces.items()}, line - 1)
    return {
        s: FerSplit(_upscale(np.stack(faces[s]) if faces[s] else np.zeros((0, 48, 48), np.uint8)),
                    np.stack(targets[s]) if targets[s] else np.zeros((0, len(FERPLUS_LABELS)), np.float32))
        for s in SPLITS.values()
    }


def _upscale(images: np.ndarray) -> np.ndarray:
    """uint8 [N, 48, 48] -> uint8 [N, 64, 64], bilinear."""
    out = np.empty((len(images), CROP, CROP), np.uint8)
    for start in range(0, len(images), 4096):
        chunk = torch.from_numpy(images[start : start + 4096]).float()[:, None]
        up = F.interpolate(chunk, size=(CROP, CROP), mode="bilinear", align_corners=False)
        out[start : start + 4096] = up[:, 0].round().clamp(0, 255).to(torch.uint8).numpy()
    return out


# ---------------------------------------------------------------------------- training


@dataclass
class FerTrainConfig:
    """`memobert train-fer`. The authors did not publish their FER+ recipe: this is the DenseNet CIFAR recipe, shortened."""

    epochs: int = 60
    batch_size: int = 64
    lr: float = 0.1  # SGD (Nesterov, momentum 0.9), cosine decay to 0
    weight_decay: float = 1e-4
    mode: Literal["majority", "probability"] = "majority"  # probability: soft-target cross-entropy on the vote distribution
    flavor: Literal["full", "tiny"] = "full"
    augment: bool = True  # random 64x64 crop of the 4-pixel reflect-padded face, random horizontal flip
    seed: int = 0
    device: str = "auto"

    def validate(self) -> None:
        check(self.epochs >= 1, "epochs", "must be >= 1")
        check(self.batch_size >= 2, "batch_size", "must be >= 2 (BatchNorm needs more than one sample)")
        check(self.lr > 0, "lr", "must be positive")


def train_fer(fer2013: Path, ferplus: Path, out: Path, cfg: FerTrainConfig) -> dict[str, Any]:
    """Train DenseNet-FER+, keep the epoch with the best validation accuracy, save it to `out`; returns the metrics."""
    cfg.validate()
    device = resolve_device(cfg.device)
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    data = read_ferplus(Path(fer2013), Path(ferplus), cfg.mode)
    train = data["train"]
    if len(train.images) < cfg.batch_size:
        raise ValueError(f"{ferplus}: {len(train.images)} training faces kept; need at least batch_size={cfg.batch_size}")
    mean, std = float(train.images.mean()), float(train.images.std()) or 1.0
    model = DenseNet(FLAVORS[cfg.flavor]).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=0.9, nesterov=True, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, cfg.epochs * (len(train.images) // cfg.batch_size))
    best_acc, best_epoch, best_state = -1.0, 0, copy.deepcopy(model.state_dict())
    for epoch in range(1, cfg.epochs + 1):
        loss = _train_epoch(model, opt, sched, train, (mean, std), cfg, rng, device, f"fer epoch {epoch}/{cfg.epochs}")
        val_acc = _accuracy(model, data["val"], mean, std, device) if len(data["val"].images) else None
        log.info("fer epoch %d/%d: train loss %.4f, val accuracy %s", epoch, cfg.epochs, loss, val_acc)
        if val_acc is None or val_acc > best_acc:  # without a validation split the latest epoch is kept
            best_acc, best_epoch, best_state = val_acc or 0.0, epoch, copy.deepcopy(model.state_dict())
    model.load_state_dict(best_state)
    metrics: dict[str, Any] = {s: _accuracy(model, d, mean, std, device) if len(d.images) else None for s, d in data.items()}
    metrics |= {"best_epoch": best_epoch, "samples": {s: len(d.images) for s, d in data.items()}, "checkpoint": str(out)}
    log.info("fer accuracy at epoch %d: %s", best_epoch, {s: metrics[s] for s in data})
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.cpu() for k, v in model.state_dict().items()}
    torch.save({
        "format": CHECKPOINT_FORMAT, "spec": asdict(model.spec), "state_dict": state, "mean": mean, "std": std,
        "labels": list(FERPLUS_LABELS), "train_config": asdict(cfg), "metrics": metrics,
    }, out)
    return metrics


def _train_epoch(
    model: DenseNet, opt: torch.optim.Optimizer, sched: torch.optim.lr_scheduler.LRScheduler, split: FerSplit,
    norm: tuple[float, float], cfg: FerTrainConfig, rng: np.random.Generator, device: torch.device, desc: str,
) -> float:
    """One pass over the shuffled training split (soft-target cross-entropy); returns the mean loss."""
    model.train()
    order = rng.permutation(len(split.images))
    steps = len(split.images) // cfg.batch_size  # the ragged tail is dropped: BatchNorm dislikes tiny batches
    total = 0.0
    for step in tqdm(range(steps), desc=desc, leave=False, disable=None):
        idx = order[step * cfg.batch_size : (step + 1) * cfg.batch_size]
        x = _normalise(torch.from_numpy(split.images[idx]).to(device), *norm)
        if cfg.augment:
            x = _augment(x, rng)
        _, logits = model(x)
        loss = -(torch.from_numpy(split.targets[idx]).to(device) * F.log_softmax(logits, 1)).sum(1).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        total += loss.item()
    return total / steps


def _normalise(x: Tensor, mean: float, std: float) -> Tensor:
    """Grey values (0..255) [N, H, W] -> normalised float [N, 1, H, W]."""
    return ((x.float() - mean) / std)[:, None]


def _augment(x: Tensor, rng: np.random.Generator) -> Tensor:
    """Random 64x64 crop of the 4-pixel reflect-padded batch (one shift per batch) and per-sample horizontal flips."""
    dy, dx = rng.integers(0, 9, size=2)
    x = F.pad(x, (4, 4, 4, 4), mode="reflect")[:, :, dy : dy + CROP, dx : dx + CROP]
    flip = torch.from_numpy(rng.random(len(x)) < 0.5).to(x.device)
    return torch.where(flip[:, None, None, None], x.flip(3), x)


@torch.no_grad()
def _accuracy(model: DenseNet, split: FerSplit, mean: float, std: float, device: torch.device) -> float:
    """Share of faces whose predicted class is the target's top class."""
    model.eval()
    hits = 0
    for start in range(0, len(split.images), 512):
        x = _normalise(torch.from_numpy(split.images[start : start + 512]).to(device), mean, std)
        pred = model(x)[1].argmax(1).cpu().numpy()
        hits += int((pred == split.targets[start : start + 512].argmax(1)).sum())
    return hits / len(split.images)


# ---------------------------------------------------------------------------- inference


class FerEncoder:
    """Frozen DenseNet-FER+: 64x64 grey face crops -> (features [N, feature_dim], FER+ softmax [N, 8])."""

    def __init__(self, model: DenseNet, mean: float, std: float, *, device: str = "auto", batch_size: int = 256,
                 weights_file: Path | None = None, seed: int | None = None) -> None:
        self.device = resolve_device(device)
        self.model = model.eval().to(self.device)
        self.mean, self.std, self.batch_size = mean, std, batch_size
        self.weights_file, self._seed = weights_file, seed
        self._sha256: str | None = None

    @property
    def feature_dim(self) -> int:
        """Feature width (342 for DenseNet-BC-100)."""
        return self.model.spec.feature_dim

    @property
    def name(self) -> str:
        """Extractor name for the manifest."""
        source = self.weights_file.name if self.weights_file else f"random-seed{self._seed}"
        return f"densenet-fer/g{self.model.spec.growth}-b{'-'.join(map(str, self.model.spec.blocks))}/{source}"

    @property
    def weights_sha256(self) -> str:
        """sha256 of the checkpoint file, or of the parameters of a random network."""
        if self._sha256 is None:
            self._sha256 = sha256_file(self.weights_file) if self.weights_file else sha256_state(self.model)
        return self._sha256

    @torch.inference_mode()
    def features_and_probs(self, crops: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Grey crops [N, 64, 64] (uint8, or float on the same 0..255 scale) -> float32 ([N, F], softmax [N, 8])."""
        crops = np.asarray(crops)
        if crops.ndim != 3 or crops.shape[1:] != (CROP, CROP):
            raise ValueError(f"expected grey crops [N, {CROP}, {CROP}], got shape {crops.shape}")
        feats, probs = [], []
        for start in range(0, len(crops), self.batch_size):
            chunk = torch.from_numpy(np.ascontiguousarray(crops[start : start + self.batch_size])).to(self.device)
            x = _normalise(chunk, self.mean, self.std)
            f, logits = self.model(x)
            feats.append(f.float().cpu().numpy())
            probs.append(logits.float().softmax(1).cpu().numpy())
        if not feats:
            return np.zeros((0, self.feature_dim), np.float32), np.zeros((0, len(FERPLUS_LABELS)), np.float32)
        return np.concatenate(feats), np.concatenate(probs)


def load_fer_encoder(path: str | Path, *, device: str = "auto", batch_size: int = 256) -> FerEncoder:
    """The encoder saved by `train_fer` (weights, architecture, normalisation and label order)."""
    path = Path(path)
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path}: not a DenseNet-FER+ checkpoint from `memobert train-fer`")
    if tuple(ckpt["labels"]) != FERPLUS_LABELS:
        raise ValueError(f"{path}: label order {ckpt['labels']} differs from {list(FERPLUS_LABELS)}")
    spec = ckpt["spec"]
    model = DenseNet(DenseNetSpec(**{**spec, "blocks": tuple(spec["blocks"])}))
    model.load_state_dict(ckpt["state_dict"])
    return FerEncoder(model, ckpt["mean"], ckpt["std"], device=device, batch_size=batch_size, weights_file=path)


def fer_encoder_from_config(cfg: VisualConfig, seed: int = 0) -> FerEncoder:
    """The checkpoint `cfg.weights`, or a random DenseNet of `cfg.flavor` (tests and demo only)."""
    if cfg.weights:
        return load_fer_encoder(cfg.weights, device=cfg.device, batch_size=cfg.batch_size)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = DenseNet(FLAVORS[cfg.flavor])
    # No training split to measure: mid-grey and a typical face-crop spread.
    return FerEncoder(model, 127.5, 64.0, device=cfg.device, batch_size=cfg.batch_size, seed=seed)
