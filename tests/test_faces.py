"""Faces: decord frame sampling, real CenterFace and MTCNN detections, keyframes, IoU tracking, shot cuts,
eye-levelled 64x64 grey crops."""

from __future__ import annotations

import subprocess
from pathlib import Path

import cv2
import imageio_ffmpeg
import numpy as np
import pytest
import skimage.data

from preprocessing.config import FaceConfig
from preprocessing.detectors import Detections, FaceDetector, MtcnnDetector, build_detector, parse_mtcnn
from preprocessing.faces import (
    EYE_DISTANCE,
    EYE_HEIGHT,
    VideoReadError,
    aligned_crops,
    eye_alignment,
    fill_between_keyframes,
    keyframes,
    main_face_fraction,
    read_frames,
    shot_starts,
    subsample,
    track_faces,
    tracks_from_keyframes,
)

DETECTORS = ("centerface", "mtcnn")


@pytest.fixture(scope="module")
def detector() -> FaceDetector:
    return build_detector(FaceConfig(detector="mtcnn", device="cpu"))


@pytest.fixture(scope="module", params=DETECTORS)
def any_detector(request: pytest.FixtureRequest) -> FaceDetector:
    return build_detector(FaceConfig(detector=request.param, device="cpu"))


def eyes(detector: FaceDetector, image: np.ndarray) -> np.ndarray:
    """Left and right eye (2, 2) of the single most confident face MTCNN finds in `image`."""
    dets = detector.detect(image[None])[0]
    assert len(dets) >= 1, "MTCNN found no face"
    return dets.landmarks[int(np.argmax(dets.scores)), :2]


def photos() -> dict[str, np.ndarray]:
    """The face photographs that ship offline: scikit-image's astronaut and cameraman, matplotlib's Grace Hopper."""
    from matplotlib import cbook
    from PIL import Image

    with cbook.get_sample_data("grace_hopper.jpg") as f:
        hopper = np.asarray(Image.open(f).convert("RGB"))
    return {"astronaut": skimage.data.astronaut(), "cameraman": cv2.cvtColor(skimage.data.camera(), cv2.COLOR_GRAY2RGB),
            "grace_hopper": hopper}


def test_mtcnn_is_still_selectable_and_centerface_is_the_default() -> None:
    assert FaceConfig().detector == "centerface"
    assert isinstance(build_detector(FaceConfig(detector="mtcnn", device="cpu")), MtcnnDetector)


@pytest.mark.parametrize("photo", ["astronaut", "cameraman", "grace_hopper"])
def test_every_detector_finds_the_face_in_real_photographs(any_detector: FaceDetector, photo: str) -> None:
    image = photos()[photo]
    (dets,) = any_detector.detect(image[None])
    assert len(dets) == 1 and dets.scores[0] > 0.5
    assert dets.boxes.dtype == np.float32 and dets.landmarks.shape == (1, 5, 2)
    x1, y1, x2, y2 = dets.boxes[0]
    assert 0 <= x1 < x2 <= image.shape[1] and 0 <= y1 < y2 <= image.shape[0]
    points = dets.landmarks[0]
    assert np.all((points[:, 0] > x1) & (points[:, 0] < x2) & (points[:, 1] > y1) & (points[:, 1] < y2))
    left_eye, right_eye, nose, mouth_left, mouth_right = points
    assert left_eye[0] < right_eye[0] and mouth_left[0] < mouth_right[0]
    assert max(left_eye[1], right_eye[1]) < nose[1] < min(mouth_left[1], mouth_right[1])


