"""Scenes: faces on a background, speech on the soundtrack, mouths that follow it; encoded with ffmpeg.

Frames are rgb24 piped to the ffmpeg binary shipped by imageio-ffmpeg; the audio comes from a temp
wav. Every flag that could make output differ between runs is pinned (one thread, bitexact, no
metadata), so the same seed gives byte-identical files.
"""

from __future__ import annotations

import functools
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import cv2
import numpy as np

from .audio import SR, Voice, mouth_levels, room_noise, speech, write_wav
from .common import EMOTIONS
from .faces import N_LEVELS, Face, Identity, build_face, expression_sprites

JITTER = 1  # head jitter in pixels
BITEXACT = ["-fflags", "+bitexact", "-flags:v", "+bitexact", "-flags:a", "+bitexact",
            "-map_metadata", "-1", "-map_chapters", "-1"]


@dataclass(frozen=True)
class Encoding:
    """Codec arguments for one container style."""

    video: tuple[str, ...]
    audio: tuple[str, ...]


def h264(fps: int) -> tuple[str, ...]:
    """x264 with fixed parameters and one thread (the default thread count follows the machine's cores,
    and the bitstream follows the thread count)."""
    return ("-c:v", "libx264", "-preset", "veryfast", "-crf", "23", "-g", str(2 * fps), "-pix_fmt", "yuv420p",
            "-x264-params", "threads=1:lookahead-threads=1", "-threads", "1")


def movie_encoding(fps: int) -> Encoding:
    """H.264 + AAC 44.1 kHz stereo in MP4, like a ripped film."""
    return Encoding(h264(fps), ("-c:a", "aac", "-b:a", "96k", "-ar", "44100", "-ac", "2"))


def divx_encoding(fps: int) -> Encoding:
    """MPEG-4 Part 2 (DivX) + 16 kHz PCM in AVI, like IEMOCAP's dialog videos."""
    return Encoding(("-c:v", "mpeg4", "-vtag", "DX50", "-q:v", "4", "-g", str(2 * fps), "-pix_fmt", "yuv420p",
                     "-threads", "1"), ("-c:a", "pcm_s16le", "-ar", "16000", "-ac", "1"))


def avi_h264_encoding(fps: int) -> Encoding:
    """H.264 + 16 kHz PCM in AVI (MSP-IMPROV's recordings)."""
    return Encoding(h264(fps), ("-c:a", "pcm_s16le", "-ar", "16000", "-ac", "1"))


@dataclass
class Actor:
    """A face placed in the frame, with its voice and pre-rendered expression/mouth sprites."""

    identity: Identity
    voice: Voice
    face: Face
    sprites: np.ndarray  # (len(EMOTIONS), N_LEVELS, H, W, 3)
    position: tuple[int, int]  # top-left corner in the frame (before jitter)

    def box(self) -> list[int]:
        return _shift(self.face.box, self.position)

    def mouth_box(self) -> list[int]:
        return _shift(self.face.mouth_box(), self.position)

    def to_dict(self) -> dict:
        return {"identity": self.identity.to_dict(), "voice": self.voice.to_dict(),
                "box": self.box(), "mouth_box": self.mouth_box()}


def _shift(box: np.ndarray, position: tuple[int, int]) -> list[int]:
    x, y = position
    return [int(box[0] + x), int(box[1] + y), int(box[2] + x), int(box[3] + y)]


def cast(people: list[tuple[Identity, Voice]], width: int, height: int) -> list[Actor]:
    """Place one face centred or two side by side, sized to the frame."""
    face_height = int(round(height * (0.5 if len(people) == 1 else 0.4)))
    actors = []
    for i, (identity, voice) in enumerate(people):
        face, sprites = _sprites(identity, face_height)
        h, w = face.image.shape[:2]
        cx = width * (0.5 if len(people) == 1 else (0.27, 0.73)[i])
        x = int(np.clip(round(cx - w / 2), JITTER, width - w - JITTER))
        y = int(np.clip(round(height * 0.52 - h / 2), JITTER, height - h - JITTER))
        actors.append(Actor(identity, voice, face, sprites, (x, y)))
    return actors


@functools.lru_cache(maxsize=32)
def _sprites(identity: Identity, face_height: int) -> tuple[Face, np.ndarray]:
    """A person's face and sprites (cached: MSP-IMPROV and IEMOCAP reuse each actor many times)."""
    face = build_face(identity, face_height)
    sprites = expression_sprites(face, EMOTIONS)
    sprites.flags.writeable = False
    return face, sprites


@dataclass
class Utterance:
    """One cue or turn: who speaks, the class, and what each modality shows."""

    start: float
    end: float
    speaker: int | None  # index into the actors; None: nobody speaks (e.g. an empty subtitle cue)
    emotion: str  # the class the evidence is drawn around
    text_class: str
    audio_class: str
    face_class: str
    listener_class: str | None  # expression of the silent face(s); None: neutral
    speech: tuple[float, float] | None  # voiced span inside [start, end]

    def to_dict(self) -> dict:
        return {"start": self.start, "end": self.end, "speaker": self.speaker, "emotion": self.emotion,
                "text_class": self.text_class, "audio_class": self.audio_class, "face_class": self.face_class,
                "listener_class": self.listener_class,
                "speech": [round(s, 4) for s in self.speech] if self.speech else None}



