"""`memobert train-audio`: wav2vec 2.0's self-supervised objective on unlabeled audio (transformers' Wav2Vec2ForPreTraining).

The paper's acoustic features come from the released wav2vec2-base (`audio.weights`). This trains an encoder
where no released weights fit, such as the demo's tiny one: a randomly initialised encoder keeps little of the
prosody that carries emotion (docs/benchmarks.md), and a short run on the corpus's own unlabeled audio is the
honest way to give it some, as `memobert train-fer` does for the face encoder.

Each step takes random fixed-length crops of the input files (a file is drawn in proportion to its length),
masks spans of their latent frames and trains the contrastive task against the quantised latents of the same
crop, plus the codebook diversity loss (Baevski et al., 2020). The output is an HF Wav2Vec2Model folder that
`audio.weights` loads like any other, with `train_audio.json` beside it (the config, the losses, skipped files).
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from tqdm import tqdm

from memobert.config import check
from preprocessing.adapters import AUDIO_SUFFIXES
from preprocessing.audio_encoder import ARCHS, hf_config, load_audio, num_frames, resolve_device
from preprocessing.pipeline import SAMPLE_RATE, VIDEO_SUFFIXES

log = logging.getLogger(__name__)

REPORT_NAME = "train_audio.json"


@dataclass
class AudioPretrainConfig:
    """Sized for the tiny arch on a CPU (minutes); wav2vec2-base's own run was 400K steps on 960 h of speech."""

    arch: Literal["tiny", "base", "large"] = "tiny"
    steps: int = 1000
    batch_size: int = 8  # 16 s of audio per step; 16 cost twice the time for no better probe (docs/benchmarks.md)
    crop_seconds: float = 2.0
    lr: float = 2e-3  # AdamW, linear warm-up over warmup_fraction of the steps, then linear decay to 0
    warmup_fraction: float = 0.1
    weight_decay: float = 0.01
    # wav2vec 2.0's masking and contrastive task: spans of 10 latent frames starting at 6.5% of the frames
    # (about half of them masked); 50 distractors from the same crop; diversity loss weight 0.1.
    mask_prob: float = 0.65
    mask_length: int = 10
    num_negatives: int = 50
    diversity_weight: float = 0.1
    # Quantiser: 2 codebooks (wav2vec2-base: 320 entries each, 256-d codevectors; smaller for the tiny arch).
    codebooks: int = 2
    codebook_entries: int = 64
    codevector_dim: int = 64
    # Gumbel-softmax temperature, annealed geometrically from start to end over that share of the steps.
    gumbel_start: float = 2.0
    gumbel_end: float = 0.5
    gumbel_anneal_fraction: float = 0.7
    log_every: int = 50
    seed: int = 0
    device: str = "auto"

    def validate(self) -> None:
        check(self.steps >= 1, "steps", "must be >= 1")
        check(self.batch_size >= 1, "batch_size", "must be >= 1")
        check(self.lr > 0, "lr", "must be positive")
        check(0 <= self.warmup_fraction < 1, "warmup_fraction", "must be in [0, 1)")
        check(0 < self.mask_prob < 1, "mask_prob", "must be in (0, 1)")
        check(self.mask_length >= 2, "mask_length", "must be >= 2 (a masked frame needs another as its distractor)")
        check(self.num_negatives >= 1, "num_negatives", "must be >= 1")
        check(self.codebooks >= 1 and self.codevector_dim % self.codebooks == 0, "codevector_dim",
              f"must be a multiple of codebooks ({self.codebooks})")
        check(self.gumbel_start >= self.gumbel_end > 0, "gumbel_end", "must be in (0, gumbel_start]")
        frames = num_frames(int(self.crop_seconds * SAMPLE_RATE), ARCHS[self.arch].convs)
        check(frames > self.mask_length, "crop_seconds", f"gives {frames} latent frames; need more than mask_length "
              f"({self.mask_length})")


