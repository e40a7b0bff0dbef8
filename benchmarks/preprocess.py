"""Preprocessing benchmark: `memobert preprocess` on a local Ray vs decoding alone, 1 vs 2 Ray CPUs, real encoders on CPU.

On the same videos (by default the movies of `memobert synth --scale tiny` for `--seeds`; seed 0 alone is
7 short 320x240 clips, 25 kept cues; `--seeds 0,1,2,3,4,5,6,7` gives 56), in one run:
  decode     in this process, one thread: subtitles -> segments, the audio track at 16 kHz, decord
             frames at 10 fps of every kept cue; no detection, no encoding
  stages     in this process, one thread: the work of one pipeline task (preprocessing.pipeline.process_unit)
             without Ray, timed per stage (frames, shot cuts, face detection, tracking, active speaker,
             crops, encoders, text)
  ray N      preprocessing.pipeline.preprocess with the tiny encoders (configs/preprocess/tiny_cpu.yaml) on a
             local Ray started with num_cpus=N: a cold pass (fresh worker processes import torch, onnxruntime...)
             then a second pass on the same cluster into a fresh output folder (task workers reused,
             encoder actors rebuilt)
  encoders   benchmarks/encoders.py's audio_rate and visual_rate: real-size wav2vec2-base and DenseNet-FER+,
             float32, random weights, all torch threads
CPU seconds of a Ray pass are those of this process and every descendant (Ray's daemons, task workers,
encoder actors), sampled every 0.5 s; the machine-wide busy CPU time over the same interval is printed
beside them: more than the process tree means other jobs shared the cores. "Per core" figures are
utterances per CPU-second. Config overrides (e.g. face.detector=mtcnn face.detect_every=1) apply to all.

    PYTHONPATH=. .venv/bin/python benchmarks/preprocess.py [--input MOVIES_DIR] [--seeds 0] [--movies N] [--cpus 2,1] [KEY=VALUE ...]
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import logging
import os
import platform
import tempfile
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import psutil

os.environ.setdefault("TQDM_DISABLE", "1")  # the pipeline's progress bar
os.environ.setdefault("RAY_AUTH_MODE", "disabled")

from memobert.config import load_config  # noqa: E402
from preprocessing import faces as faces_mod  # noqa: E402
from preprocessing import speaker as speaker_mod  # noqa: E402
from preprocessing.config import PreprocessConfig  # noqa: E402
from preprocessing.detectors import build_detector  # noqa: E402
from preprocessing.pipeline import CHUNK, VIDEO_SUFFIXES, _AudioTrack, _read_audio, discover_units, preprocess  # noqa: E402
from preprocessing.segments import segments_from_video  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
TINY = ROOT / "configs" / "preprocess" / "tiny_cpu.yaml"


# ---------------------------------------------------------------- inputs


def prepare_movies(args: argparse.Namespace, tmp: Path) -> Path:
    """The movies folder to process: `--input`, or fresh synthetic corpora of `--seeds` linked into one
    folder; the first `--movies` videos."""
    if args.input:
        videos = sorted(p for p in Path(args.input).rglob("*") if p.suffix.lower() in VIDEO_SUFFIXES)
    else:
        from preprocessing.synth import generate_corpus
        from preprocessing.synth.config import SynthConfig

        videos = []
        for seed in [int(s) for s in args.seeds.split(",")]:
            summary = generate_corpus(tmp / f"synth{seed}", SynthConfig(seed=seed, scale=args.scale, parts=["movies"]))
            videos += sorted(p for p in summary.paths["movies"].iterdir() if p.suffix.lower() in VIDEO_SUFFIXES)
    if args.movies:
        videos = videos[: args.movies]
    folder = tmp / "movies"  # links to the videos and their sidecars; names prefixed by their corpus
    folder.mkdir()
    for video in videos:
        for path in video.parent.glob(video.stem + ".*"):
            (folder / f"{video.parent.parent.name}_{path.name}").symlink_to(path.resolve())
    return folder


# ---------------------------------------------------------------- CPU accounting


def machine_busy_seconds() -> float:
    """Busy CPU seconds of the whole machine since boot (all cores; idle and iowait excluded)."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    return (sum(fields) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")


