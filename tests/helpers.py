"""Shared test helpers: tiny real WebDataset shards written through memobert.schema."""

from __future__ import annotations

import hashlib
import importlib.util
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import ModuleType

import numpy as np
import webdataset as wds

from memobert.schema import Manifest, Utterance, encode

# Small feature dims for tests; the real ones are audio 768, visual 342, vprob 8.
TINY_DIMS = {"audio": 16, "visual": 12, "vprob": 8}


def write_tiny_shards(
    folder: str | Path,
    n_samples: int,
    n_shards: int,
    dims: Mapping[str, int] = TINY_DIMS,
    seed: int = 0,
    *,
    vocab_size: int = 1000,
    speakers: Sequence[str] | None = None,
    class_signal: float = 0.0,
    signal_in: str = "tav",
) -> Path:
    """Write `n_samples` random utterances of mixed lengths into exactly `n_shards` tars plus manifest.json.

    Lengths are drawn so that every edge case appears: text 1-40 tokens (> 30), visual 0-48 frames
    (< 10 and > 36), audio 0-80 frames (> 64). Token ids lie in [5, vocab_size). Metadata carries the
    downstream fields too (label in 0..3, speaker, session) so finetuning tests can use the same shards.

    speakers: real protocol speaker ids (e.g. Ses01F, F01); utterance i is spoken by speakers[i % n], its
    session is the id's number and its label (i // n) % 4, so every speaker has every class. Without it:
    speakers spk0..spk2, label i % 4. class_signal > 0 makes labels learnable: the first token becomes
    vocab_size + label and every frame's feature `label` is shifted by class_signal, in the modalities named
    by signal_in (t: text, a: audio, v: visual); the others carry no class.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    counts = {}
    for shard, indices in enumerate(np.array_split(np.arange(n_samples), n_shards)):
        name = f"shard-{shard:06d}.tar"
        with wds.TarWriter(str(folder / name)) as sink:
            for i in indices:
                utt = _random_utterance(int(i), rng, dims, vocab_size)
                if speakers:
                    _assign_speaker(utt, int(i), speakers)
                if class_signal:
                    _add_class_signal(utt, class_signal, vocab_size, signal_in)
                sink.write(encode(utt))
        counts[name] = len(indices)
    Manifest(
        shards=counts,
        dims=dict(dims),
        extractors={"synthetic": {"name": "tests.helpers.write_tiny_shards"}},
        settings={"seed": seed, "n_samples": n_samples},
    ).save(folder)
    return folder


def _random_utterance(i: int, rng: np.random.Generator, dims: Mapping[str, int], vocab_size: int) -> Utterance:
    n_text = int(rng.integers(1, 41))
    n_visual = int(rng.integers(0, 49))
    n_audio = int(rng.integers(0, 81))
    # Words of one or more WordPiece tokens, numbered from 0.
    words = np.cumsum(rng.random(n_text) < 0.6)
    words -= words[0]
    vprob = rng.random((n_visual, dims["vprob"]))
    start = round(float(rng.uniform(0, 3600)), 2)
    return Utterance(
        key=f"utt{i:06d}",
        meta={
            "id": f"utt{i:06d}",
            "video": f"video{i // 10:04d}",
            "start": start,
            "end": round(start + 1.0 + n_audio * 0.06, 2),
            "text": " ".join(f"w{w}" for w in range(int(words[-1]) + 1)),
            "track": 0,
            "track_score": 1.0,
            "label": i % 4,
            "speaker": f"spk{i % 3}",
            "session": i % 2,
        },
        tokens=rng.integers(5, vocab_size, n_text),
        words=words,
        audio=rng.standard_normal((n_audio, dims["audio"])),
        visual=rng.standard_normal((n_visual, dims["visual"])),
        vprob=vprob / vprob.sum(1, keepdims=True),
    )


def _assign_speaker(utt: Utterance, i: int, speakers: Sequence[str]) -> None:
    speaker = speakers[i % len(speakers)]
    utt.meta.update(speaker=speaker, session=int(re.search(r"\d+", speaker).group()), label=(i // len(speakers)) % 4)


def _add_class_signal(utt: Utterance, strength: float, vocab_size: int, signal_in: str) -> None:
    # Applied after every random draw, so the RNG stream (and all other samples) stay as without it.
    label = utt.meta["label"]
    if "t" in signal_in:
        utt.tokens[0] = vocab_size + label
    if "a" in signal_in:
        utt.audio[:, label] += strength
    if "v" in signal_in:
        utt.visual[:, label] += strength


def shard_digests(folder: Path) -> dict[str, str]:
    """Shard file name -> sha256 of its bytes: two runs that wrote the same samples in the same order agree."""
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(Path(folder).glob("shard-*.tar"))}


def load_benchmark(name: str) -> ModuleType:
    """benchmarks/<name>.py as a module: the scripts there are not a package."""
    path = Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"{name}_bench", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
