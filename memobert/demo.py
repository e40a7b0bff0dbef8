"""`memobert demo`: every stage that exists, end to end on a generated corpus, on a laptop."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from preprocessing.synth.config import SynthConfig


@dataclass
class DemoConfig:
    workdir: str = "demo_work"
    scale: Literal["tiny", "small", "medium"] = "tiny"
    synth: SynthConfig = field(default_factory=SynthConfig)


def _stage(title: str) -> float:
    print(f"\n== {title} ==", flush=True)
    return time.perf_counter()


def run_demo(config: DemoConfig) -> None:
    """Generate the corpus, then run each stage on it, printing what each wrote and where."""
    from preprocessing.synth import generate_corpus

    workdir = Path(config.workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)

    start = _stage("1. synthetic corpus (movies, IEMOCAP, MSP-IMPROV and FER+ layouts)")
    corpus = workdir / "corpus"
    synth = SynthConfig(**{**config.synth.__dict__, "scale": config.scale})
    summary = generate_corpus(corpus, synth)
    print(summary)
    print(f"corpus: {corpus}  ({time.perf_counter() - start:.1f} s)")

    print(f"\ndemo finished; everything is under {workdir}")
