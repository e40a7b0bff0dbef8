"""`memobert preprocess`: videos or a labeled corpus -> WebDataset shards, on a Ray cluster.

One Ray task per unit (a video, or the utterances of one labeled recording/dialog) decodes,
segments, tracks faces and picks the active speaker on a CPU, then sends each chunk of
utterances to the actor pools that hold wav2vec2 and DenseNet-FER+ (a GPU each when the cluster
has GPUs). Only waveforms, 64x64 crops and features cross process boundaries, never frames.
The driver writes each finished unit atomically (preprocessing/shards.py), so a rerun skips what
is done and a killed run ends, after a rerun, with exactly the samples of an uninterrupted one.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from memobert.config import to_dict
from memobert.schema import Manifest, Utterance
from preprocessing.config import PreprocessConfig, RayConfig
from preprocessing.segments import Segment, sanitize_key, segments_from_video
from preprocessing.shards import ShardOutput

log = logging.getLogger(__name__)

VIDEO_SUFFIXES = (".mp4", ".mkv", ".avi", ".mov", ".webm", ".m4v")
SAMPLE_RATE = 16_000
CHUNK = 32  # utterances per encoder call: large enough to batch, small enough to bound memory
ACTOR_RESTARTS = 3  # an encoder actor killed by its node (OOM, preemption) is rebuilt and its calls rerun


@dataclass
class Unit:
    """What one task processes and the shard output records as done: a video or one labeled source."""

    name: str  # unique and stable: the source's relative path, sanitised
    video: str | None
    segments: list[Segment] | None  # None: segment the video from its subtitles inside the task


def discover_units(source: Path, cfg: PreprocessConfig) -> tuple[list[Unit], Counter]:
    """A folder of videos (with subtitles) or a labeled corpus (IEMOCAP, MSP-IMPROV, CSV manifest)."""
    from preprocessing.adapters import NotACorpusError, load_labeled

    source = Path(source)
    try:
        segments, dropped = load_labeled(source)
    except NotACorpusError:  # only then: an error inside a recognised corpus must not turn it into plain videos
        if not source.is_dir():
            raise
        videos = sorted(p for p in source.rglob("*") if p.suffix.lower() in VIDEO_SUFFIXES)
        if not videos:
            raise FileNotFoundError(f"{source}: no videos ({', '.join(VIDEO_SUFFIXES)}) and no labeled corpus layout")
        units = [Unit(sanitize_key(str(v.relative_to(source).with_suffix(""))), str(v), None) for v in videos]
        _check_unique(units, [str(v) for v in videos], source)
        return units, Counter()
    by_source: dict[str, list[Segment]] = {}
    for seg in segments:
        by_source.setdefault(seg.video or seg.audio_path or seg.key, []).append(seg)
    root = source if source.is_dir() else source.parent
    units, media = [], []
    for path, segs in sorted(by_source.items()):
        rel = Path(path).relative_to(root) if Path(path).is_relative_to(root) else Path(Path(path).name)
        units.append(Unit(sanitize_key(str(rel.with_suffix(""))), segs[0].video, segs))
        media.append(path)
    _check_unique(units, media, source)
    return units, dropped


def _check_unique(units: list[Unit], media: list[str], source: Path) -> None:
    """Fail before any work when two media files get one unit name: the second's part file would replace the first's."""
    seen: dict[str, str] = {}
    for unit, path in zip(units, media):
        if unit.name in seen:
            raise ValueError(f"{source}: {seen[unit.name]} and {path} both get the unit name {unit.name!r} (their path "
                             "without suffix, every character but A-Z a-z 0-9 _ - made '_'): rename one of them")
        seen[unit.name] = path


def process_unit(unit: Unit, root: str, cfg: PreprocessConfig, audio_actor: Any,
                 visual_actor: Any) -> tuple[list[Utterance], dict[str, int], str]:
    """Decode, segment, pick faces, then encode through the actors: the unit's utterances, drop counts and the
    id of the Ray node that ran it (the log names it: which node did what when a node misbehaves)."""
    import ray
    import torch

    from preprocessing.detectors import build_detector
    from preprocessing.faces import open_video
    from preprocessing.speaker import speaker_face_crops_batch
    from preprocessing.text import TextTokenizer

    torch.set_num_threads(1)  # Ray runs one task per core: threads inside would fight for them
    dropped: Counter = Counter()
    segments = unit.segments
    if segments is None:
        segments = segments_from_video(Path(unit.video), cfg.segment, video_id=unit.name, counts=dropped)
        if not segments:
            raise ValueError(f"{unit.video}: no usable subtitle cue ({_describe(dropped) or 'no subtitles'})")
    tokenizer = TextTokenizer(cfg.text.vocab, cfg.text.max_tokens)
    detector = build_detector(cfg.face)  # on the GPU when Ray gave this task a share of one
    reader = open_video(unit.video) if unit.video else None
    audio_track = _AudioTrack(unit.video) if unit.video and any(s.audio_path is None for s in segments) else None

    utterances: list[Utterance] = []
    for lo in range(0, len(segments), CHUNK):
        chunk = segments[lo : lo + CHUNK]
        waves = [_read_audio(seg, audio_track, cfg.segment.max_seconds) for seg in chunk]
        found: list[Any] = [None] * len(chunk)
        if reader is not None:  # detection batched across the chunk's cues
            spans = [(seg.start, min(seg.end, seg.start + cfg.segment.max_seconds)) for seg in chunk]
            found = speaker_face_crops_batch(reader, spans, waves, cfg.face, cfg.speaker, detector)
        prepared = []
        for seg, wave, faces in zip(chunk, waves, found):
            if faces is not None and faces.reason_if_dropped:
                dropped[f"visual:{faces.reason_if_dropped}"] += 1
                if cfg.shards.drops_faceless(labeled=unit.segments is not None):
                    continue
            prepared.append((seg, wave, faces))
        if not prepared:
            continue
        audio_ref = audio_actor.encode.remote([wave for _, wave, _ in prepared])
        crops = [f.crops if f is not None else np.zeros((0, cfg.face.crop_size, cfg.face.crop_size), np.uint8) for _, _, f in prepared]
        visual_ref = visual_actor.encode.remote(crops)
        audio_feats, (visual_feats, vprobs) = ray.get([audio_ref, visual_ref])
        for (seg, _, faces), audio, visual, vprob in zip(prepared, audio_feats, visual_feats, vprobs):
            tokens, words = tokenizer.encode(seg.text)
            utterances.append(Utterance(key=seg.key, meta=_meta(seg, faces, root), tokens=tokens, words=words,
                                        audio=audio, visual=visual, vprob=vprob))
    if not utterances:
        raise ValueError(f"{unit.video or unit.name}: no utterance kept ({_describe(dropped)})")
    return utterances, dict(dropped), ray.get_runtime_context().get_node_id()


class _AudioTrack:
    """A video's audio track at 16 kHz mono, decoded once."""

    def __init__(self, video: str) -> None:
        from preprocessing.audio_encoder import load_audio

        self.samples = load_audio(video, SAMPLE_RATE)

    def cut(self, start: float, end: float) -> np.ndarray:
        return self.samples[int(start * SAMPLE_RATE) : int(end * SAMPLE_RATE)]