def _role(proc: psutil.Process, root: int) -> str:
    if proc.pid == root:
        return "driver"
    cmd = " ".join(proc.cmdline())
    if "AudioEncoderActor" in cmd:
        return "audio actor"
    if "VisualEncoderActor" in cmd:
        return "visual actor"
    if cmd.startswith("ray::") or "ffmpeg" in cmd:
        return "task workers"
    return "ray daemons"


class TreeCPU:
    """CPU seconds of this process and its descendants over an interval, by role, polled every `period` s
    (a process that exits between polls loses at most one period)."""

    def __init__(self, period: float = 0.5) -> None:
        self.root = psutil.Process()
        self.period = period
        self.last: dict[tuple[int, float], tuple[str, float]] = {}

    def _poll(self) -> None:
        for proc in [self.root, *self.root.children(recursive=True)]:
            try:
                with proc.oneshot():
                    key = (proc.pid, proc.create_time())
                    role = self.last.get(key, (None,))[0]
                    if role is None or role in ("task workers", "ray daemons"):  # workers become actors
                        role = _role(proc, self.root.pid)
                    t = proc.cpu_times()
                    cpu = t.user + t.system
                    if role != "driver" and role != "ray daemons":  # a worker's waited subprocesses (ffmpeg)
                        cpu += t.children_user + t.children_system
                self.last[key] = (role, cpu)
            except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                continue

    @contextlib.contextmanager
    def measure(self) -> Iterator[dict[str, Any]]:
        """Yields a dict filled on exit: wall, cpu (tree total), roles {role: cpu}, started {role: processes},
        machine (busy CPU-s of the whole machine)."""
        self._poll()
        base = {k: cpu for k, (_, cpu) in self.last.items()}
        stop = threading.Event()

        def loop() -> None:
            while not stop.wait(self.period):
                self._poll()

        thread = threading.Thread(target=loop, daemon=True)
        result: dict[str, Any] = {}
        machine, wall = machine_busy_seconds(), time.perf_counter()
        thread.start()
        try:
            yield result
        finally:
            self._poll()  # before the caller shuts anything down
            stop.set()
            thread.join()
            result["wall"] = time.perf_counter() - wall
            result["machine"] = machine_busy_seconds() - machine
            roles: dict[str, float] = defaultdict(float)
            started: Counter = Counter()
            for key, (role, cpu) in self.last.items():
                roles[role] += cpu - base.get(key, 0.0)
                started[role] += key not in base
            result["roles"] = dict(roles)
            result["started"] = dict(started)  # processes started during the interval, by role
            result["cpu"] = sum(roles.values())


def cpu_now() -> float:
    """CPU seconds of this process and its finished subprocesses (ffmpeg extracting embedded subtitles)."""
    t = os.times()
    return time.process_time() + t.children_user + t.children_system


def checked(fn: Callable[[], Any]) -> tuple[Any, str]:
    """fn's result and how much CPU other processes used meanwhile (an in-process pass's contention check)."""
    machine, cpu, wall = machine_busy_seconds(), cpu_now(), time.perf_counter()
    result = fn()
    other = (machine_busy_seconds() - machine) - (cpu_now() - cpu)
    return result, f"other processes used {max(other, 0.0):.1f} CPU-s in {time.perf_counter() - wall:.0f} s"


# ---------------------------------------------------------------- in-process passes


class StageClock:
    """CPU seconds per named stage (one thread: CPU time is also the stage's wall time, without contention)."""

    def __init__(self) -> None:
        self.seconds: Counter = Counter()

    @contextlib.contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        start = cpu_now()
        try:
            yield
        finally:
            self.seconds[name] += cpu_now() - start

    def wrap(self, name: str, fn: Callable) -> Callable:
        def timed(*args: Any, **kwargs: Any) -> Any:
            with self(name):
                return fn(*args, **kwargs)

        return timed


@contextlib.contextmanager
def patched(target: Any, name: str, value: Any) -> Iterator[None]:
    old = getattr(target, name)
    setattr(target, name, value)
    try:
        yield
    finally:
        setattr(target, name, old)