def test_both_detectors_agree_on_the_astronaut_in_a_batch_of_frames() -> None:
    image = skimage.data.astronaut()
    batch = np.stack([image, np.zeros_like(image), image[:, ::-1].copy()])
    found = {name: build_detector(FaceConfig(detector=name, device="cpu")).detect(batch) for name in DETECTORS}
    for name, dets in found.items():
        assert [len(d) for d in dets] == [1, 0, 1], name
    centre = {name: (dets[0].boxes[0, :2] + dets[0].boxes[0, 2:]) / 2 for name, dets in found.items()}
    assert np.abs(centre["centerface"] - centre["mtcnn"]).max() < 10  # pixels, in a 512 x 512 photo
    mirrored = found["centerface"][2].boxes[0]
    assert mirrored[0] == pytest.approx(512 - found["centerface"][0].boxes[0, 2], abs=4)


def test_parse_mtcnn_casts_object_arrays_and_drops_low_confidence() -> None:
    boxes = np.array([[0, 0, 10, 10], [5, 5, 20, 20], [1, 1, 9, 9]], dtype=object)
    probs = np.array([0.5, 0.97, 0.2], dtype=object)
    points = np.zeros((3, 5, 2), dtype=object)
    points[1, 0, 0], points[1, 1, 0] = 15.0, 8.0  # eyes given right-to-left: reordered to image order
    dets = parse_mtcnn(boxes, probs, points, min_confidence=0.5)
    assert len(dets) == 1 and dets.scores.dtype == np.float32 and dets.scores[0] == pytest.approx(0.97)
    assert dets.landmarks[0, 0, 0] == 8.0 and dets.landmarks[0, 1, 0] == 15.0
    assert len(parse_mtcnn(None, [None], None, 0.5)) == 0


def box(x: float, y: float, size: float = 40.0) -> Detections:
    """A detection at (x, y) with plausible landmarks."""
    points = np.array([[0.3, 0.4], [0.7, 0.4], [0.5, 0.6], [0.35, 0.8], [0.65, 0.8]]) * size + [x, y]
    boxes = np.array([[x, y, x + size, y + size]], np.float32)
    return Detections(boxes, points[None].astype(np.float32), np.ones(1, np.float32))


def frames_of(*per_frame: list[Detections]) -> list[Detections]:
    """Merge per-frame lists of single detections into one Detections per frame."""
    out = []
    for dets in per_frame:
        if not dets:
            out.append(Detections.empty())
            continue
        fields = ("boxes", "landmarks", "scores")
        out.append(Detections(*(np.concatenate([getattr(d, k) for d in dets]) for k in fields)))
    return out


def test_tracking_bridges_a_two_frame_gap_and_splits_on_a_jump() -> None:
    walk = [[box(10 + f, 10)] for f in range(8)]
    walk[3] = walk[4] = []  # two frames without a detection
    walk[7] = [box(200, 150)]  # the face jumps across the frame: a new track
    tracks = track_faces(frames_of(*walk), max_gap_frames=3, min_iou=0.3)
    assert [t.id for t in tracks] == [0, 1]
    assert tracks[0].frames.tolist() == [0, 1, 2, 5, 6] and tracks[1].frames.tolist() == [7]
    assert tracks[0].boxes.shape == (5, 4) and tracks[0].landmarks.shape == (5, 5, 2)


def test_tracking_splits_after_a_gap_longer_than_allowed() -> None:
    walk = [[box(10, 10)], [], [], [], [], [box(10, 10)]]
    assert [t.frames.tolist() for t in track_faces(frames_of(*walk), max_gap_frames=3)] == [[0], [5]]
    assert len(track_faces(frames_of(*walk), max_gap_frames=4)) == 1


def test_track_ids_follow_first_appearance_left_to_right() -> None:
    # The detector lists the right face first; ids must not depend on that order.
    frames = frames_of([box(200, 10), box(10, 10)], [box(10, 12), box(201, 10)])
    tracks = track_faces(frames)
    assert [(t.id, float(t.boxes[0, 0])) for t in tracks] == [(0, 10.0), (1, 200.0)]
    assert all(len(t) == 2 for t in tracks)