def _read_audio(seg: Segment, track: _AudioTrack | None, max_seconds: float) -> np.ndarray:
    from preprocessing.audio_encoder import load_audio

    end = min(seg.end, seg.start + max_seconds)  # the recipe clips audio at 10 s
    if seg.audio_path is None:
        return track.cut(seg.start, end)
    wave = load_audio(seg.audio_path, SAMPLE_RATE)
    # A labeled segment with its own file holds exactly the utterance; start/end index into it otherwise.
    offset = 0.0 if seg.video else seg.start
    return wave[int(offset * SAMPLE_RATE) : int((offset + end - seg.start) * SAMPLE_RATE)]


def _meta(seg: Segment, faces: Any, root: str) -> dict[str, Any]:
    meta: dict[str, Any] = {
        "id": seg.key,
        "video": _relative(seg.video, root),
        "start": round(seg.start, 3),
        "end": round(seg.end, 3),
        "text": seg.text,
        "speaker_track": None if faces is None else faces.track_id,
        "speaker_score": None if faces is None else round(float(faces.score), 4),
    }
    if seg.label is not None:
        meta.update(label=seg.label, speaker=seg.speaker, session=seg.session)
    return meta


def _relative(path: str | None, root: str) -> str | None:
    if path is None:
        return None
    return str(Path(path).relative_to(root)) if Path(path).is_relative_to(root) else path


