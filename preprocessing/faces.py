"""Faces of an utterance: frames at 10 fps (decord), MTCNN boxes and 5 landmarks, IoU tracks, aligned crops.

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

if TYPE_CHECKING:
    from decord import VideoReader

# Crop template (fractions of the crop side): FER2013 / FER+ images are tight faces with the eyes a
# little above the middle, about 0.38 of the width apart; matching that keeps a FER+ model in-domain.
EYE_DISTANCE = 0.38
EYE_HEIGHT = 0.38
MTCNN_MIN_FACE = 20  # MTCNN's own default: the smallest face its 12 px PNet window sees reliably


class VideoReadError(RuntimeError):
    """A video could not be opened or decoded."""


@dataclass
class Detections:
    """One frame's faces: boxes [n, 4] (x1, y1, x2, y2), landmarks [n, 5, 2], scores [n]."""

    boxes: np.ndarray
    landmarks: np.ndarray
    scores: np.ndarray

    @classmethod
    def empty(cls) -> Detections:
        """No face in this frame."""
        return cls(np.zeros((0, 4), np.float32), np.zeros((0, 5, 2), np.float32), np.zeros(0, np.float32))

    def __len__(self) -> int:
        return len(self.scores)


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


def resolve_device(device: str) -> str:
    """'auto' -> cuda when available, else cpu."""
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


class FaceDetector:
    """MTCNN (facenet-pytorch, weights shipped in the wheel) over batches of frames."""

    def __init__(self, cfg: FaceConfig, batch_size: int = 32):
        from facenet_pytorch import MTCNN

        self.cfg = cfg
        self.batch_size = batch_size
        self.mtcnn = MTCNN(keep_all=True, factor=cfg.pyramid_factor, device=resolve_device(cfg.device))

    def min_face_size(self, height: int, width: int) -> int:
        """Smallest face searched, relative to the frame so the pyramid costs the same at any resolution."""
        return max(MTCNN_MIN_FACE, int(round(self.cfg.min_face_fraction * min(height, width))))

    def detect(self, frames: np.ndarray) -> list[Detections]:
        """Faces per frame with confidence above `min_confidence`; frames are RGB uint8 [N, H, W, 3]."""
        if len(frames) == 0:
            return []
        self.mtcnn.min_face_size = self.min_face_size(*frames.shape[1:3])
        out: list[Detections] = []
        for lo in range(0, len(frames), self.batch_size):
            boxes, probs, points = self.mtcnn.detect(frames[lo : lo + self.batch_size], landmarks=True)
            out.extend(parse_mtcnn(b, p, q, self.cfg.min_confidence) for b, p, q in zip(boxes, probs, points))
        return out


def parse_mtcnn(boxes, probs, points, min_confidence: float) -> Detections:
    """One frame of MTCNN.detect output (numpy-2 object arrays; None when empty) as float32 arrays,
    keeping faces with confidence above `min_confidence`."""
    if boxes is None:
        return Detections.empty()
    boxes = np.asarray(boxes).astype(np.float32).reshape(-1, 4)
    scores = np.asarray(probs).astype(np.float32).reshape(-1)
    points = np.asarray(points).astype(np.float32).reshape(-1, 5, 2)
    keep = scores > min_confidence
    return Detections(boxes[keep], image_order(points[keep]), scores[keep])


def image_order(points: np.ndarray) -> np.ndarray:
    """Landmarks [n, 5, 2] with eyes and mouth corners in left-to-right image order, so alignment never
    turns a face upside down when the detector swaps a pair."""
    points = points.copy()
    for a, b in ((0, 1), (3, 4)):
        swap = points[:, a, 0] > points[:, b, 0]
        points[swap, a], points[swap, b] = points[swap, b], points[swap, a]
    return points


def iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pairwise IoU of boxes a [n, 4] and b [m, 4] -> [n, m]."""
    x1 = np.maximum(a[:, None, 0], b[None, :, 0])
    y1 = np.maximum(a[:, None, 1], b[None, :, 1])
    x2 = np.minimum(a[:, None, 2], b[None, :, 2])
    y2 = np.minimum(a[:, None, 3], b[None, :, 3])
    inter = np.clip(x2 - x1, 0, None) * np.clip(y2 - y1, 0, None)
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    return inter / np.maximum(area_a[:, None] + area_b[None, :] - inter, 1e-9)


def track_faces(detections: Sequence[Detections], max_gap_frames: int = 3, min_iou: float = 0.3) -> list[Track]:
    """Greedy IoU tracks; a track bridges up to `max_gap_frames` frames without a match. Ids follow first
    appearance (left to right within a frame), so they do not depend on the detector's output order."""
    rows: list[list[tuple[int, int]]] = []  # per track: (frame, detection index)
    for f, dets in enumerate(detections):
        live = [t for t, row in enumerate(rows) if f - row[-1][0] - 1 <= max_gap_frames]
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
    return [_track(i, row, detections) for i, row in enumerate(rows)]


def _track(track_id: int, row: list[tuple[int, int]], detections: Sequence[Detections]) -> Track:
    """Gather a track's per-frame arrays."""
    return Track(
        id=track_id,
        frames=np.array([f for f, _ in row], np.int64),
        boxes=np.stack([detections[f].boxes[j] for f, j in row]),
        landmarks=np.stack([detections[f].landmarks[j] for f, j in row]),
        scores=np.array([detections[f].scores[j] for f, j in row], np.float32),
    )


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