def test_tracks_are_filled_between_keyframes() -> None:
    # A face walking right 2 px per frame, detected on keyframes 0, 3, 6 only.
    keys = keyframes(7, 3, np.zeros(7, bool))
    assert keys.tolist() == [0, 3, 6]
    (track,) = tracks_from_keyframes(frames_of(*[[box(10 + 2 * f, 10)] for f in keys]), keys, np.zeros(7, np.int64),
                                     FaceConfig(detect_every=3))
    assert track.frames.tolist() == list(range(7))
    np.testing.assert_allclose(track.boxes[:, 0], 10 + 2 * np.arange(7), atol=1e-5)
    np.testing.assert_allclose(track.landmarks[:, 0, 0], 10 + 2 * np.arange(7) + 0.3 * 40, atol=1e-4)
    assert track.landmarks.shape == (7, 5, 2) and track.scores.shape == (7,)


def test_a_missed_keyframe_leaves_a_gap_instead_of_a_guess() -> None:
    keys = np.array([0, 3, 6, 9])
    dets = frames_of([box(10, 10)], [], [box(12, 10)], [box(13, 10)])
    (track,) = track_faces(dets, max_gap_frames=1, frames=keys)
    assert track.frames.tolist() == [0, 6, 9]
    filled = fill_between_keyframes(track, keys)
    assert filled.frames.tolist() == [0, 6, 7, 8, 9]  # nothing invented around keyframe 3, where it was missed


def cut_clip() -> np.ndarray:
    """12 frames of 120 x 160: a dark scene, then from frame 7 a bright one; mild noise in every frame."""
    rng = np.random.default_rng(0)
    frames = np.concatenate([np.full((7, 120, 160, 3), 50, np.uint8), np.full((5, 120, 160, 3), 190, np.uint8)])
    return np.clip(frames + rng.normal(0, 4, frames.shape), 0, 255).astype(np.uint8)


def test_a_shot_cut_is_found_and_both_sides_are_detected() -> None:
    frames = cut_clip()
    starts = shot_starts(frames, FaceConfig().cut_threshold)
    assert np.flatnonzero(starts).tolist() == [7]
    assert keyframes(len(frames), 5, starts).tolist() == [0, 5, 6, 7, 10, 11]
    assert not shot_starts(frames[:7], FaceConfig().cut_threshold).any()  # noise alone is no cut


def test_tracks_never_cross_a_shot_cut() -> None:
    # The same place on both sides of the cut (an over-the-shoulder reverse shot): two tracks, not one.
    frames = cut_clip()
    starts = shot_starts(frames, FaceConfig().cut_threshold)
    keys = keyframes(len(frames), 5, starts)
    tracks = tracks_from_keyframes(frames_of(*[[box(40, 30)] for _ in keys]), keys, np.cumsum(starts),
                                   FaceConfig(detect_every=5))
    assert [t.frames.tolist() for t in tracks] == [list(range(7)), list(range(7, 12))]


def test_crop_levels_the_eyes_of_a_tilted_face(detector: FaceDetector) -> None:
    image = skimage.data.astronaut()
    rotation = cv2.getRotationMatrix2D((224.0, 117.0), 15.0, 1.0)  # about the face centre
    tilted = cv2.warpAffine(image, rotation, image.shape[1::-1], borderMode=cv2.BORDER_REPLICATE)
    left, right = eyes(detector, tilted)
    assert abs(np.degrees(np.arctan2(right[1] - left[1], right[0] - left[0]))) > 10  # the input is tilted

    (dets,) = detector.detect(tilted[None])
    track = track_faces([dets])[0]
    grey = cv2.cvtColor(tilted, cv2.COLOR_RGB2GRAY)[None]
    crop = aligned_crops(grey, track, 64)
    assert crop.shape == (1, 64, 64) and crop.dtype == np.uint8

    # Measure the eyes on the crop itself (upscaled 4x for MTCNN), in crop pixels.
    upscaled = cv2.resize(crop[0], (256, 256), interpolation=cv2.INTER_CUBIC)
    left, right = eyes(detector, cv2.cvtColor(upscaled, cv2.COLOR_GRAY2RGB)) / 4
    assert abs(right[1] - left[1]) < 2.0
    assert (right[0] - left[0]) == pytest.approx(EYE_DISTANCE * 64, abs=3.0)
    assert (left[1] + right[1]) / 2 == pytest.approx(EYE_HEIGHT * 64, abs=3.0)


