"""Active speaker: VAD, landmark-aligned mouth motion, and speaker_face_crops on real encoded clips."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import cv2
import imageio_ffmpeg
import numpy as np
import pytest
import skimage.data
import soundfile
from decord import AudioReader

from preprocessing.config import FaceConfig, SpeakerConfig
from preprocessing.detectors import FaceDetector, build_detector
from preprocessing.faces import read_frames, to_grey, track_faces
from preprocessing.speaker import (
    SAMPLE_RATE,
    FaceResult,
    VAD_FRAME,
    mouth_motion,
    speaker_face_crops,
    speaker_face_crops_batch,
    voice_activity,
)

FPS, SECONDS, WIDTH, HEIGHT = 25, 3.0, 320, 240
FACE_X, FACE_Y = (30, 190), 60  # two faces side by side
SPEAKER_SPLIT_X = WIDTH / 2  # box centres left of this belong to face 0


def envelope(t: np.ndarray) -> np.ndarray:
    """Syllable-like on/off envelope, 2 per second."""
    return np.clip(np.sin(2 * np.pi * 2.0 * t), 0, None)


def voiced(t: np.ndarray, f0: float = 140.0) -> np.ndarray:
    """A harmonic-rich voiced tone (webrtcvad calls it speech; a pure sine it may not)."""
    x = sum(np.sin(2 * np.pi * f0 * k * t + k) / k for k in range(1, 28))
    return x / np.abs(x).max()


def face_sprite() -> tuple[np.ndarray, np.ndarray]:
    """The astronaut's head at 60% scale (face box ~52x66 px) and its two mouth corners."""
    head = cv2.resize(skimage.data.astronaut()[30:220, 150:300], None, fx=0.6, fy=0.6, interpolation=cv2.INTER_AREA)
    corners = (np.array([[201.7, 139.2], [245.3, 141.9]]) - [150, 30]) * 0.6  # MTCNN's, in the photo
    return head, corners


def render(
    path: Path, speaker: int = 0, voice: bool = True, faces: bool = True, face_frames: int | None = None
) -> np.ndarray:
    """A 3 s 320x240 H.264 + AAC clip: face `speaker` opens its mouth with the envelope, the other stays
    closed; both sway by ~1.5 px and every frame gets sensor noise. Returns the 16 kHz audio written."""
    rng = np.random.default_rng(0)
    head, corners = face_sprite()
    centre, half = corners.mean(axis=0) + [0, 1.0], np.hypot(*(corners[1] - corners[0])) / 2
    background = cv2.GaussianBlur(rng.integers(60, 120, (HEIGHT, WIDTH, 3)).astype(np.uint8), (0, 0), 8)
    frames = []
    for i in range(int(SECONDS * FPS)):
        t, frame = i / FPS, background.copy()
        for k, x in enumerate(FACE_X if faces and (face_frames is None or i < face_frames) else ()):
            sprite = head.copy()
            if k == speaker:
                axes = (int(0.8 * half * 16), int(max(0.5, 3.0 * envelope(np.array(t))) * 16))
                centre_fx = tuple(int(c * 16) for c in centre)  # 4-bit fixed point: sub-pixel ellipses
                cv2.ellipse(sprite, centre_fx, axes, 0, 0, 360, (40, 15, 20), -1, cv2.LINE_AA, 4)
            sway = np.float32([[1, 0, x + 1.5 * np.sin(4.4 * t + k)], [0, 1, FACE_Y + np.sin(3.1 * t + 2 * k)]])
            cv2.warpAffine(sprite, sway, (WIDTH, HEIGHT), dst=frame, borderMode=cv2.BORDER_TRANSPARENT)
        frames.append(np.clip(frame + rng.normal(0, 2.0, frame.shape), 0, 255).astype(np.uint8))
    t = np.arange(int(SECONDS * SAMPLE_RATE)) / SAMPLE_RATE
    audio = 0.003 * rng.standard_normal(len(t)) + (0.5 * voiced(t) * envelope(t) if voice else 0)
    wav = path.with_suffix(".wav")
    soundfile.write(wav, audio.astype(np.float32), SAMPLE_RATE)
    cmd = [imageio_ffmpeg.get_ffmpeg_exe(), "-v", "error", "-y", "-f", "rawvideo", "-pix_fmt", "rgb24",
           "-s", f"{WIDTH}x{HEIGHT}", "-r", str(FPS), "-i", "-", "-i", str(wav),
           "-c:v", "libx264", "-pix_fmt", "yuv420p", "-c:a", "aac", "-shortest", str(path)]
    subprocess.run(cmd, input=np.stack(frames).tobytes(), check=True)
    wav.unlink()
    return audio


