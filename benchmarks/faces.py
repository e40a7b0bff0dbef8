"""Face stage benchmark: detection cost and accuracy per detector on synthetic corpora with ground truth.

For each corpus (default: the movies of `memobert synth --scale tiny` for seeds 0, 1, 2) and each
detector setting, every kept cue (clipped at 10 s like the pipeline) goes through the pipeline's own face
stage (preprocessing.speaker.speaker_face_crops_batch, one call per video, one thread). Printed per
setting:
  detect CPU-s/utt   CPU seconds inside detector.detect per utterance (what the 10x target is about)
  stage CPU-s/utt    the whole face stage per utterance: decoding, cut detection, detection, tracking,
                     active speaker, crops
  face recall        share of (sampled frame, ground-truth face) pairs covered by a track box with IoU >= 0.5
                     (tracks as the speaker step sees them: interpolated between keyframes)
  speaker            kept utterances whose chosen track's boxes all have their centre inside the speaker's
                     ground-truth box / kept utterances
  kept               utterances with a chosen face / kept cues

    PYTHONPATH=. .venv/bin/python benchmarks/faces.py [--seeds 0,1,2] [--settings mtcnn/1,centerface/3]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from preprocessing import speaker as speaker_mod
from preprocessing.config import FaceConfig, SpeakerConfig
from preprocessing.detectors import build_detector, iou
from preprocessing.faces import open_video

SAMPLE_RATE = 16_000
MAX_SECONDS = 10.0


def corpus(seed: int, root: Path) -> Path:
    """The tiny synthetic movies of `seed` under `root` (generated when missing)."""
    out = root / f"synth{seed}"
    if not (out / "ground_truth").is_dir():
        from preprocessing.synth import generate_corpus
        from preprocessing.synth.config import SynthConfig

        generate_corpus(out, SynthConfig(seed=seed, scale="tiny", parts=["movies"]))
    return out


def cues_by_video(source: Path) -> list[tuple[Path, dict, list[dict]]]:
    """(video, ground truth, kept cues) per movie."""
    out = []
    for path in sorted((source / "ground_truth" / "movies").glob("*.json")):
        truth = json.loads(path.read_text())
        out.append((source / truth["video"], truth, [c for c in truth["cues"] if c["kept"]]))
    return out


def evaluate(source: Path, cfg: FaceConfig) -> dict[str, float]:
    """Cost and accuracy of the face stage with `cfg` on one corpus."""
    from decord import AudioReader

    detector = build_detector(cfg)
    detect_cpu = 0.0
    detect = detector.detect

    def timed_detect(frames: np.ndarray) -> list:
        nonlocal detect_cpu
        start = time.process_time()
        try:
            return detect(frames)
        finally:
            detect_cpu += time.process_time() - start

    detector.detect = timed_detect
    captured: list = []
    fill = speaker_mod.tracks_from_keyframes

    def capture(*args, **kwargs):  # the tracks the speaker step sees, cue by cue
        captured.append(fill(*args, **kwargs))
        return captured[-1]

    speaker_mod.tracks_from_keyframes = capture
    stage_cpu, cues = 0.0, 0
    pairs = covered = kept = correct = 0
    try:
        for video, truth, kept_cues in cues_by_video(source):
            wave = AudioReader(str(video), sample_rate=SAMPLE_RATE, mono=True)[:].asnumpy()[0]
            spans = [(c["start"], min(c["end"], c["start"] + MAX_SECONDS)) for c in kept_cues]
            audios = [wave[int(a * SAMPLE_RATE) : int(b * SAMPLE_RATE)] for a, b in spans]
            captured.clear()
            start = time.process_time()
            results = speaker_mod.speaker_face_crops_batch(open_video(video), spans, audios, cfg, SpeakerConfig(), detector)
            stage_cpu += time.process_time() - start
            cues += len(spans)
            faces = np.array([f["box"] for f in truth["faces"]], np.float32)
            for (a, b), tracks, result, cue in zip(spans, captured, results, kept_cues):
                count = int(np.ceil((b - a) * cfg.fps - 1e-9))
                for f in range(count):
                    boxes = [t.boxes[t.frames == f] for t in tracks]
                    boxes = np.concatenate(boxes) if boxes else np.zeros((0, 4), np.float32)
                    pairs += len(faces)
                    covered += int((iou(faces, boxes) >= 0.5).any(axis=1).sum()) if len(boxes) else 0
                if result.reason_if_dropped is None:
                    kept += 1
                    x1, y1, x2, y2 = cue["speaker_box"]
                    cx, cy = result.boxes[:, [0, 2]].mean(axis=1), result.boxes[:, [1, 3]].mean(axis=1)
                    correct += bool(np.all((x1 < cx) & (cx < x2) & (y1 < cy) & (cy < y2)))
    finally:
        speaker_mod.tracks_from_keyframes = fill
    return {"cues": cues, "detect": detect_cpu / cues, "stage": stage_cpu / cues, "recall": covered / max(pairs, 1),
            "kept": kept, "correct": correct}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--settings", default="mtcnn/1,mtcnn/3,centerface/1,centerface/2,centerface/3,centerface/5",
                        help="comma-separated DETECTOR/EVERY[/FACE_PX] (FACE_PX: face.centerface_face_px)")
    parser.add_argument("--dir", default=None, help="where the corpora are (or are generated); default: a temporary folder")
    args = parser.parse_args()

    import torch

    torch.set_num_threads(1)  # as in the pipeline's tasks
    model = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "?")
    print(f"# {platform.machine()} {model}, {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f} (start); "
          f"Python {platform.python_version()}, torch {torch.__version__}; {datetime.date.today()}")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.dir or tmp)
        print(f"{'setting':<22} {'seed':>4} {'cues':>4} {'detect CPU-s/utt':>16} {'stage CPU-s/utt':>15} "
              f"{'face recall':>11} {'speaker':>8} {'kept':>6}  load")
        baseline: dict[int, float] = {}
        for setting in args.settings.split(","):
            name, every, *px = setting.split("/")
            cfg = replace(FaceConfig(device="cpu"), detector=name, detect_every=int(every))
            if px:
                cfg = replace(cfg, centerface_face_px=float(px[0]))
            for seed in [int(s) for s in args.seeds.split(",")]:
                r = evaluate(corpus(seed, root), cfg)
                baseline.setdefault(seed, r["detect"])  # the first setting is the baseline of the ratio
                print(f"{setting:<22} {seed:>4} {r['cues']:>4} {r['detect']:>9.3f} ({baseline[seed] / r['detect']:>4.1f}x) "
                      f"{r['stage']:>15.3f} {r['recall']:>11.3f} {r['correct']:>4}/{r['kept']:<3} {r['kept']:>3}/{r['cues']:<3}"
                      f" {os.getloadavg()[0]:.2f}", flush=True)


if __name__ == "__main__":
    main()