def decode_only(source: Path, cfg: PreprocessConfig) -> tuple[int, float, float, Counter]:
    """(kept cues, CPU s, wall s, CPU s per step): segments, audio track, 10 fps frames of every kept cue."""
    units, _ = discover_units(source, cfg)
    clock = StageClock()
    kept, frames = 0, 0
    cpu, wall = cpu_now(), time.perf_counter()
    for unit in units:
        with clock("subtitles -> segments"):
            segments = segments_from_video(Path(unit.video), cfg.segment, video_id=unit.name)
        with clock("audio track (16 kHz)"):
            track = _AudioTrack(unit.video)
        with clock("frames (10 fps)"):
            reader = faces_mod.open_video(unit.video)
            for seg in segments:
                end = min(seg.end, seg.start + cfg.segment.max_seconds)
                _read_audio(seg, track, cfg.segment.max_seconds)
                frames += len(faces_mod.read_frames(reader, seg.start, end, cfg.face.fps)[0])
        kept += len(segments)
    cpu, wall = cpu_now() - cpu, time.perf_counter() - wall
    clock.seconds["frames decoded"] = frames
    return kept, cpu, wall, clock.seconds


def stage_breakdown(source: Path, cfg: PreprocessConfig) -> tuple[int, float, Counter]:
    """(utterances, CPU s, CPU s per stage) of process_unit's work in this process, one torch thread."""
    import torch

    from preprocessing.audio_encoder import Wav2Vec2Encoder
    from preprocessing.fer import fer_encoder_from_config
    from preprocessing.text import TextTokenizer

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in the pipeline's tasks and actors
    clock = StageClock()
    with clock("model construction (once)"):
        audio_encoder = Wav2Vec2Encoder(cfg.audio, seed=cfg.seed)
        visual_encoder = fer_encoder_from_config(cfg.visual, seed=cfg.seed)
        tokenizer = TextTokenizer(cfg.text.vocab, cfg.text.max_tokens)
    units, _ = discover_units(source, cfg)
    kept = 0
    patches = [
        (speaker_mod, "read_frames", clock.wrap("frames (10 fps)", speaker_mod.read_frames)),
        (speaker_mod, "plan_keyframes", clock.wrap("shot cuts, keyframes", speaker_mod.plan_keyframes)),
        (speaker_mod, "tracks_from_keyframes", clock.wrap("IoU tracking, filling", speaker_mod.tracks_from_keyframes)),
        (speaker_mod, "to_grey", clock.wrap("grey frames", speaker_mod.to_grey)),
        (speaker_mod.ActiveSpeakerSelector, "select",
         clock.wrap("active speaker (VAD, mouth motion)", speaker_mod.ActiveSpeakerSelector.select)),
        (speaker_mod, "aligned_crops", clock.wrap("aligned 64x64 crops", speaker_mod.aligned_crops)),
    ]
    start = cpu_now()
    with contextlib.ExitStack() as stack:
        for target, name, value in patches:
            stack.enter_context(patched(target, name, value))
        for unit in units:
            with clock("subtitles -> segments"):
                segments = segments_from_video(Path(unit.video), cfg.segment, video_id=unit.name)
            with clock("detector construction (per video)"):
                detector = build_detector(cfg.face)
                detector.detect = clock.wrap(f"face detection ({cfg.face.detector})", detector.detect)
            with clock("audio track (16 kHz)"):
                reader = faces_mod.open_video(unit.video)
                track = _AudioTrack(unit.video)
            for lo in range(0, len(segments), CHUNK):
                chunk = segments[lo : lo + CHUNK]
                waves = [_read_audio(seg, track, cfg.segment.max_seconds) for seg in chunk]
                spans = [(seg.start, min(seg.end, seg.start + cfg.segment.max_seconds)) for seg in chunk]
                results = speaker_mod.speaker_face_crops_batch(reader, spans, waves, cfg.face, cfg.speaker, detector)
                prepared = [(seg, wave, result) for seg, wave, result in zip(chunk, waves, results)
                            if not (result.reason_if_dropped and cfg.shards.drops_faceless(labeled=False))]
                if not prepared:
                    continue
                with clock("wav2vec2 tiny"):
                    audio_encoder.encode([w for _, w, _ in prepared])
                with clock("DenseNet-FER+ tiny"):
                    crops = [r.crops for _, _, r in prepared]
                    visual_encoder.features_and_probs(np.concatenate(crops))
                with clock("tokenizer"):
                    for seg, _, _ in prepared:
                        tokenizer.encode(seg.text)
                kept += len(prepared)
    total = cpu_now() - start
    torch.set_num_threads(threads)
    clock.seconds["other (clip rules, subsampling, loop)"] = total - sum(
        v for k, v in clock.seconds.items() if k != "model construction (once)")
    return kept, total, clock.seconds