def background(rng: np.random.Generator, width: int, height: int) -> np.ndarray:
    """A plain room: a wall gradient, a floor band and a few flat rectangles (windows, pictures)."""
    top, bottom = rng.uniform(60, 200, size=(2, 3))
    ramp = np.linspace(0, 1, height)[:, None, None]
    image = np.broadcast_to(top * (1 - ramp) + bottom * ramp, (height, width, 3)).copy()
    image[int(height * 0.8):] = rng.uniform(40, 120, size=3)
    for _ in range(int(rng.integers(2, 5))):
        w, h = int(rng.integers(width // 8, width // 3)), int(rng.integers(height // 8, height // 3))
        x, y = int(rng.integers(0, width - w)), int(rng.integers(0, int(height * 0.7) - h))
        image[y:y + h, x:x + w] = rng.uniform(50, 230, size=3)
    return np.clip(image + 0.5, 0, 255).astype(np.uint8)


def render(path: Path, actors: list[Actor], utterances: list[Utterance], backdrop: np.ndarray, fps: int,
           duration: float, rng: np.random.Generator, encoding: Encoding,
           subtitles: Path | None = None) -> np.ndarray:
    """Synthesize the soundtrack, animate the faces, encode to `path`; returns the 16 kHz mono track."""
    frames = int(round(duration * fps))
    track = room_noise(rng, int(round(duration * SR)))
    neutral = EMOTIONS.index("neutral")
    expression = np.full((len(actors), frames), neutral)
    opening = np.zeros((len(actors), frames), np.int64)
    for u in utterances:
        span = slice(int(np.ceil(u.start * fps)), int(np.ceil(u.end * fps)))
        if u.listener_class is not None:
            expression[:, span] = EMOTIONS.index(u.listener_class)
        if u.speaker is None or u.speech is None:
            continue
        expression[u.speaker, span] = EMOTIONS.index(u.face_class)
        voice = speech(rng, u.speech[1] - u.speech[0], actors[u.speaker].voice, u.audio_class)
        first = int(round(u.speech[0] * SR))
        voice = voice[: len(track) - first]
        track[first:first + len(voice)] += voice
        lo, levels = mouth_levels(voice, u.speech[0], fps, N_LEVELS)
        hi = min(frames, lo + len(levels))
        opening[u.speaker, lo:hi] = np.maximum(opening[u.speaker, lo:hi], levels[: hi - lo])
    offsets = _jitter(rng, len(actors), frames)

    masks = [actor.face.mask.view(np.uint8) for actor in actors]

    def stream() -> Iterator[np.ndarray]:
        for i in range(frames):
            frame = backdrop.copy()
            for a, actor in enumerate(actors):
                sprite = actor.sprites[expression[a, i], opening[a, i]]
                h, w = sprite.shape[:2]
                x, y = actor.position[0] + offsets[a, i, 0], actor.position[1] + offsets[a, i, 1]
                cv2.copyTo(sprite, masks[a], frame[y:y + h, x:x + w])  # in place, through the view
            yield frame

    encode(path, stream(), backdrop.shape[1], backdrop.shape[0], fps, track, encoding, subtitles)
    return track


def _jitter(rng: np.random.Generator, actors: int, frames: int) -> np.ndarray:
    """Small head movements: a random offset held for a few frames at a time."""
    out = np.zeros((actors, frames, 2), np.int64)
    for a in range(actors):
        i = 0
        while i < frames:
            hold = int(rng.integers(10, 30))
            out[a, i:i + hold] = rng.integers(-JITTER, JITTER + 1, size=2)
            i += hold
    return out


def encode(path: Path, frames: Iterator[np.ndarray], width: int, height: int, fps: int, audio: np.ndarray,
           encoding: Encoding, subtitles: Path | None = None) -> None:
    """Pipe rgb24 frames and a temp wav through ffmpeg into `path` (optionally muxing mov_text subtitles)."""
    import imageio_ffmpeg

    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="synth_") as tmp:
        wav = Path(tmp) / "audio.wav"
        write_wav(wav, audio)
        cmd = [imageio_ffmpeg.get_ffmpeg_exe(), "-y", "-v", "error", "-filter_threads", "1",
               "-f", "rawvideo", "-pix_fmt", "rgb24", "-s", f"{width}x{height}", "-r", str(fps),
               "-threads", "1", "-i", "pipe:0", "-i", str(wav)]
        maps = ["-map", "0:v:0", "-map", "1:a:0"]
        if subtitles is not None:
            cmd += ["-i", str(subtitles)]
            maps += ["-map", "2:s:0", "-c:s", "mov_text", "-metadata:s:s:0", "language=eng"]
        cmd += maps + list(encoding.video) + list(encoding.audio) + BITEXACT + [str(path)]
        log = Path(tmp) / "ffmpeg.log"
        with open(log, "wb") as err:
            proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stderr=err)
            try:
                for frame in frames:
                    proc.stdin.write(np.ascontiguousarray(frame).data)
                proc.stdin.close()
            except BrokenPipeError:
                pass  # ffmpeg died; its log says why
            code = proc.wait()
        if code != 0:
            raise RuntimeError(f"ffmpeg failed ({code}) writing {path}: {log.read_text()[-2000:]}")