def find_audio_files(inputs: list[Path]) -> list[Path]:
    """Video and audio files under each input (a folder, searched recursively, or a file), sorted per input."""
    suffixes = VIDEO_SUFFIXES + AUDIO_SUFFIXES
    files: list[Path] = []
    for source in map(Path, inputs):
        if source.is_file():
            files.append(source)
        elif source.is_dir():
            files += sorted(p for p in source.rglob("*") if p.suffix.lower() in suffixes)
        else:
            raise FileNotFoundError(f"{source}: no such file or folder")
    if not files:
        raise FileNotFoundError(f"{', '.join(map(str, inputs))}: no video ({', '.join(VIDEO_SUFFIXES)}) "
                                f"or audio ({', '.join(AUDIO_SUFFIXES)}) files")
    return files


def read_waves(files: list[Path], min_samples: int) -> tuple[list[np.ndarray], dict[str, str]]:
    """Decoded 16 kHz mono waves of the files at least `min_samples` long, and {file: why it was skipped}."""
    waves, skipped = [], {}
    for path in tqdm(files, desc="reading audio", leave=False, disable=None):
        try:
            wave = load_audio(path)
        except ValueError as err:
            skipped[str(path)] = str(err)
            continue
        if len(wave) < min_samples:
            skipped[str(path)] = f"{len(wave) / SAMPLE_RATE:.2f} s of audio, shorter than one crop"
        else:
            waves.append(wave)
    for path, reason in skipped.items():
        log.warning("train-audio skips %s: %s", path, reason)
    return waves, skipped


def span_mask(rng: np.random.Generator, batch: int, frames: int, prob: float, length: int) -> np.ndarray:
    """wav2vec 2.0's mask, bool [batch, frames]: prob * frames / length spans of `length` frames per row (rounded
    at random), starts drawn without replacement (spans may overlap): about half the frames at 0.65 and 10."""
    mask = np.zeros((batch, frames), bool)
    starts = frames - length + 1
    for row in mask:
        spans = min(starts, max(1, int(prob * frames / length + rng.random())))
        for start in rng.choice(starts, spans, replace=False):
            row[start : start + length] = True
    return mask


def negative_indices(rng: np.random.Generator, mask: np.ndarray, count: int) -> np.ndarray:
    """Distractors, int64 [batch, frames, count] into the flattened [batch * frames]: for each masked frame, `count`
    other masked frames of the same crop, as wav2vec 2.0 draws them (with replacement); unmasked rows are unused."""
    batch, frames = mask.shape
    out = np.zeros((batch, frames, count), np.int64)
    for b, row in enumerate(mask):
        masked = np.flatnonzero(row)
        draws = rng.integers(0, len(masked) - 1, size=(len(masked), count))
        draws += draws >= np.arange(len(masked))[:, None]  # skip the frame itself: it is the positive
        out[b, masked] = masked[draws] + b * frames
    return out


class CropSampler:
    """Random fixed-length crops, a file drawn in proportion to the crops it holds (uniform over the audio)."""

    def __init__(self, waves: list[np.ndarray], samples: int, rng: np.random.Generator) -> None:
        self.waves, self.samples, self.rng = waves, samples, rng
        starts = np.array([len(w) - samples + 1 for w in waves], dtype=np.float64)
        self.weights = starts / starts.sum()

    def batch(self, size: int) -> torch.Tensor:
        picks = self.rng.choice(len(self.waves), size, p=self.weights)
        crops = []
        for i in picks:
            start = self.rng.integers(0, len(self.waves[i]) - self.samples + 1)
            crops.append(self.waves[i][start : start + self.samples])
        return torch.from_numpy(np.stack(crops))


def build_model(cfg: AudioPretrainConfig) -> Any:
    """A randomly initialised Wav2Vec2ForPreTraining of `cfg.arch` with `cfg`'s quantiser."""
    from transformers import Wav2Vec2Config, Wav2Vec2ForPreTraining

    config = hf_config(ARCHS[cfg.arch], Wav2Vec2Config)
    config.num_codevector_groups, config.num_codevectors_per_group = cfg.codebooks, cfg.codebook_entries
    config.codevector_dim = config.proj_codevector_dim = cfg.codevector_dim
    config.num_negatives, config.diversity_loss_weight = cfg.num_negatives, cfg.diversity_weight
    return Wav2Vec2ForPreTraining(config)


