"""Active speaker: the face track whose mouth changes while voice is active, and its aligned crops.

The authors' rule scores each tracked face by how many of its mouth-change frames
overlap voice activity, drops zero scores and keeps the best. Our detectors give 5 landmarks, not 68, so a
"mouth change" here is a change of the landmark-aligned mouth patch between consecutive 10 fps frames
instead of a lip height/width change. Score of a track = share of the clip's frame steps in which its
mouth changes while voice is active (0..1); ties go to the larger voiced mouth motion.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

import cv2
import numpy as np

from preprocessing.config import FaceConfig, SpeakerConfig
from preprocessing.detectors import FaceDetector
from preprocessing.faces import (
    Track,
    aligned_crops,
    main_face_fraction,
    open_video,
    plan_keyframes,
    read_frames,
    subsample,
    to_grey,
    tracks_from_keyframes,
)

if TYPE_CHECKING:
    from decord import VideoReader

SAMPLE_RATE = 16_000
VAD_FRAME = 480  # samples: webrtcvad's 30 ms frame at 16 kHz; silero's segments use the same grid
WEBRTC_WARMUP = 10  # frames (300 ms)
# Mouth patch in inter-ocular units of the face frame (x along the eye line, y down): wide enough for
# both corners, tall enough for a dropping jaw, centred a little below the mouth-corner line.
PATCH_SIZE = (32, 20)  # output w, h in pixels (the patch is resampled: face size drops out)
PATCH_WIDTH, PATCH_DROP = 1.2, 0.2
# Consecutive patches are compared blurred and at the best shift within SEARCH patch pixels (~0.08
# inter-ocular distances): landmark noise and head moves between 10 fps frames translate the patch and
# leave sub-pixel residues on texture, which must not read as mouth motion; an opening mouth changes
# shape at a coarser scale, which neither the blur nor a shift explains away. (Tuned on the synthetic
# corpus and on jittered, noisy test clips; temporal smoothing of the landmarks did worse: it lags
# real head moves.)
SEARCH = 2
BLUR_SIGMA = 2.0  # patch pixels


@dataclass
class SpeakerChoice:
    """The chosen track (None: no face qualifies), its score and every track's score (for debugging)."""

    track_id: int | None
    score: float
    scores: dict[int, float]


@dataclass
class FaceResult:
    """One utterance's visual frames: crops of the active speaker, or the reason the clip is dropped."""

    crops: np.ndarray  # uint8 [T, crop, crop], T <= max_frames, in temporal order
    track_id: int | None
    score: float
    reason_if_dropped: str | None = None  # "no_face", "main_face_under_20pct", "no_active_speaker"
    times: np.ndarray = field(default_factory=lambda: np.zeros(0))  # seconds (video time) of each crop
    boxes: np.ndarray = field(default_factory=lambda: np.zeros((0, 4), np.float32))  # face box of each crop
    scores: dict[int, float] = field(default_factory=dict)  # every track's speaker score


def voice_activity(audio: np.ndarray, cfg: SpeakerConfig) -> np.ndarray:
    """bool [n]: speech in each 30 ms frame of 16 kHz mono `audio` (float in [-1, 1] or int16)."""
    audio = np.asarray(audio)
    if audio.dtype.kind == "f":
        audio = (np.clip(audio, -1.0, 1.0) * 32767).astype(np.int16)
    n = len(audio) // VAD_FRAME
    if n == 0:
        return np.zeros(0, bool)
    if cfg.vad == "webrtcvad":
        import webrtcvad

        vad = webrtcvad.Vad(cfg.vad_aggressiveness)
        frames = [audio[i * VAD_FRAME : (i + 1) * VAD_FRAME].tobytes() for i in range(n)]
        # A fresh webrtcvad calls its first ~100 ms speech while its noise estimate settles, even on
        # near-silence: let it hear the clip's first 300 ms once before the pass that counts.
        for frame in frames[:WEBRTC_WARMUP]:
            vad.is_speech(frame, SAMPLE_RATE)
        return np.array([vad.is_speech(frame, SAMPLE_RATE) for frame in frames])
    return _silero_activity(audio.astype(np.float32) / 32768.0, n)


@functools.cache
def _silero_model():
    """silero-vad's shipped model, loaded once per process."""
    from silero_vad import load_silero_vad

    return load_silero_vad()


def _silero_activity(audio: np.ndarray, n: int) -> np.ndarray:
    """silero speech segments rasterised on the 30 ms grid (a frame is active when its centre is speech)."""
    import torch
    from silero_vad import get_speech_timestamps

    segments = get_speech_timestamps(torch.from_numpy(audio), _silero_model(), sampling_rate=SAMPLE_RATE)
    centres = (np.arange(n) + 0.5) * VAD_FRAME
    active = np.zeros(n, bool)
    for seg in segments:
        active |= (centres >= seg["start"]) & (centres < seg["end"])
    return active