def _describe(counts: Counter) -> str:
    return ", ".join(f"{k}={v}" for k, v in sorted(counts.items()))


class AudioEncoderActor:
    """Holds one wav2vec2 encoder for the pool."""

    def __init__(self, cfg: PreprocessConfig) -> None:
        import torch

        from preprocessing.audio_encoder import Wav2Vec2Encoder

        torch.set_num_threads(1)
        self.encoder = Wav2Vec2Encoder(cfg.audio, seed=cfg.seed)

    def describe(self) -> dict[str, Any]:
        return {"name": self.encoder.name, "weights": self.encoder.cfg.weights, "sha256": self.encoder.weights_sha256,
                "dim": self.encoder.dim}

    def encode(self, waves: list[np.ndarray]) -> list[np.ndarray]:
        return self.encoder.encode(waves)


class VisualEncoderActor:
    """Holds one DenseNet-FER+ encoder for the pool."""

    def __init__(self, cfg: PreprocessConfig) -> None:
        import torch

        from preprocessing.fer import fer_encoder_from_config

        torch.set_num_threads(1)
        self.weights = cfg.visual.weights
        self.encoder = fer_encoder_from_config(cfg.visual, seed=cfg.seed)

    def describe(self) -> dict[str, Any]:
        return {"name": self.encoder.name, "weights": self.weights, "sha256": self.encoder.weights_sha256,
                "dim": self.encoder.feature_dim}

    def encode(self, crops: list[np.ndarray]) -> tuple[list[np.ndarray], list[np.ndarray]]:
        """Per utterance crops [T, 64, 64] -> per utterance (float16 features [T, F], float16 FER+ softmax [T, 8])."""
        lengths = [len(c) for c in crops]
        feats, probs = self.encoder.features_and_probs(np.concatenate(crops) if sum(lengths) else crops[0])
        cuts = np.cumsum(lengths)[:-1]
        return ([f.astype(np.float16) for f in np.split(feats, cuts)], [p.astype(np.float16) for p in np.split(probs, cuts)])


