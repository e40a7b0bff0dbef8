"""Unlabeled "movies": two people talking, with subtitles as SRT, WebVTT, ASS or an embedded stream.

OUT/movies/movie_NNNN.mp4 (H.264 + AAC, 25 fps, 320x240) with a sidecar of the same stem
(.srt for most, .vtt or .ass for some) or, for every tenth movie from the sixth on, a mov_text
subtitle stream inside the mp4 and no sidecar. OUT/ground_truth/movies/movie_NNNN.json has what a
pipeline must recover (cue times and text, who speaks and where, the class and each modality's cue).
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np

from .audio import random_voice
from .common import EMOTIONS, Progress, item_rng, shown_class, snap, write_json
from .config import Sizes, SynthConfig
from .faces import random_identity
from .subtitles import SubtitleCue, to_ass, to_srt, to_vtt
from .text import sentences, short_sentence
from .video import Utterance, background, cast, movie_encoding, render

WIDTH, HEIGHT, FPS = 320, 240, 25
FORMATS = {1: "vtt", 3: "ass", 5: "mov_text"}  # by index modulo 10; the rest are .srt


def subtitle_format(index: int) -> str:
    """Which subtitle carrier movie `index` gets."""
    return FORMATS.get(index % 10, "srt")


def generate_movies(out: Path, config: SynthConfig, sizes: Sizes, progress: Progress) -> dict[str, int]:
    """Write all movies; returns counts."""
    counts = {"movies": 0, "cues": 0, "kept_cues": 0}
    for i in progress(range(sizes.movies), "movies"):
        cues = make_movie(out, i, config, sizes)
        counts["movies"] += 1
        counts["cues"] += len(cues)
        counts["kept_cues"] += sum(c["kept"] for c in cues)
    return counts


def make_movie(out: Path, index: int, config: SynthConfig, sizes: Sizes) -> list[dict]:
    """Render one movie and its subtitles and ground truth; returns the ground-truth cues."""
    rng = item_rng(config.seed, "movies", index)
    name = f"movie_{index:04d}"
    fmt = subtitle_format(index)
    duration = snap(rng.uniform(*sizes.movie_seconds), 0.2)
    photos = (index % 2, 1 - index % 2)  # both real people in every movie, varied per movie
    people = [(random_identity(rng, p), random_voice(rng, female=bool(rng.random() < 0.5))) for p in photos]
    actors = cast(people, WIDTH, HEIGHT)
    subs, utterances, truth = _plan_cues(rng, config, duration, forced=index == 0)

    movies = out / "movies"
    movies.mkdir(parents=True, exist_ok=True)
    video = movies / f"{name}.mp4"
    sidecar = None if fmt == "mov_text" else movies / f"{name}.{fmt}"
    if sidecar is not None:
        writers = {"srt": to_srt, "vtt": to_vtt, "ass": lambda cues: to_ass(cues, WIDTH, HEIGHT)}
        sidecar.write_text(writers[fmt](subs), encoding="utf-8")
    with tempfile.TemporaryDirectory(prefix="synth_subs_") as tmp:
        embedded = None
        if fmt == "mov_text":
            embedded = Path(tmp) / "subs.srt"
            embedded.write_text(to_srt(subs), encoding="utf-8")
        render(video, actors, utterances, background(rng, WIDTH, HEIGHT), FPS, duration, rng,
               movie_encoding(FPS), subtitles=embedded)

    for cue in truth:
        if cue["speaker"] is not None:
            cue["speaker_box"] = actors[cue["speaker"]].box()
    write_json(out / "ground_truth" / "movies" / f"{name}.json", {
        "video": f"movies/{video.name}",
        "subtitles": f"movies/{sidecar.name}" if sidecar else None,
        "subtitle_format": fmt,
        "fps": FPS, "width": WIDTH, "height": HEIGHT, "duration": duration,
        "faces": [a.to_dict() for a in actors],
        "cues": truth,
    })
    return truth


def _plan_cues(rng: np.random.Generator, config: SynthConfig, duration: float,
               forced: bool) -> tuple[list[SubtitleCue], list[Utterance], list[dict]]:
    """Cue timeline: normal cues (1.2-8 s) plus a few that filters must drop (under 1 s, no text)."""
    # Movie 0 opens with a fixed, short sequence (it fits in 12 s) so every corpus has both drop kinds
    # and each markup style; other movies place their drop cues at random.
    plan = ["normal:italic", "short", "normal:top", "empty", "normal:dashes"] if forced else []
    drops = [] if forced else [k for k in ("short", "empty") if rng.random() < 0.5]
    subs, utterances, truth = [], [], []
    t = snap(rng.uniform(0.3, 1.0), 0.01)
    speaker = int(rng.integers(2))
    while True:
        remaining = duration - 0.4 - t
        if plan:
            kind, _, style = plan.pop(0).partition(":")
            lo, hi = {"normal": (1.2, 2.0), "short": (0.4, 0.9), "empty": (1.0, 1.4)}[kind]
            length, gap = rng.uniform(lo, hi), rng.uniform(0.2, 0.4)
        else:
            kind, style, gap = "normal", "", rng.uniform(0.2, 1.2)
            if drops and (rng.random() < 0.35 or remaining < 4.0):
                kind = drops.pop(0)
            if kind == "normal":
                length = rng.uniform(5.0, 8.0) if rng.random() < 0.1 else rng.uniform(1.2, 4.0)
            else:
                length = rng.uniform(0.4, 0.9) if kind == "short" else rng.uniform(1.0, 2.5)
        length = snap(length, 0.01)
        if length > remaining:
            if kind != "normal" or remaining < 1.2:
                break
            length = snap(remaining, 0.01)
        start, end = t, snap(t + length, 0.01)
        if rng.random() < 0.75:
            speaker = 1 - speaker
        cue = SubtitleCue(start, end)
        if kind == "empty":
            utterance = Utterance(start, end, None, "neutral", "neutral", "neutral", "neutral", None, None)
        else:
            emotion = EMOTIONS[int(rng.integers(len(EMOTIONS)))]
            text_class = shown_class(rng, emotion, config.text_reliability)
            audio_class = shown_class(rng, emotion, config.audio_reliability)
            face_class = shown_class(rng, emotion, config.face_reliability)
            listener = None
            if rng.random() < config.listener_expression_prob:
                listener = EMOTIONS[int(rng.integers(len(EMOTIONS)))]
            lead, tail = rng.uniform(0.05, 0.2, size=2) * min(1.0, length)
            voiced = (round(start + lead, 4), round(end - tail, 4))
            if kind == "short":
                cue.sentences = [short_sentence(rng)]
            else:
                cue.sentences = sentences(rng, text_class, length, count=2 if style == "dashes" else None)
            cue.italic = style == "italic" or (not style and rng.random() < 0.15)
            cue.top = style == "top" or (not style and rng.random() < 0.1)
            cue.dashes = style == "dashes" or (len(cue.sentences) > 1 and rng.random() < 0.5)
            utterance = Utterance(start, end, speaker, emotion, text_class, audio_class, face_class, listener, voiced)
        subs.append(cue)
        utterances.append(utterance)
        record = utterance.to_dict()
        if kind == "empty":
            record.update(emotion=None, text_class=None, audio_class=None, face_class=None)
        record.update(index=len(subs), text=cue.text, lines=cue.lines() if cue.sentences else [],
                      kept=kind == "normal", drop_reason=None if kind == "normal" else kind, speaker_box=None)
        truth.append(record)
        t = snap(end + gap, 0.01)
    return subs, utterances, truth
