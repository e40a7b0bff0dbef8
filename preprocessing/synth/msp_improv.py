"""MSP-IMPROV-style release: six sessions, one female and one male actor each (F01..F06, M01..M06).

OUT/msp_improv/Evaluation.txt   one record per recording, then its raters, then a blank line:
    UTD-IMPROV-S03A-F01-S-FM01.avi; A; A:4.200000; V:1.800000; D:3.600000 ; N:3.400000;
    E02-p; Angry; Frustrated; A:4.000000; V:2.000000; D:4.000000; N:3.000000;
  label: A H N S, or O (other) / X (no agreement), which adapters must drop.
OUT/msp_improv/sessionK/SxxE/T/MSP-IMPROV-SxxE-<speaker>-T-<pair><nn>.{avi,wav,txt}
  name fields: 3rd = scenario xx and its target emotion E, 4th = speaker, 5th = recording type
  (S target sentence, R read, P improvised, T natural interaction; only S is used downstream),
  6th = the dyad's gender order plus a take number. The .avi (H.264 + 16 kHz PCM, 25 fps) shows the
  speaker's face; the .wav is the 16 kHz mono audio; the .txt is the transcript (one line).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .audio import random_voice, write_wav
from .common import EMOTIONS, Progress, item_rng, shown_class, snap, write_json
from .config import Sizes, SynthConfig
from .faces import random_identity
from .text import sentences
from .video import Utterance, avi_h264_encoding, background, cast, render

WIDTH, HEIGHT, FPS = 320, 240, 25
SESSIONS = 6
LETTER = {"anger": "A", "happiness": "H", "neutral": "N", "sadness": "S"}
RATER_WORD = {"A": "Angry", "H": "Happy", "N": "Neutral", "S": "Sad", "O": "Other"}
SECONDARY = ["", "", "", "Frustrated", "Excited", "Surprised", "Depressed", "Concerned"]
DIMENSIONS = {  # arousal, valence, dominance centres per evidence class (1..5 scales)
    "anger": (4.2, 1.8, 3.8), "happiness": (3.8, 4.3, 3.4), "neutral": (2.6, 3.0, 3.0), "sadness": (1.8, 1.7, 2.2),
}


def speakers() -> list[tuple[int, str]]:
    """(session, speaker) for all twelve actors."""
    return [(k, f"{g}{k:02d}") for k in range(1, SESSIONS + 1) for g in "FM"]


def generate_msp_improv(out: Path, config: SynthConfig, sizes: Sizes, progress: Progress) -> dict[str, int]:
    """Write all recordings and Evaluation.txt; returns counts."""
    plan = _plan(config, sizes)
    records = []
    for item in progress(plan, "msp_improv"):
        records.append(_write_recording(out, config, item))
    (out / "msp_improv").mkdir(parents=True, exist_ok=True)
    (out / "msp_improv" / "Evaluation.txt").write_text("".join(r for _, r in sorted(records)))
    return {"msp_recordings": len(plan)}


def _plan(config: SynthConfig, sizes: Sizes) -> list[dict]:
    """Recording names, types and labels; some S recordings get O / X labels, some recordings aren't S."""
    rng = item_rng(config.seed, "msp_improv", "plan")
    n = sizes.msp_per_speaker
    items = []
    for s, (session, speaker) in enumerate(speakers()):
        kinds = ["S"] * (n - n // 4) + [("R", "P", "T")[(s + j) % 3] for j in range(n // 4)]
        for kind in kinds:
            label = "OX"[int(rng.integers(2))] if rng.random() < 0.08 else "AHNS"[int(rng.integers(4))]
            items.append({"session": session, "speaker": speaker, "type": kind, "label": label})
    targets = [i for i, item in enumerate(items) if item["type"] == "S"]
    first, second = rng.choice(targets, size=2, replace=False)
    items[int(first)]["label"], items[int(second)]["label"] = "O", "X"  # both always occur
    takes: dict[str, int] = {}
    for item in items:
        intended = item["label"] if item["label"] in "AHNS" and rng.random() < 0.8 else "AHNS"[int(rng.integers(4))]
        scenario = f"S{int(rng.integers(1, 16)):02d}{intended}"
        pair = "FM" if item["speaker"][0] == "F" else "MF"
        stem = f"{scenario}-{item['speaker']}-{item['type']}-{pair}"
        takes[stem] = takes.get(stem, 0) + 1
        item["scenario"] = scenario
        item["name"] = f"MSP-IMPROV-{stem}{takes[stem]:02d}"
    return items


def _write_recording(out: Path, config: SynthConfig, item: dict) -> tuple[str, str]:
    """Render one recording; returns (name, its Evaluation.txt block)."""
    rng = item_rng(config.seed, "msp_improv", item["name"])
    person = item_rng(config.seed, "msp_improv", "speaker", item["speaker"])
    photo = (item["session"] + (item["speaker"][0] == "M")) % 2
    actors = cast([(random_identity(person, photo), random_voice(person, female=item["speaker"][0] == "F"))],
                  WIDTH, HEIGHT)
    label = item["label"]
    evidence = {v: k for k, v in LETTER.items()}.get(label) or EMOTIONS[int(rng.integers(len(EMOTIONS)))]
    text_class = shown_class(rng, evidence, config.text_reliability)
    audio_class = shown_class(rng, evidence, config.audio_reliability)
    face_class = shown_class(rng, evidence, config.face_reliability)
    start = round(rng.uniform(0.2, 0.4), 4)
    end = round(start + rng.uniform(1.2, 2.8), 4)
    duration = snap(end + rng.uniform(0.2, 0.4) + 0.05, 0.2)
    words = " ".join(sentences(rng, text_class, end - start))
    utterance = Utterance(start, end, 0, evidence, text_class, audio_class, face_class, None, (start, end))

    folder = out / "msp_improv" / f"session{item['session']}" / item["scenario"] / item["type"]
    track = render(folder / f"{item['name']}.avi", actors, [utterance], background(rng, WIDTH, HEIGHT), FPS,
                   duration, rng, avi_h264_encoding(FPS))
    write_wav(folder / f"{item['name']}.wav", track)
    (folder / f"{item['name']}.txt").write_text(words + "\n")
    write_json(out / "ground_truth" / "msp_improv" / f"{item['name']}.json", {
        "video": (folder / f"{item['name']}.avi").relative_to(out).as_posix(),
        "fps": FPS, "width": WIDTH, "height": HEIGHT, "duration": duration,
        "speaker": item["speaker"], "type": item["type"], "label": label, "text": words,
        "faces": [a.to_dict() for a in actors],
        "utterance": dict(utterance.to_dict(), speaker_box=actors[0].box()),
    })
    return item["name"], _evaluation(rng, item["name"], label, evidence)


def _evaluation(rng: np.random.Generator, name: str, label: str, evidence: str) -> str:
    """The record line (consensus label, mean dimensions) and one line per rater."""
    raters = int(rng.integers(5, 8))
    if label == "X":  # no category reaches a majority
        words = ["Angry", "Happy", "Sad", "Neutral", "Other"]
        votes = [words[int(i)] for i in rng.permutation(5)[:3]] * 3
        votes = votes[:raters]
    else:
        majority = raters // 2 + 1
        others = [w for w in RATER_WORD.values() if w != RATER_WORD[label]]
        votes = [RATER_WORD[label]] * majority + [others[int(rng.integers(4))] for _ in range(raters - majority)]
    centre = np.array(DIMENSIONS[evidence])
    dims = np.clip(np.round(centre + rng.normal(0, 0.6, size=(raters, 3))), 1, 5)
    nat = np.clip(np.round(rng.normal(3.3, 0.8, size=raters)), 1, 5)
    a, v, d = dims.mean(axis=0)
    lines = [f"UTD-{name[4:]}.avi; {label}; A:{a:.6f}; V:{v:.6f}; D:{d:.6f} ; N:{nat.mean():.6f};\n"]
    for r, vote in enumerate(votes):
        rater = int(rng.integers(1, 60))
        extra = SECONDARY[int(rng.integers(len(SECONDARY)))]
        lines.append(f"E{rater:02d}-p; {vote}; {extra}; A:{dims[r, 0]:.6f}; V:{dims[r, 1]:.6f}; "
                     f"D:{dims[r, 2]:.6f}; N:{nat[r]:.6f};\n")
    return "".join(lines) + "\n"