def clip_audio(path: Path) -> np.ndarray:
    """The clip's audio as the pipeline sees it: decoded back to 16 kHz mono."""
    return AudioReader(str(path), sample_rate=SAMPLE_RATE, mono=True)[:].asnumpy()[0]


def whole_clip(path: Path, detector: FaceDetector, face_cfg: FaceConfig | None = None,
               speaker_cfg: SpeakerConfig | None = None) -> FaceResult:
    """speaker_face_crops over a whole test clip with its own audio."""
    face_cfg, speaker_cfg = face_cfg or FaceConfig(), speaker_cfg or SpeakerConfig()
    return speaker_face_crops(path, 0.0, SECONDS, clip_audio(path), face_cfg, speaker_cfg, detector)


@pytest.fixture(scope="module")
def clips(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("speaker_clips")
    variants = {
        "left_speaks": dict(speaker=0),
        "right_speaks": dict(speaker=1),
        "silent": dict(speaker=0, voice=False),  # the mouth moves, nobody is heard
        "no_face": dict(faces=False),
        "brief_face": dict(face_frames=10),  # faces in the first 0.4 s of 3 s only
    }
    for name, kwargs in variants.items():
        render(root / f"{name}.mp4", **kwargs)
    return {name: root / f"{name}.mp4" for name in variants}


@pytest.fixture(scope="module")
def detector() -> FaceDetector:
    return build_detector(FaceConfig(device="cpu"))


# The default fast path (CenterFace on every 3rd frame, tracks filled in between) and the old one (MTCNN
# on every frame): the speaker choice must not depend on which one runs.
SETTINGS = {
    "centerface_every_3": FaceConfig(device="cpu"),
    "mtcnn_every_frame": FaceConfig(detector="mtcnn", detect_every=1, device="cpu"),
}


@pytest.fixture(scope="module", params=list(SETTINGS))
def setting(request: pytest.FixtureRequest) -> tuple[FaceConfig, FaceDetector]:
    return SETTINGS[request.param], build_detector(SETTINGS[request.param])


def test_webrtcvad_follows_the_voiced_envelope_and_ignores_near_silence() -> None:
    t = np.arange(int(SECONDS * SAMPLE_RATE)) / SAMPLE_RATE
    noise = 0.003 * np.random.default_rng(1).standard_normal(len(t))
    active = voice_activity(noise + 0.5 * voiced(t) * envelope(t), SpeakerConfig())
    assert active.shape == (len(t) // VAD_FRAME,)
    level = envelope(t[: len(active) * VAD_FRAME]).reshape(len(active), VAD_FRAME).mean(axis=1)
    assert active[level > 0.5].all()
    assert active[level == 0].mean() < 0.5  # silent gaps stay mostly inactive (webrtcvad holds ~100 ms over)
    assert not voice_activity(noise, SpeakerConfig()).any()  # includes webrtcvad's start-up frames


def test_silero_finds_no_speech_in_silence() -> None:
    active = voice_activity(np.zeros(SAMPLE_RATE, np.float32), SpeakerConfig(vad="silero"))
    assert active.shape == (SAMPLE_RATE // VAD_FRAME,) and not active.any()


def test_mouth_motion_is_larger_for_the_moving_mouth(clips: dict[str, Path], detector: FaceDetector) -> None:
    frames, _ = read_frames(clips["left_speaks"], 0.0, SECONDS)
    tracks = track_faces(detector.detect(frames))
    assert len(tracks) == 2 and all(len(t) == len(frames) for t in tracks)
    speaking, listening = (mouth_motion(to_grey(frames), t) for t in tracks)  # ids run left to right
    assert np.median(speaking) > 2 * np.median(listening)
    assert np.percentile(speaking, 80) > SpeakerConfig().mouth_change_threshold > np.percentile(listening, 80)


@pytest.mark.parametrize("name, side", [("left_speaks", 0), ("right_speaks", 1)])
def test_the_speaking_face_is_chosen(clips: dict[str, Path], setting: tuple[FaceConfig, FaceDetector], name: str,
                                     side: int) -> None:
    face_cfg, detector = setting
    result = whole_clip(clips[name], detector, face_cfg)
    assert result.reason_if_dropped is None and result.track_id is not None
    centre_x = (result.boxes[:, 0] + result.boxes[:, 2]) / 2
    assert np.all((centre_x > SPEAKER_SPLIT_X) == bool(side))
    others = [s for tid, s in result.scores.items() if tid != result.track_id]
    assert result.score == result.scores[result.track_id] > 0.3 and max(others) < result.score / 3
    assert result.crops.shape == (30, 64, 64) and result.crops.dtype == np.uint8  # 3 s at 10 fps, under 36
    assert np.all(np.diff(result.times) > 0)


def test_at_most_max_frames_evenly_spread(clips: dict[str, Path], detector: FaceDetector) -> None:
    result = whole_clip(clips["left_speaks"], detector, FaceConfig(max_frames=12))
    assert result.crops.shape == (12, 64, 64) and np.all(np.diff(result.times) > 0)
    assert result.times[0] == pytest.approx(0.0) and result.times[-1] > SECONDS - 0.2


def test_silence_means_no_active_speaker(clips: dict[str, Path], detector: FaceDetector) -> None:
    result = whole_clip(clips["silent"], detector)
    assert result.reason_if_dropped == "no_active_speaker" and result.track_id is None and len(result.crops) == 0
    assert result.scores and all(s == 0 for s in result.scores.values())
    kept = whole_clip(clips["silent"], detector, speaker_cfg=SpeakerConfig(drop_without_speaker=False))
    assert kept.reason_if_dropped is None and len(kept.crops) == 30  # falls back to the main face


def test_a_clip_without_faces_is_dropped(clips: dict[str, Path], detector: FaceDetector) -> None:
    result = whole_clip(clips["no_face"], detector)
    assert result.reason_if_dropped == "no_face" and len(result.crops) == 0


def test_a_main_face_in_under_20pct_of_frames_is_dropped(clips: dict[str, Path], detector: FaceDetector) -> None:
    result = whole_clip(clips["brief_face"], detector)
    assert result.reason_if_dropped == "main_face_under_20pct"
    lenient = whole_clip(clips["brief_face"], detector, FaceConfig(min_track_fraction=0.1))
    assert lenient.reason_if_dropped != "main_face_under_20pct"


def test_the_synthetic_corpus_speaker_is_chosen(synth_corpus: Path, setting: tuple[FaceConfig, FaceDetector]) -> None:
    # The first two kept cues of every movie (both people, both sides, every subtitle format's video),
    # each cut to its first 2 s to keep the test short.
    cues = []
    for truth_file in sorted((synth_corpus / "ground_truth" / "movies").glob("*.json")):
        truth = json.loads(truth_file.read_text())
        video = synth_corpus / truth["video"]
        cues += [(video, cue) for cue in truth["cues"] if cue["kept"]][:2]
    audio = {video: clip_audio(video) for video in {v for v, _ in cues}}
    kept = correct = 0
    for video, cue in cues:
        start, end = cue["start"], min(cue["end"], cue["start"] + 2.0)
        wave = audio[video][int(start * SAMPLE_RATE) : int(end * SAMPLE_RATE)]
        result = speaker_face_crops(video, start, end, wave, setting[0], SpeakerConfig(), setting[1])
        if result.reason_if_dropped is not None:
            continue
        kept += 1
        x1, y1, x2, y2 = cue["speaker_box"]
        cx, cy = (result.boxes[:, 0] + result.boxes[:, 2]) / 2, (result.boxes[:, 1] + result.boxes[:, 3]) / 2
        correct += bool(np.all((x1 < cx) & (cx < x2) & (y1 < cy) & (cy < y2)))
    assert len(cues) >= 10 and kept >= 0.8 * len(cues)
    assert correct >= 0.9 * kept


def test_detection_is_batched_across_cues_with_the_same_result(clips: dict[str, Path], detector: FaceDetector) -> None:
    video = clips["left_speaks"]
    audio = clip_audio(video)
    spans = [(0.0, 1.2), (1.0, 2.0), (1.5, 3.0)]
    waves = [audio[int(a * SAMPLE_RATE) : int(b * SAMPLE_RATE)] for a, b in spans]
    calls: list[int] = []

    class Counting:  # the real detector, with its calls counted
        name, device = detector.name, detector.device

        def detect(self, frames: np.ndarray) -> list:
            calls.append(len(frames))
            return detector.detect(frames)

    batched = speaker_face_crops_batch(video, spans, waves, FaceConfig(), SpeakerConfig(), Counting())
    assert len(calls) == 1  # 37 frames of three cues, under batch_frames
    one_by_one = [speaker_face_crops(video, a, b, w, FaceConfig(), SpeakerConfig(), Counting())
                  for (a, b), w in zip(spans, waves)]
    assert len(calls) == 4 and calls[0] == sum(calls[1:])
    small = speaker_face_crops_batch(video, spans, waves, FaceConfig(batch_frames=12), SpeakerConfig(), Counting())
    assert len(calls) == 7  # one group per cue when each fills the frame budget
    for together, alone, grouped in zip(batched, one_by_one, small):
        assert together.track_id == alone.track_id == grouped.track_id == 0
        np.testing.assert_allclose(together.boxes, alone.boxes, atol=1e-3)
        np.testing.assert_allclose(together.times, alone.times)
        np.testing.assert_array_equal(together.crops, grouped.crops)