def test_eye_alignment_maps_the_eyes_onto_the_template() -> None:
    angle = np.radians(-25.0)
    left = np.array([100.0, 80.0])
    right = left + 57.0 * np.array([np.cos(angle), np.sin(angle)])
    matrix = eye_alignment(np.stack([left, right, left, left, right]), 64)
    mapped = np.stack([left, right]) @ matrix[:, :2].T + matrix[:, 2]
    expected = [[32 - EYE_DISTANCE * 32, EYE_HEIGHT * 64], [32 + EYE_DISTANCE * 32, EYE_HEIGHT * 64]]
    np.testing.assert_allclose(mapped, expected, atol=1e-9)


def test_subsample_keeps_order_and_span() -> None:
    keep = subsample(100, 36)
    assert len(keep) == 36 and keep[0] == 0 and keep[-1] == 99 and np.all(np.diff(keep) > 0)
    assert subsample(20, 36).tolist() == list(range(20))


def test_main_face_fraction_counts_the_longest_track() -> None:
    tracks = track_faces(frames_of([box(10, 10)], [box(11, 10), box(200, 10)], [], [box(200, 10)], []))
    assert main_face_fraction(tracks, 5) == pytest.approx(2 / 5)
    assert main_face_fraction([], 5) == 0.0


def test_read_frames_samples_at_ten_fps(tmp_path: Path) -> None:
    # Frame i of a 25 fps video is a flat grey of level 10 + 3 i: the decoded level names the frame.
    levels = 10 + 3 * np.arange(75)
    video = np.repeat(levels.astype(np.uint8)[:, None, None, None], 3, axis=3) * np.ones((1, 48, 64, 3), np.uint8)
    path = tmp_path / "count.mp4"
    cmd = [imageio_ffmpeg.get_ffmpeg_exe(), "-v", "error", "-y", "-f", "rawvideo", "-pix_fmt", "rgb24", "-s", "64x48",
           "-r", "25", "-i", "-", "-c:v", "libx264", "-pix_fmt", "yuv420p", "-g", "10", str(path)]
    subprocess.run(cmd, input=video.tobytes(), check=True)

    frames, times = read_frames(path, 0.5, 1.5, fps=10)
    expected = np.floor((0.5 + np.arange(10) / 10) * 25 + 1e-6).astype(int)  # the frame on screen at each time
    assert frames.shape == (10, 48, 64, 3) and frames.dtype == np.uint8
    np.testing.assert_allclose(times, expected / 25)
    decoded = np.round((frames.mean(axis=(1, 2, 3)) - 10) / 3).astype(int)
    assert decoded.tolist() == expected.tolist()


def test_read_frames_names_the_file_on_errors(tmp_path: Path) -> None:
    with pytest.raises(VideoReadError, match="missing.mp4"):
        read_frames(tmp_path / "missing.mp4", 0, 1)
    broken = tmp_path / "broken.mp4"
    broken.write_bytes(b"not a video at all" * 100)
    with pytest.raises(VideoReadError, match="broken.mp4"):
        read_frames(broken, 0, 1)


def test_centerface_on_cuda_without_the_cuda_provider_names_the_key() -> None:
    from preprocessing.detectors import onnx_cuda_available

    if onnx_cuda_available():
        pytest.skip("onnxruntime-gpu is installed: CUDA is a valid choice here")
    with pytest.raises(ValueError, match="face.device='cuda'.*onnxruntime-gpu"):
        build_detector(FaceConfig(detector="centerface", device="cuda"))
