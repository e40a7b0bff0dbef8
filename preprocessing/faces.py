"""Faces of an utterance: frames at 10 fps (decord), detections on keyframes, IoU tracks filled in between,
shot cuts, aligned crops.

Crops are grey uint8 [T, 64, 64] in 0..255 with the eyes level at a fixed place (FER+ framing); the
normalisation by the FER model's dataset mean/std happens in the visual encoder, so the crops stay
plain images that any FER checkpoint can consume.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import cv2
import numpy as np

from preprocessing.config import FaceConfig
from preprocessing.detectors import Detections, iou

if TYPE_CHECKING:
    from decord import VideoReader

# Crop template (fractions of the crop side): FER2013 / FER+ images are tight faces with the eyes a
# little above the middle, about 0.38 of the width apart; matching that keeps a FER+ model in-domain.
EYE_DISTANCE = 0.38
EYE_HEIGHT = 0.38


class VideoReadError(RuntimeError):
    """A video could not be opened or decoded."""


@dataclass
class Track:
    """One face followed over a clip; `frames` index the clip's sampled frames (ascending)."""

    id: int
    frames: np.ndarray  # int64 [T]
    boxes: np.ndarray  # float32 [T, 4]
    landmarks: np.ndarray  # float32 [T, 5, 2]: left eye, right eye, nose, left / right mouth corner
    scores: np.ndarray  # float32 [T]

    def __len__(self) -> int:
        return len(self.frames)


def open_video(path: str | Path) -> VideoReader:
    """A decord VideoReader, or VideoReadError naming the file."""
    import decord

    path = Path(path)
    if not path.is_file():
        raise VideoReadError(f"{path}: video file not found")
    try:
        # One decode thread: the pipeline parallelises over utterances, not inside one.
        return decord.VideoReader(str(path), ctx=decord.cpu(0), num_threads=1)
    except (decord.DECORDError, RuntimeError) as err:
        raise VideoReadError(f"{path}: cannot open video: {err}") from err


def read_frames(
    video: str | Path | VideoReader, start: float, end: float, fps: float = 10.0
) -> tuple[np.ndarray, np.ndarray]:
    """RGB uint8 [N, H, W, 3] sampled at `fps` within [start, end) and their times in seconds.

    `video` is a path or an open decord VideoReader (reuse one per video: opening indexes the file).
    Each sample time t takes the frame on screen at t (constant frame rate assumed); the returned
    times are those frames' own start times.
    """
    import decord

    reader = open_video(video) if isinstance(video, (str, Path)) else video
    name = video if isinstance(video, (str, Path)) else "video"
    native = float(reader.get_avg_fps())
    times = start + np.arange(int(np.ceil((end - start) * fps - 1e-9))) / fps
    index = np.unique(np.floor(times * native + 1e-6).astype(np.int64))
    index = index[index < len(reader)]
    if len(index) == 0:
        return np.zeros((0,) + reader[0].shape, np.uint8), np.zeros(0)
    try:
        frames = reader.get_batch(index.tolist()).asnumpy()
    except (decord.DECORDError, RuntimeError) as err:
        raise VideoReadError(f"{name}: cannot decode frames {index[0]}..{index[-1]}: {err}") from err
    return frames, index / native