def voiced_share(active: np.ndarray, starts: np.ndarray, ends: np.ndarray) -> np.ndarray:
    """Share of active VAD frames within each interval [start, end] (seconds from the clip start);
    an interval shorter than a VAD frame takes the frame under its midpoint."""
    if len(active) == 0:
        return np.zeros(len(starts))
    hop = VAD_FRAME / SAMPLE_RATE
    centres = (np.arange(len(active)) + 0.5) * hop
    out = np.empty(len(starts))
    for i, (lo, hi) in enumerate(zip(starts, ends)):
        inside = active[(centres >= lo) & (centres <= hi)]
        out[i] = inside.mean() if len(inside) else active[min(int((lo + hi) / 2 / hop), len(active) - 1)]
    return out


def mouth_patches(grey: np.ndarray, track: Track, margin: int = 0) -> np.ndarray:
    """float32 [T, h + 2 margin, w + 2 margin]: the mouth region of each track frame, aligned on the
    eyes (rotation, scale, position follow the head) and placed at the track's median mouth position
    in that face frame, so an opening mouth does not move its own window."""
    points = track.landmarks.astype(np.float64)
    left, right = points[:, 0], points[:, 1]
    axis_x = right - left
    iod = np.maximum(np.hypot(axis_x[:, 0], axis_x[:, 1]), 1e-6)
    axis_x = axis_x / iod[:, None]
    axis_y = np.stack([-axis_x[:, 1], axis_x[:, 0]], axis=1)
    origin = (left + right) / 2
    mouth = points[:, 3:5].mean(axis=1) - origin
    u = np.median((mouth * axis_x).sum(axis=1) / iod)
    v = np.median((mouth * axis_y).sum(axis=1) / iod) + PATCH_DROP
    w, h = PATCH_SIZE
    size = (w + 2 * margin, h + 2 * margin)
    patches = np.empty((len(track), size[1], size[0]), np.float32)
    for k, frame in enumerate(track.frames):
        linear = w / (PATCH_WIDTH * iod[k]) * np.stack([axis_x[k], axis_y[k]])
        centre = origin[k] + iod[k] * (u * axis_x[k] + v * axis_y[k])
        matrix = np.hstack([linear, (np.array(size) / 2 - linear @ centre)[:, None]])
        patches[k] = cv2.warpAffine(grey[frame], matrix, size, flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
    return patches


def mouth_motion(grey: np.ndarray, track: Track) -> np.ndarray:
    """[T - 1]: mean abs change of the blurred mouth patch between consecutive track frames at the best
    small shift, in units of the patch's median contrast over the track (lighting drops out); NaN across
    detection gaps."""
    if len(track) < 2:
        return np.zeros(0)
    patches = np.stack([cv2.GaussianBlur(p, (0, 0), BLUR_SIGMA) for p in mouth_patches(grey, track, SEARCH)])
    core = patches[:, SEARCH:-SEARCH, SEARCH:-SEARCH]
    contrast = max(float(np.median(core.std(axis=(1, 2)))), 1.0)
    h, w = core.shape[1:]
    windows = np.lib.stride_tricks.sliding_window_view(patches[:-1], (h, w), axis=(1, 2))  # [T-1, sy, sx, h, w]
    change = np.abs(windows - core[1:, None, None]).mean(axis=(3, 4)).min(axis=(1, 2))
    motion = change / contrast
    motion[np.diff(track.frames) != 1] = np.nan
    return motion


class ActiveSpeakerSelector:
    """Scores face tracks against voice activity and picks the active speaker."""

    def __init__(self, cfg: SpeakerConfig):
        self.cfg = cfg

    def select(self, grey: np.ndarray, times: np.ndarray, tracks: list[Track], audio: np.ndarray) -> SpeakerChoice:
        """`grey` [N, H, W] frames at `times` (seconds from the start of `audio`, 16 kHz mono)."""
        active = voice_activity(audio, self.cfg)
        steps = max(len(times) - 1, 1)
        scores: dict[int, float] = {}
        ranked: list[tuple[float, float, int]] = []
        for track in tracks:
            motion = mouth_motion(grey, track)
            voiced = voiced_share(active, times[track.frames[:-1]], times[track.frames[1:]]) >= 0.5
            changing = np.nan_to_num(motion) > self.cfg.mouth_change_threshold
            scores[track.id] = float((changing & voiced).sum()) / steps
            ranked.append((scores[track.id], float(np.nansum(motion * voiced)), -track.id))
        best = max(ranked, default=(0.0, 0.0, 0))
        if best[0] <= 0:
            return SpeakerChoice(None, 0.0, scores)
        return SpeakerChoice(-best[2], best[0], scores)


def speaker_face_crops(
    video_path: str | Path | VideoReader,
    start: float,
    end: float,
    audio_16k: np.ndarray,
    face_cfg: FaceConfig,
    speaker_cfg: SpeakerConfig,
    detector: FaceDetector,
) -> FaceResult:
    """One utterance: read -> detect on keyframes -> track -> clip rules -> active speaker -> aligned crops.

    `video_path` may also be an open decord VideoReader (reuse one per video); `audio_16k` is the
    utterance's own audio (16 kHz mono, starting at `start`).
    """
    return speaker_face_crops_batch(video_path, [(start, end)], [audio_16k], face_cfg, speaker_cfg, detector)[0]


def speaker_face_crops_batch(
    video: str | Path | VideoReader,
    spans: Sequence[tuple[float, float]],
    audios: Sequence[np.ndarray],
    face_cfg: FaceConfig,
    speaker_cfg: SpeakerConfig,
    detector: FaceDetector,
) -> list[FaceResult]:
    """speaker_face_crops for several cues of one video, with one detector call per group of cues holding
    at most `face_cfg.batch_frames` sampled frames (a GPU detector wants large batches; memory bounds them)."""
    reader = open_video(video) if isinstance(video, (str, Path)) else video
    results: list[FaceResult] = []
    for group in _frame_groups(spans, face_cfg):
        clips = [read_frames(reader, *spans[i], face_cfg.fps) for i in group]
        plans = [plan_keyframes(frames, face_cfg) for frames, _ in clips]
        keyed = [frames[keys] for (frames, _), (keys, _) in zip(clips, plans)]
        found = detector.detect(np.concatenate(keyed)) if sum(map(len, keyed)) else []
        bounds = np.cumsum([0] + [len(k) for k in keyed])
        for n, i in enumerate(group):
            (frames, times), (keys, shots) = clips[n], plans[n]
            tracks = tracks_from_keyframes(found[bounds[n] : bounds[n + 1]], keys, shots, face_cfg)
            results.append(_speaker_crops(frames, times, spans[i][0], tracks, audios[i], face_cfg, speaker_cfg))
    return results


def _frame_groups(spans: Sequence[tuple[float, float]], cfg: FaceConfig) -> list[list[int]]:
    """Consecutive cue indices grouped so that each group samples at most `cfg.batch_frames` frames (a longer
    cue alone makes a group)."""
    groups: list[list[int]] = []
    total = 0.0
    for i, (start, end) in enumerate(spans):
        frames = np.ceil((end - start) * cfg.fps)
        if not groups or total + frames > cfg.batch_frames:
            groups.append([])
            total = 0.0
        groups[-1].append(i)
        total += frames
    return groups


def _speaker_crops(
    frames: np.ndarray, times: np.ndarray, start: float, tracks: list[Track], audio_16k: np.ndarray,
    face_cfg: FaceConfig, speaker_cfg: SpeakerConfig,
) -> FaceResult:
    """Clip rules, active speaker and crops of one cue whose frames are at video `times` and whose audio starts at `start`."""
    if not tracks:
        return _dropped("no_face", {}, face_cfg.crop_size)
    if main_face_fraction(tracks, len(frames)) < face_cfg.min_track_fraction:
        return _dropped(f"main_face_under_{round(100 * face_cfg.min_track_fraction)}pct", {}, face_cfg.crop_size)
    grey = to_grey(frames)
    choice = ActiveSpeakerSelector(speaker_cfg).select(grey, times - start, tracks, audio_16k)
    if choice.track_id is None:
        if speaker_cfg.drop_without_speaker:
            return _dropped("no_active_speaker", choice.scores, face_cfg.crop_size)
        choice = replace(choice, track_id=max(tracks, key=lambda t: (len(t), -t.id)).id)  # the main face
    track = next(t for t in tracks if t.id == choice.track_id)
    keep = subsample(len(track), face_cfg.max_frames)
    track = Track(track.id, track.frames[keep], track.boxes[keep], track.landmarks[keep], track.scores[keep])
    return FaceResult(
        crops=aligned_crops(grey, track, face_cfg.crop_size),
        track_id=track.id,
        score=choice.score,
        times=times[track.frames],
        boxes=track.boxes,
        scores=choice.scores,
    )


def _dropped(reason: str, scores: dict[int, float], size: int) -> FaceResult:
    """A dropped clip: no crops, no track."""
    return FaceResult(np.zeros((0, size, size), np.uint8), None, 0.0, reason_if_dropped=reason, scores=scores)
