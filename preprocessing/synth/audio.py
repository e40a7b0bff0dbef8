"""Speech-like audio whose pitch, loudness, rate and brightness carry the emotion class.

Voiced syllables are a harmonic series on a moving F0, shaped by vowel formants and a spectral tilt,
with a noise burst (consonant) before each vowel and a syllable-rate amplitude envelope.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf

SR = 16_000
NOISE_RMS = 0.002  # room noise under everything, so voice-activity detectors see a floor


@dataclass(frozen=True)
class Voice:
    f0: float  # the speaker's resting pitch (Hz)
    formant_scale: float  # shorter vocal tracts have higher formants

    def to_dict(self) -> dict:
        return {"f0": self.f0, "formant_scale": self.formant_scale}


def random_voice(rng: np.random.Generator, female: bool) -> Voice:
    """A voice in the usual adult female or male range."""
    if female:
        return Voice(f0=round(float(rng.uniform(175, 235)), 1), formant_scale=round(float(rng.uniform(1.1, 1.2)), 3))
    return Voice(f0=round(float(rng.uniform(100, 140)), 1), formant_scale=round(float(rng.uniform(0.95, 1.02)), 3))


@dataclass(frozen=True)
class Prosody:
    pitch: float  # F0 multiplier
    swing: float  # relative F0 excursion of the intonation contour
    loudness: float  # RMS of voiced speech
    rate: float  # syllables per second
    brightness: float  # 0 dark (steep tilt) .. 1 bright (flat tilt)


PROSODY = {
    "anger": Prosody(pitch=1.3, swing=0.12, loudness=0.2, rate=5.6, brightness=1.0),
    "happiness": Prosody(pitch=1.4, swing=0.35, loudness=0.14, rate=4.8, brightness=0.65),
    "neutral": Prosody(pitch=1.0, swing=0.08, loudness=0.08, rate=4.0, brightness=0.45),
    "sadness": Prosody(pitch=0.82, swing=0.04, loudness=0.04, rate=2.7, brightness=0.15),
}

VOWELS = np.array([  # F1, F2, F3 (Hz) of /a/ /e/ /i/ /o/ /u/ for an adult male tract
    [730, 1090, 2440], [530, 1840, 2480], [270, 2290, 3010], [570, 840, 2410], [300, 870, 2240],
])
BANDWIDTHS = np.array([90.0, 110.0, 170.0])


def speech(rng: np.random.Generator, seconds: float, voice: Voice, emotion: str) -> np.ndarray:
    """`seconds` of float32 speech at SR in `voice` with the prosody of `emotion` (jittered per call)."""
    base = PROSODY[emotion]
    jitter = rng.uniform(0.9, 1.1, size=5)
    pitch, swing, loudness = base.pitch * jitter[0], base.swing * jitter[1], base.loudness * jitter[2]
    rate, bright = base.rate * jitter[3], float(np.clip(base.brightness * jitter[4], 0, 1))
    n = int(round(seconds * SR))
    t = np.arange(n) / SR
    # Intonation: a slow wave around the raised/lowered pitch, with declination over the phrase.
    contour = 1 + swing * np.sin(2 * np.pi * rng.uniform(0.6, 1.4) * t + rng.uniform(0, 2 * np.pi))
    f0 = voice.f0 * pitch * contour * (1 - 0.08 * t / max(seconds, 1e-3))
    f0 *= 1 + 0.01 * np.sin(2 * np.pi * 5.5 * t)  # vibrato-like micro-variation
    phase = 2 * np.pi * np.cumsum(f0) / SR
    tilt = 2.0 - 1.4 * bright  # spectral tilt: harmonic k is weighted k ** -tilt
    out = np.zeros(n, np.float64)
    start, end = int(rng.uniform(0.02, 0.06) * SR), n - int(0.02 * SR)
    while end - start > int(0.08 * SR):  # the last syllable is cut short rather than dropped
        length = min(int(SR / rate * rng.uniform(0.7, 1.3)), end - start)
        burst = int(length * rng.uniform(0.15, 0.3))
        _consonant(rng, out, start, burst, loudness)
        _vowel(rng, out, phase, f0, start + burst, length - burst, voice, tilt, loudness)
        start += length
        if rng.random() < 0.15:  # a short pause between words
            start += int(rng.uniform(0.08, 0.2) * SR)
    return np.tanh(out * 1.2).astype(np.float32) / 1.2  # soft limit: loud anger gets a little harsh


def _vowel(rng, out, phase, f0, start, length, voice, tilt, loudness) -> None:
    """One voiced nucleus: harmonics weighted by a random vowel's formant response."""
    if length <= 8:
        return
    seg = slice(start, start + length)
    formants = VOWELS[int(rng.integers(len(VOWELS)))] * voice.formant_scale
    mean_f0 = float(f0[seg].mean())
    k = np.arange(1, max(2, int(3800 / mean_f0)) + 1)
    freq = k * mean_f0
    response = sum(1 / (1 + ((freq - fk) / bk) ** 2) for fk, bk in zip(formants, BANDWIDTHS)) + 0.02
    weights = response * k ** (-tilt)
    wave = weights @ np.sin(np.outer(k, phase[seg]))
    wave /= np.sqrt(np.mean(wave**2)) + 1e-9
    attack = min(length // 3, int(0.03 * SR))
    envelope = np.ones(length)
    envelope[:attack] = np.linspace(0, 1, attack)
    envelope[length - 2 * attack:] = np.linspace(1, 0, 2 * attack) ** 1.5
    out[seg] += wave * envelope * loudness * rng.uniform(0.75, 1.1)


def _consonant(rng, out, start, length, loudness) -> None:
    """A short high-passed noise burst (a fricative or plosive release)."""
    noise = np.diff(rng.normal(size=length + 1))
    out[start:start + length] += noise * np.hanning(length) * loudness * 0.35


def room_noise(rng: np.random.Generator, samples: int) -> np.ndarray:
    """Quiet white noise for the whole track."""
    return (rng.normal(size=samples) * NOISE_RMS).astype(np.float32)


def mouth_levels(voice: np.ndarray, start: float, fps: float, levels: int) -> tuple[int, np.ndarray]:
    """Mouth opening (0 .. levels-1) following the speech envelope, for the video frames whose centre
    falls inside `voice` (which starts `start` s into the video): (first frame, openings)."""
    first = int(np.ceil(start * fps - 0.5))
    last = int(np.floor((start + len(voice) / SR) * fps - 0.5))
    half = int(0.03 * SR)
    rms = np.zeros(max(0, last - first + 1))
    for i in range(len(rms)):
        s = int(((first + i + 0.5) / fps - start) * SR)
        window = voice[max(0, s - half): s + half].astype(np.float64)
        rms[i] = np.sqrt(np.mean(window**2)) if window.size else 0.0
    # Relative to the utterance's own loud parts: quiet (sad) speech still opens the mouth fully.
    reference = max(0.8 * float(np.percentile(rms, 95)) if len(rms) else 0.0, 0.02)
    return first, np.round(np.minimum(1.0, rms / reference) * (levels - 1)).astype(np.int64)


def write_wav(path: Path, audio: np.ndarray, sample_rate: int = SR) -> None:
    """16-bit PCM wav (deterministic bytes: no timestamps in the header)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(str(path), np.clip(audio, -1, 1), sample_rate, subtype="PCM_16")
