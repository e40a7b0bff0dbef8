"""Utterance segments: one per subtitle cue of a video, or per labeled turn of an emotion corpus."""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from preprocessing.config import SegmentConfig
from preprocessing.subtitles import SUFFIXES, Cue, embedded_subtitles, read_subtitles


@dataclass
class Segment:
    """One utterance. `start`/`end` are seconds in `video` (in `audio_path` when there is no video);
    when both are set, `audio_path` holds exactly this utterance (e.g. an IEMOCAP per-turn wav)."""

    video: str | None
    index: int  # position among the kept segments of its source, in time order
    start: float
    end: float
    text: str
    key: str  # WebDataset key: unique, stable across reruns, no dots
    label: int | None = None  # index into finetune.protocols.CLASSES (labeled corpora only)
    speaker: str | None = None
    session: int | None = None
    audio_path: str | None = None  # None: take the audio track of `video`


def make_key(source_id: str, index: int) -> str:
    """`<source>_<index:04d>`, with every character WebDataset keys cannot hold (dots, slashes...) as '_'."""
    return f"{sanitize_key(source_id)}_{index:04d}"


def sanitize_key(name: str) -> str:
    """A WebDataset-safe key part: WebDataset splits member names at the first dot, tar paths at '/'."""
    return re.sub(r"[^A-Za-z0-9_-]", "_", name)


def find_sidecar(video: Path) -> Path | None:
    """The subtitle file beside `video` with the same stem, preferring .srt, then .vtt, .ass, .ssa."""
    for suffix in SUFFIXES:  # SRT first: the most common format, and the one ffmpeg converts to
        candidate = video.with_suffix(suffix)
        if candidate.is_file():
            return candidate
    return None


def segments_from_video(
    video_path: str | Path,
    cfg: SegmentConfig,
    video_id: str | None = None,
    counts: Counter[str] | None = None,
) -> list[Segment]:
    """Segments of a video's sidecar subtitles (else its first embedded subtitle stream).

    Cues with empty cleaned text or shorter than `cfg.min_seconds` are dropped; longer than
    `cfg.max_seconds` are clipped to it. Keys are `<video_id>_<index>` with `video_id` the stem by
    default (pass a corpus-relative id when stems repeat across folders). `counts`, when given, is
    incremented per reason: skipped_malformed_cue, dropped_empty_text, dropped_too_short, clipped,
    no_subtitles (videos).
    """
    video = Path(video_path)
    sidecar = find_sidecar(video)
    subtitles = read_subtitles(sidecar) if sidecar else embedded_subtitles(video)
    tally = counts if counts is not None else Counter()
    if subtitles is None:
        tally["no_subtitles"] += 1
        return []
    if subtitles.skipped:
        tally["skipped_malformed_cue"] += len(subtitles.skipped)
    return cues_to_segments(subtitles.cues, str(video), video_id or video.stem, cfg, tally)


def cues_to_segments(
    cues: list[Cue], video: str, video_id: str, cfg: SegmentConfig, counts: Counter[str]
) -> list[Segment]:
    """Filter, clip and key cues in time order (ASS files need not be sorted)."""
    segments: list[Segment] = []
    for cue in sorted(cues, key=lambda c: (c.start, c.end)):
        if not cue.text:
            counts["dropped_empty_text"] += 1
            continue
        duration = round(cue.end - cue.start, 6)  # cue times are whole milliseconds: 3.1 - 2.1 is 1 s
        if duration < cfg.min_seconds:
            counts["dropped_too_short"] += 1
            continue
        end = cue.end
        if duration > cfg.max_seconds:
            counts["clipped"] += 1
            end = cue.start + cfg.max_seconds
        index = len(segments)
        segments.append(Segment(video, index, cue.start, end, cue.text, make_key(video_id, index)))
    return segments