def summary(report: dict[str, Any]) -> str:
    """One line of a report: the last contrastive loss against chance, the steps, the audio, the skipped files."""
    last = report["history"][-1]
    return (f"contrastive loss {last['contrastive']:.3f} (chance {report['chance_contrastive_loss']:.3f}) after "
            f"{last['step']} steps on {report['audio_seconds']} s of audio; skipped {len(report['skipped'])} files")


def train_audio_encoder(inputs: list[Path], out: Path, cfg: AudioPretrainConfig) -> dict[str, Any]:
    """Train on the audio under `inputs`, save the encoder as an HF Wav2Vec2Model folder `out`; returns the report."""
    cfg.validate()
    start_time = time.perf_counter()
    device = resolve_device(cfg.device)
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    crop = int(cfg.crop_seconds * SAMPLE_RATE)
    files = find_audio_files(inputs)
    waves, skipped = read_waves(files, crop)
    if not waves:
        raise ValueError(f"{', '.join(map(str, inputs))}: none of {len(files)} files has {cfg.crop_seconds} s of "
                         f"decodable audio (skipped: {skipped})")
    sampler = CropSampler(waves, crop, rng)
    model = build_model(cfg).to(device).train()
    frames = num_frames(crop, ARCHS[cfg.arch].convs)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    warmup = max(1, int(cfg.warmup_fraction * cfg.steps))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min((s + 1) / warmup, max(0.0, (cfg.steps - s) / max(1, cfg.steps - warmup))))
    anneal = max(1.0, cfg.gumbel_anneal_fraction * cfg.steps)
    history: list[dict[str, float]] = []
    bar = tqdm(range(cfg.steps), desc="train-audio", disable=None)
    for step in bar:
        model.set_gumbel_temperature(max(cfg.gumbel_end, cfg.gumbel_start * (cfg.gumbel_end / cfg.gumbel_start) ** (step / anneal)))
        mask = span_mask(rng, cfg.batch_size, frames, cfg.mask_prob, cfg.mask_length)
        negatives = negative_indices(rng, mask, cfg.num_negatives)
        output = model(sampler.batch(cfg.batch_size).to(device), mask_time_indices=torch.from_numpy(mask).to(device),
                       sampled_negative_indices=torch.from_numpy(negatives).to(device))
        targets = int(mask.sum())
        # HF sums the contrastive loss over masked frames; per frame, as wav2vec 2.0 reports it, is comparable
        # to log(1 + num_negatives), the loss of an encoder that cannot tell the true latent from a distractor.
        loss = output.loss / targets
        if not torch.isfinite(loss):
            raise FloatingPointError(f"train-audio: non-finite loss at step {step} (lr {sched.get_last_lr()[0]:.2e})")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % cfg.log_every == 0 or step == cfg.steps - 1:
            record = {"step": step + 1, "loss": loss.item(), "contrastive": output.contrastive_loss.item() / targets,
                      "diversity": output.diversity_loss.item() / targets,
                      "codebook_perplexity": output.codevector_perplexity.item()}
            history.append(record)
            bar.set_postfix(loss=f"{record['loss']:.3f}", contrastive=f"{record['contrastive']:.3f}")
            log.info("train-audio step %d/%d: %s", step + 1, cfg.steps, {k: round(v, 4) for k, v in record.items()})
    out = Path(out)
    model.wav2vec2.save_pretrained(out)
    report = {
        "config": asdict(cfg), "files": len(files), "files_used": len(waves), "skipped": skipped,
        "audio_seconds": round(sum(len(w) for w in waves) / SAMPLE_RATE, 1),
        "chance_contrastive_loss": float(np.log(1 + cfg.num_negatives)), "history": history,
        "seconds": round(time.perf_counter() - start_time, 1),
    }
    (out / REPORT_NAME).write_text(json.dumps(report, indent=2) + "\n")
    return report