def shot_starts(frames: np.ndarray, threshold: float, bins: int = 32) -> np.ndarray:
    """bool [N]: frame i (> 0) starts a new shot when its grey-level histogram differs from frame i - 1's
    by more than `threshold` of their mass (total variation distance). Frames are RGB uint8 [N, H, W, 3]."""
    starts = np.zeros(len(frames), bool)
    if len(frames) < 2:
        return starts
    hists = np.stack([np.bincount(cv2.cvtColor(cv2.resize(f, (64, 48), interpolation=cv2.INTER_AREA), cv2.COLOR_RGB2GRAY)
                                  .ravel() // (256 // bins), minlength=bins) for f in frames]).astype(np.float64)
    hists /= hists.sum(axis=1, keepdims=True)
    starts[1:] = 0.5 * np.abs(np.diff(hists, axis=0)).sum(axis=1) > threshold
    return starts


def keyframes(count: int, every: int, starts: np.ndarray) -> np.ndarray:
    """Sorted indices of the frames to run the detector on: every `every`-th, the last, and both sides of
    each shot cut (so no interpolation spans a cut)."""
    cuts = np.flatnonzero(starts)
    keys = np.concatenate([np.arange(0, count, every), [count - 1], cuts, cuts - 1]) if count else np.zeros(0)
    return np.unique(keys).astype(np.int64)


def track_faces(
    detections: Sequence[Detections],
    max_gap_frames: int = 3,
    min_iou: float = 0.3,
    frames: Sequence[int] | None = None,
    shots: Sequence[int] | None = None,
) -> list[Track]:
    """Greedy IoU tracks over the examined frames (`frames`: their indices, default 0..N-1; `shots`: their
    shot numbers). A track bridges up to `max_gap_frames` examined frames without a match and never a
    shot cut. Ids follow first appearance (left to right within a frame), not the detector's output order."""
    index = np.arange(len(detections)) if frames is None else np.asarray(frames, np.int64)
    shot = np.zeros(len(detections), np.int64) if shots is None else np.asarray(shots)
    rows: list[list[tuple[int, int]]] = []  # per track: (position in `detections`, detection index)
    for f, dets in enumerate(detections):
        live = [t for t, row in enumerate(rows) if f - row[-1][0] - 1 <= max_gap_frames and shot[row[-1][0]] == shot[f]]
        taken: set[int] = set()
        matched: set[int] = set()
        if live and len(dets):
            last = np.stack([detections[rows[t][-1][0]].boxes[rows[t][-1][1]] for t in live])
            overlap = iou(last, dets.boxes)
            # Best pairs first; ties resolved by (track, detection) order for determinism.
            for score, i, j in sorted(((-overlap[i, j], i, j) for i in range(len(live)) for j in range(len(dets)))):
                if -score < min_iou:
                    break
                if j not in taken and i not in matched:
                    rows[live[i]].append((f, j))
                    taken.add(j)
                    matched.add(i)
        for j in sorted(set(range(len(dets))) - taken, key=lambda j: (dets.boxes[j, 0], dets.boxes[j, 1])):
            rows.append([(f, j)])
    return [_track(i, row, detections, index) for i, row in enumerate(rows)]


def _track(track_id: int, row: list[tuple[int, int]], detections: Sequence[Detections], index: np.ndarray) -> Track:
    """Gather a track's per-frame arrays."""
    return Track(
        id=track_id,
        frames=index[[f for f, _ in row]],
        boxes=np.stack([detections[f].boxes[j] for f, j in row]),
        landmarks=np.stack([detections[f].landmarks[j] for f, j in row]),
        scores=np.array([detections[f].scores[j] for f, j in row], np.float32),
    )


def fill_between_keyframes(track: Track, keys: np.ndarray) -> Track:
    """The track on every frame between two consecutive keyframes where it was detected, boxes, landmarks
    and scores interpolated linearly; frames around a keyframe where it was missed stay a gap."""
    position = np.searchsorted(keys, track.frames)
    frames = [track.frames[:1]]
    for a, b in zip(range(len(track) - 1), range(1, len(track))):
        if position[b] == position[a] + 1:
            frames.append(np.arange(track.frames[a] + 1, track.frames[b] + 1))
        else:
            frames.append(track.frames[b : b + 1])
    filled = np.concatenate(frames)

    def at(values: np.ndarray) -> np.ndarray:
        return np.stack([np.interp(filled, track.frames, v) for v in values.reshape(len(track), -1).T], axis=1)

    return Track(
        id=track.id,
        frames=filled,
        boxes=at(track.boxes).astype(np.float32),
        landmarks=at(track.landmarks).reshape(-1, 5, 2).astype(np.float32),
        scores=at(track.scores).ravel().astype(np.float32),
    )


def plan_keyframes(frames: np.ndarray, cfg: FaceConfig) -> tuple[np.ndarray, np.ndarray]:
    """(keyframe indices, shot number of each frame) of one clip's frames."""
    starts = shot_starts(frames, cfg.cut_threshold)
    return keyframes(len(frames), cfg.detect_every, starts), np.cumsum(starts)


def tracks_from_keyframes(detections: Sequence[Detections], keys: np.ndarray, shots: np.ndarray, cfg: FaceConfig) -> list[Track]:
    """Tracks over a clip's frames from detections on its keyframes, filled in between."""
    max_gap = -(-cfg.max_gap_frames // cfg.detect_every)  # in keyframes: the same span of time as on every frame
    tracks = track_faces(detections, max_gap, cfg.min_iou, keys, shots[keys])
    return [fill_between_keyframes(t, keys) for t in tracks]


def eye_alignment(
    landmarks: np.ndarray, size: int, distance: float = EYE_DISTANCE, height: float = EYE_HEIGHT
) -> np.ndarray:
    """2x3 similarity that levels the eyes, sets their distance to `distance * size` and centres them
    at (size / 2, height * size)."""
    left, right = landmarks[0].astype(np.float64), landmarks[1].astype(np.float64)
    dx, dy = right - left
    scale = distance * size / max(np.hypot(dx, dy), 1e-6)
    angle = np.arctan2(dy, dx)
    cos, sin = scale * np.cos(angle), scale * np.sin(angle)
    linear = np.array([[cos, sin], [-sin, cos]])  # rotate by -angle, then scale
    shift = np.array([size / 2, height * size]) - linear @ ((left + right) / 2)
    return np.hstack([linear, shift[:, None]])


def warp(grey: np.ndarray, matrix: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Apply a similarity `matrix` into an output of `size` (w, h), area-shrinking first when it scales
    down (a bilinear warp alone aliases on large faces)."""
    scale = float(np.hypot(*matrix[0, :2]))
    if scale < 1:
        grey = cv2.resize(grey, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA)
        pre = np.array([[scale, 0, scale / 2 - 0.5], [0, scale, scale / 2 - 0.5], [0, 0, 1]])  # cv2.resize's pixel map
        matrix = matrix @ np.linalg.inv(pre)
    return cv2.warpAffine(grey, matrix, size, flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)


def to_grey(frames: np.ndarray) -> np.ndarray:
    """RGB uint8 [N, H, W, 3] -> grey uint8 [N, H, W]."""
    return np.stack([cv2.cvtColor(f, cv2.COLOR_RGB2GRAY) for f in frames]) if len(frames) else frames[..., 0]


def aligned_crops(grey: np.ndarray, track: Track, size: int = 64) -> np.ndarray:
    """Grey uint8 [T, size, size]: each track frame with the eyes level, scaled by inter-ocular distance."""
    crops = [warp(grey[f], eye_alignment(lm, size), (size, size)) for f, lm in zip(track.frames, track.landmarks)]
    return np.stack(crops) if crops else np.zeros((0, size, size), np.uint8)


def main_face_fraction(tracks: Sequence[Track], num_frames: int) -> float:
    """Share of the clip's frames in which its most frequent face (longest track) appears."""
    return max((len(t) for t in tracks), default=0) / max(num_frames, 1)


def subsample(count: int, max_frames: int) -> np.ndarray:
    """At most `max_frames` indices into range(count), evenly spread and in temporal order (the whole
    utterance stays covered instead of only its start)."""
    if count <= max_frames:
        return np.arange(count)
    return np.round(np.linspace(0, count - 1, max_frames)).astype(np.int64)