def preprocess(source: Path, out: Path, cfg: PreprocessConfig, ray_address: str | None = None) -> Manifest:
    """Process every unit of `source` not yet done in `out`, then pack shards and write the manifest."""
    import ray
    from tqdm import tqdm

    source, out = Path(source), Path(out)
    units, corpus_dropped = discover_units(source, cfg)
    output = ShardOutput(out)
    done = output.finished_units()
    todo = [u for u in units if u.name not in done]
    log.info("%d units in %s: %d already done, %d to process", len(units), source, len(units) - len(todo), len(todo))

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    own_cluster = not ray.is_initialized()
    if own_cluster:
        ray.init(address=ray_address, num_cpus=None if ray_address else cfg.ray.num_cpus,
                 include_dashboard=False, log_to_driver=True, logging_level=logging.WARNING)
    gpus, cpus = ray.cluster_resources().get("GPU", 0), ray.cluster_resources().get("CPU", 1)
    task_options = detection_task_options(gpus, cpus, cfg)
    reserved = cfg.ray.detection_gpu_share if "num_gpus" in task_options else 0.0
    actor_options = encoder_actor_options(gpus, cfg.ray, reserved)
    audio_pool = [ray.remote(AudioEncoderActor).options(**actor_options).remote(cfg) for _ in range(cfg.ray.audio_actors)]
    visual_pool = [ray.remote(VisualEncoderActor).options(**actor_options).remote(cfg) for _ in range(cfg.ray.visual_actors)]
    task = ray.remote(process_unit).options(**task_options, max_retries=0)
    root = str(source if source.is_dir() else source.parent)

    pending: dict[Any, Unit] = {}
    queue = list(todo)
    # One task in flight per CPU. A task waiting on the encoder actors frees its CPU, and a queued task
    # would then make Ray start a fresh worker process (~5 CPU-s to import torch, onnxruntime...) that it
    # kills again when idle: with short units that churn cost more than the units (docs/benchmarks.md).
    window = max(1, int(ray.cluster_resources().get("CPU", 1)))
    progress = tqdm(total=len(units), initial=len(units) - len(todo), unit="unit", desc="preprocess", dynamic_ncols=True)
    written, start = 0, time.perf_counter()
    retry_later: list[str] = []  # units hit by a Ray failure: left unrecorded, so a rerun processes them
    while queue or pending:
        while queue and len(pending) < window:
            unit = queue.pop(0)
            i = len(units) - len(queue)
            ref = task.remote(unit, root, cfg, audio_pool[i % len(audio_pool)], visual_pool[i % len(visual_pool)])
            pending[ref] = unit
        (ref,), _ = ray.wait(list(pending), num_returns=1)
        unit = pending.pop(ref)
        try:
            utterances, dropped, node = ray.get(ref)
        except Exception as err:  # one bad unit is recorded and skipped (a Ray failure is not the unit's); the run goes on
            reason = _reason(err, unit)
            if is_ray_system_error(err):
                retry_later.append(unit.name)
                log.error("Ray failed on %s, not recorded (a rerun retries it): %s", unit.name, reason)
            else:
                output.fail_unit(unit.name, reason)
                log.warning("failed %s: %s", unit.name, reason)
        else:
            output.write_unit(unit.name, utterances, dropped)
            written += len(utterances)
            log.info("%s: %d utterances from Ray node %s", unit.name, len(utterances), node)
        progress.update(1)
        progress.set_postfix(utt_per_s=f"{written / (time.perf_counter() - start):.2f}", refresh=False)
    progress.close()
    if retry_later:  # no manifest: the output is incomplete until a rerun has processed these units
        if own_cluster:
            ray.shutdown()
        shown = ", ".join(retry_later[:10]) + (" ..." if len(retry_later) > 10 else "")
        raise RuntimeError(f"{len(retry_later)} unit(s) hit a Ray failure (dead actor, worker or node; lost object) and "
                           f"were not recorded: {shown}. Rerun the same command to process them; finished units are kept.")

    audio_info, visual_info = ray.get([audio_pool[0].describe.remote(), visual_pool[0].describe.remote()])
    # Pretraining draws batches from shards, so its clips are spread over all shards; labeled corpora
    # are read whole by finetuning and keep their unit order.
    labeled = any(unit.segments is not None for unit in units)
    manifest = output.finalize(
        max_bytes=cfg.shards.max_bytes,
        max_count=cfg.shards.max_count,
        dims={"audio": audio_info["dim"], "visual": visual_info["dim"], "vprob": 8},
        extractors={"audio": audio_info, "visual": visual_info, "text": _text_info(cfg), "faces": _face_info(cfg)},
        settings={"config": to_dict(cfg), "source": str(source), "corpus_dropped": dict(corpus_dropped),
                  "units": {name: r.__dict__ for name, r in sorted(output.finished_units().items())}},
        shuffle_seed=None if labeled else cfg.seed,
    )
    if own_cluster:
        ray.shutdown()
    log.info("%d samples in %d shards under %s", manifest.num_samples, len(manifest.shards), out)
    return manifest


