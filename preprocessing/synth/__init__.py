"""Synthetic corpus generator: real-format stand-ins for movies, IEMOCAP, MSP-IMPROV and FER+.

Every utterance has one true class (anger, happiness, neutral, sadness) and evidence for it in each
modality: words in the text, pitch / loudness / rate / brightness of the speech, and an expression on
the speaking face (whose mouth follows the speech energy). Each modality's cue shows the true class with
its own reliability (SynthConfig), so no single modality suffices. Layout under OUT:

    movies/                  unlabeled mp4 + subtitle sidecars (see movies.py)
    iemocap/Session1..5/     the IEMOCAP release layout (see iemocap.py)
    msp_improv/              Evaluation.txt + sessionK/... recordings (see msp_improv.py)
    ferplus/                 fer2013.csv + fer2013new.csv (see ferplus.py)
    ground_truth/            what a pipeline should recover; no pipeline stage may read it
    synth_summary.json       seed, scale, config and counts of the parts the last run generated

Same config -> byte-identical files (ffmpeg runs single-threaded with bitexact flags, and every item
draws from its own seeded generator). Rerunning into an existing corpus replaces the parts it generates.
"""

from __future__ import annotations

import dataclasses
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

from tqdm import tqdm

from .common import write_json
from .config import PARTS, SIZES, SynthConfig
from .ferplus import generate_ferplus
from .iemocap import generate_iemocap
from .movies import generate_movies
from .msp_improv import generate_msp_improv

__all__ = ["CorpusSummary", "SynthConfig", "generate_corpus"]

GENERATORS = {"movies": generate_movies, "iemocap": generate_iemocap, "msp_improv": generate_msp_improv,
              "ferplus": generate_ferplus}


@dataclass
class CorpusSummary:
    """What `generate_corpus` wrote."""

    out: Path
    seed: int
    scale: str
    parts: list[str]
    counts: dict[str, int] = field(default_factory=dict)
    paths: dict[str, Path] = field(default_factory=dict)
    seconds: float = 0.0  # wall time (not written to synth_summary.json, which must be reproducible)


def generate_corpus(out: Path, config: SynthConfig) -> CorpusSummary:
    """Generate the parts named in `config.parts` under `out`, deterministically from `config.seed`."""
    config.validate()
    start = time.perf_counter()
    out = Path(out)
    _clear(out, config.parts)
    out.mkdir(parents=True, exist_ok=True)
    sizes = SIZES[config.scale].labeled_times(config.labeled_scale)
    quiet = not sys.stderr.isatty()

    def progress(items: Iterable, desc: str) -> Iterable:
        return tqdm(items, desc=f"synth {desc}", disable=quiet, leave=False)

    counts: dict[str, int] = {}
    paths = {"ground_truth": out / "ground_truth", "summary": out / "synth_summary.json"}
    for part in PARTS:
        if part in config.parts:
            counts.update(GENERATORS[part](out, config, sizes, progress))
            paths[part] = out / part
    write_json(paths["summary"], {
        "seed": config.seed, "scale": config.scale, "config": dataclasses.asdict(config),
        "counts": counts, "paths": {k: v.relative_to(out).as_posix() for k, v in paths.items()},
    })
    return CorpusSummary(out=out, seed=config.seed, scale=config.scale, parts=[p for p in PARTS if p in config.parts],
                         counts=counts, paths=paths, seconds=time.perf_counter() - start)


def _clear(out: Path, parts: list[str]) -> None:
    """Remove the previous output of `parts`, so a rerun leaves no stale files; refuse to touch a
    folder that is not a synthetic corpus."""
    existing = [out / p for p in parts if (out / p).exists()]
    if not existing:
        return
    if not (out / "synth_summary.json").is_file():
        raise FileExistsError(f"{existing[0]} exists and {out} is not a synthetic corpus (no synth_summary.json)")
    for part in parts:
        for folder in (out / part, out / "ground_truth" / part):
            if folder.is_dir():
                shutil.rmtree(folder)
