"""Shared pieces: the four target classes, per-item random generators, cue corruption."""

from __future__ import annotations

import json
import zlib
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np

EMOTIONS = ("anger", "happiness", "neutral", "sadness")
Progress = Callable[[Iterable, str], Iterable]  # wraps an iterable with a progress bar named by the string


def item_rng(seed: int, *keys: str | int) -> np.random.Generator:
    """A generator for one item, so adding or reordering items never shifts the others."""
    words = [seed] + [zlib.crc32(k.encode()) if isinstance(k, str) else int(k) for k in keys]
    return np.random.default_rng(words)


def shown_class(rng: np.random.Generator, true_class: str, reliability: float) -> str:
    """The class a modality's cue shows: the true one with probability `reliability`, else another."""
    if rng.random() < reliability:
        return true_class
    others = [e for e in EMOTIONS if e != true_class]
    return others[int(rng.integers(len(others)))]


def write_json(path: Path, data: Any) -> None:
    """Write JSON deterministically (fixed key order, no timestamps)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1, ensure_ascii=False) + "\n")


def snap(t: float, step: float) -> float:
    """Round a time onto a grid, so every format can represent it exactly."""
    return round(round(t / step) * step, 6)