def encoder_actor_options(gpus: float, cfg: RayConfig, reserved: float = 0.0) -> dict[str, Any]:
    """Ray options of each encoder actor: all actors fit at once, sharing a GPU when there are fewer GPUs than
    actors, in the share of each GPU left after `reserved` (the unit tasks' face detection)."""
    restarts = {"max_restarts": ACTOR_RESTARTS, "max_task_retries": ACTOR_RESTARTS}  # encode calls are pure: safe to rerun
    if gpus < 1:
        return {"num_cpus": cfg.cpus_per_actor, **restarts}
    # Ray puts a fractional actor on a single GPU, so give each GPU a whole number of equal shares (an even
    # split like 2 GPUs / 3 actors = 0.67 would fit one actor per GPU and leave the third waiting forever).
    per_gpu = math.ceil((cfg.audio_actors + cfg.visual_actors) / int(gpus))
    return {"num_gpus": _grain((1.0 - reserved) / per_gpu), "num_cpus": 1, **restarts}


def detection_task_options(gpus: float, cpus: float, cfg: PreprocessConfig) -> dict[str, Any]:
    """Ray options of each unit task: one CPU, plus an equal part of `ray.detection_gpu_share` of the cluster's
    GPUs when it has any and the face detector can run on one (Ray hides GPUs from tasks that ask for none,
    so this share is what lets `face.device: auto` find a GPU inside the task)."""
    from preprocessing.detectors import detector_can_use_gpu

    if gpus < 1 or cfg.face.device == "cpu" or cfg.ray.detection_gpu_share == 0 or not detector_can_use_gpu(cfg.face):
        return {"num_cpus": 1}
    tasks_per_gpu = math.ceil(cpus / int(gpus))
    return {"num_cpus": 1, "num_gpus": _grain(cfg.ray.detection_gpu_share / tasks_per_gpu)}


def _grain(share: float) -> float:
    """A GPU share rounded down to Ray's resource grain (1e-4), never to zero."""
    return max(math.floor(share * 10_000), 1) / 10_000


def is_ray_system_error(err: BaseException) -> bool:
    """Whether Ray itself failed (dead actor, worker or node, lost object, full store), not the unit's data."""
    import ray.exceptions as rex

    system = (rex.RayActorError, rex.WorkerCrashedError, rex.NodeDiedError, rex.LocalRayletDiedError, rex.ObjectLostError,
              rex.ObjectStoreFullError, rex.OutOfDiskError, rex.OutOfMemoryError, rex.RaySystemError)
    if isinstance(err, system):
        return True
    # A task that called a dead actor fails with the actor's error as its cause, possibly nested.
    cause = getattr(err, "cause", None) if isinstance(err, rex.RayTaskError) else None
    return cause is not None and cause is not err and is_ray_system_error(cause)


def _face_info(cfg: PreprocessConfig) -> dict[str, Any]:
    from preprocessing.detectors import CenterFaceDetector, MtcnnDetector

    name = {"centerface": CenterFaceDetector.name, "mtcnn": MtcnnDetector.name}[cfg.face.detector]
    return {"name": name, "detect_every": cfg.face.detect_every}


def _text_info(cfg: PreprocessConfig) -> dict[str, Any]:
    from preprocessing.text import default_vocab_folder

    return {"name": "wordpiece/bert-base-uncased", "vocab": str(Path(cfg.text.vocab or default_vocab_folder()).resolve()),
            "max_tokens": cfg.text.max_tokens}


def _reason(err: BaseException, unit: Unit) -> str:
    """One line for the failures file that names the unit's file and what was wrong with it."""
    cause = getattr(err, "cause", None) or err  # Ray wraps task errors
    reason = f"{type(cause).__name__}: {cause}".splitlines()[0][:500]
    source = unit.video or unit.name
    return reason if Path(source).name in reason else f"{source}: {reason}"