# ---------------------------------------------------------------- Ray passes


def ray_passes(source: Path, cfg: PreprocessConfig, cpus: int, out: Path, meter: TreeCPU) -> list[tuple[str, int, dict]]:
    """Two `preprocess` runs on one local Ray of `cpus` CPUs, into fresh folders: [(label, utterances, measurement)].
    The second reuses the task worker processes (torch, facenet... imported); the encoder actors are rebuilt."""
    import ray

    rows = []
    start = time.perf_counter()
    ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=False, logging_level=logging.WARNING)
    init_s = time.perf_counter() - start
    try:
        for label in ("cold", "second"):
            with meter.measure() as m:
                manifest = preprocess(source, out / f"ray{cpus}-{label}", cfg)
            m["load"] = os.getloadavg()[0]  # 1-minute load average of the machine at the end of the pass
            rows.append((label, manifest.num_samples, m))
    finally:
        ray.shutdown()
    rows[0][2]["init"] = init_s
    return rows


# ---------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", help="a folder of videos with subtitles (default: a synthetic corpus)")
    parser.add_argument("--scale", default="tiny", help="synthetic corpus scale (tiny: 7 movies, 25-29 kept cues per seed)")
    parser.add_argument("--seeds", default="0", help="comma-separated seeds of the synthetic corpora to process together")
    parser.add_argument("--movies", type=int, default=0, help="only the first N videos (0: all)")
    parser.add_argument("--cpus", default="2,1", help="comma-separated Ray num_cpus to run the pipeline with")
    parser.add_argument("--w2v-utterances", type=int, default=4, help="utterances of 1-10 s for wav2vec2-base (0: skip)")
    parser.add_argument("--fer-crops", type=int, default=72, help="64x64 crops for the full DenseNet-FER+ (0: skip)")
    parser.add_argument("--dir", default=None, help="where to write corpus and outputs (default: a temporary folder)")
    parser.add_argument("overrides", nargs="*", help="config overrides on top of tiny_cpu.yaml, e.g. face.detector=mtcnn")
    args = parser.parse_args()

    import ray
    import torch

    cfg = load_config(PreprocessConfig, [str(TINY)], args.overrides)
    model = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "?")
    print(f"# {platform.machine()} {model}, {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f}; "
          f"Python {platform.python_version()}, torch {torch.__version__}, ray {ray.__version__}; {datetime.date.today()}")
    print(f"# face.detector={cfg.face.detector} face.detect_every={cfg.face.detect_every} "
          f"face.centerface_face_px={cfg.face.centerface_face_px}")

    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        tmp = Path(tmp)
        start = time.perf_counter()
        source = prepare_movies(args, tmp)
        videos = sorted(p.name for p in source.iterdir() if p.suffix.lower() in VIDEO_SUFFIXES)
        print(f"# {len(videos)} videos in {source} ({time.perf_counter() - start:.0f} s to prepare): {', '.join(videos)}")

        (kept, dcpu, dwall, dsteps), note = checked(lambda: decode_only(source, cfg))
        print(f"\ndecode only (1 process): {kept} kept cues, {int(dsteps.pop('frames decoded'))} frames; "
              f"{dcpu:.2f} CPU-s, {dwall:.2f} s wall = {kept / dcpu:.1f} cues per CPU-s ({dcpu / kept * 1000:.0f} ms per cue; "
              f"{note})")
        for name, sec in dsteps.items():
            print(f"  {name:<36} {sec:6.2f} CPU-s")

        (n, bcpu, stages), note = checked(lambda: stage_breakdown(source, cfg))
        construction = stages.pop("model construction (once)")
        print(f"\nstages of the pipeline's task in 1 process, 1 thread, tiny encoders: {n} utterances, {bcpu:.2f} CPU-s "
              f"= {n / bcpu:.2f} utterances per CPU-s (+ {construction:.2f} s building the encoders once; {note})")
        print(f"  {'stage':<38} {'CPU-s':>7} {'share':>6} {'ms/utt':>7}")
        for name, sec in sorted(stages.items(), key=lambda kv: -kv[1]):
            print(f"  {name:<38} {sec:>7.2f} {sec / bcpu:>6.1%} {sec / n * 1000:>7.0f}")

        meter = TreeCPU()
        runs: dict[int, list] = {}
        for cpus in [int(c) for c in args.cpus.split(",") if c]:
            runs[cpus] = ray_passes(source, cfg, cpus, tmp, meter)
        print("\nfull pipeline (`preprocess`, tiny encoders, local Ray); CPU-s of the driver + Ray daemons + workers + actors")
        print(f"{'ray num_cpus':>12} {'pass':>6} {'utt':>4} {'wall s':>7} {'utt/s':>6} {'CPU-s':>6} {'utt/CPU-s':>10} "
              f"{'cores busy':>10} {'machine CPU-s':>14} {'load':>5}  CPU-s by role (processes started)")
        for cpus, rows in runs.items():
            for label, utt, m in rows:
                roles = ", ".join(f"{r} {s:.1f} ({m['started'].get(r, 0)})"
                                  for r, s in sorted(m["roles"].items(), key=lambda kv: -kv[1]))
                print(f"{cpus:>12} {label:>6} {utt:>4} {m['wall']:>7.1f} {utt / m['wall']:>6.2f} {m['cpu']:>6.1f} "
                      f"{utt / m['cpu']:>10.2f} {m['cpu'] / m['wall']:>10.2f} {m['machine']:>14.1f} {m['load']:>5.1f}  {roles}")
            print(f"{'':>12} ray.init {rows[0][2]['init']:.1f} s wall (not in the passes)")

        if runs:
            top = max(runs)
            utt, second = runs[top][1][1], runs[top][1][2]
            encoders = stages["wav2vec2 tiny"] + stages["DenseNet-FER+ tiny"]
            actors = second["roles"].get("audio actor", 0.0) + second["roles"].get("visual actor", 0.0)
            print(f"\nsecond pass at num_cpus={top}, CPU-s per utterance: task workers "
                  f"{second['roles'].get('task workers', 0.0) / utt:.2f} (the same stages in 1 process: "
                  f"{(bcpu - encoders) / n:.2f}); encoder actors {actors / utt:.2f} (their compute in 1 process: "
                  f"{encoders / n:.2f}; the rest is actor start-up, paid once per run); all {second['cpu'] / utt:.2f}")
            print(f"full / decode-only, second pass at num_cpus={top}: per core (CPU-s per utterance) "
                  f"{second['cpu'] / utt / (dcpu / kept):.0f}x, wall {second['wall'] / dwall:.0f}x "
                  f"(decode-only ran in one process); the 1-process stages / decode-only: {bcpu / n / (dcpu / kept):.0f}x")
            if 1 in runs and top != 1:
                for i, label in enumerate(("cold", "second")):
                    print(f"wall ray num_cpus=1 / num_cpus={top}, {label} pass: "
                          f"{runs[1][i][2]['wall'] / runs[top][i][2]['wall']:.2f}x")

        from benchmarks.encoders import audio_rate, visual_rate

        if args.w2v_utterances:
            rate, note = checked(lambda: audio_rate("base", "float32", args.w2v_utterances, 1))
            print(f"\nwav2vec2-base float32 on CPU, {torch.get_num_threads()} torch threads, {args.w2v_utterances} "
                  f"utterances of 1-10 s: {rate:.2f} audio seconds per second ({note})")
        if args.fer_crops:
            rate, note = checked(lambda: visual_rate("full", args.fer_crops, 1))
            print(f"DenseNet-FER+ (full) float32 on CPU, {torch.get_num_threads()} torch threads: {rate:.1f} crops per second "
                  f"(= {rate / 36:.2f} utterances of 36 frames per second; {note})")


if __name__ == "__main__":
    main()
