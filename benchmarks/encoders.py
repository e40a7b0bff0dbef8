"""Encoder throughput: wav2vec2 (audio seconds per second) and DenseNet-FER+ (crops per second).

Real-size, randomly initialised models (speed does not depend on the weights), the project's own
encoder classes (length batching, masked GroupNorm, pooling), synthetic inputs shaped like the
pipeline's: utterances of 1-10 s, 36 crops of 64x64 per utterance. One line per configuration.

    PYTHONPATH=. .venv/bin/python benchmarks/encoders.py [--arch base] [--dtypes float32] [--utterances 16]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from memobert.config import load_config
from preprocessing.audio_encoder import Wav2Vec2Encoder
from preprocessing.config import PreprocessConfig
from preprocessing.fer import fer_encoder_from_config


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def audio_rate(arch: str, dtype: str, utterances: int, repeats: int) -> float:
    """Audio seconds encoded per wall second, after one warm-up pass over the same utterances."""
    cfg = load_config(PreprocessConfig, overrides=[f"audio.arch={arch}", f"audio.dtype={dtype}"])
    encoder = Wav2Vec2Encoder(cfg.audio, seed=0)
    rng = np.random.default_rng(0)
    waves = [rng.standard_normal(int(rng.uniform(1.0, 10.0) * 16_000)).astype(np.float32) * 0.1 for _ in range(utterances)]
    seconds = sum(len(w) for w in waves) / 16_000
    encoder.encode(waves)
    _sync()
    start = time.perf_counter()
    for _ in range(repeats):
        encoder.encode(waves)
    _sync()
    return seconds * repeats / (time.perf_counter() - start)


def visual_rate(flavor: str, crops: int, repeats: int) -> float:
    """64x64 grey crops through DenseNet-FER+ per wall second."""
    cfg = load_config(PreprocessConfig, overrides=[f"visual.flavor={flavor}"])
    encoder = fer_encoder_from_config(cfg.visual, seed=0)
    batch = np.random.default_rng(0).integers(0, 256, (crops, 64, 64), dtype=np.uint8)
    encoder.features_and_probs(batch)
    _sync()
    start = time.perf_counter()
    for _ in range(repeats):
        encoder.features_and_probs(batch)
    _sync()
    return crops * repeats / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="base")
    parser.add_argument("--dtypes", default="float32", help="comma-separated: float32,bfloat16,float16 (half on GPU only)")
    parser.add_argument("--utterances", type=int, default=16)
    parser.add_argument("--crops", type=int, default=36 * 32)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--visual-flavor", default="full")
    args = parser.parse_args()
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"cpu ({torch.get_num_threads()} threads)"
    print(f"device: {device}")
    for dtype in args.dtypes.split(","):
        rate = audio_rate(args.arch, dtype, args.utterances, args.repeats)
        print(f"wav2vec2-{args.arch} {dtype}: {rate:,.0f} audio seconds per second")
    rate = visual_rate(args.visual_flavor, args.crops, args.repeats)
    print(f"densenet-fer ({args.visual_flavor}) float32: {rate:,.0f} crops per second "
          f"(= {rate / 36:,.0f} utterances of 36 frames per second)")


if __name__ == "__main__":
    main()
