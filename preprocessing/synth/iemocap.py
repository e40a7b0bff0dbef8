"""IEMOCAP-style release: five sessions, two actors (F, M) each, improvised and scripted dialogs.

OUT/iemocap/SessionN/dialog/EmoEvaluation/<dialog>.txt     labels in the release's line format
OUT/iemocap/SessionN/dialog/transcriptions/<dialog>.txt    `<turn> [START-END]: text`
OUT/iemocap/SessionN/dialog/avi/DivX/<dialog>.avi          both actors visible (MPEG-4 + PCM, 30 fps)
OUT/iemocap/SessionN/sentences/wav/<dialog>/<turn>.wav     16 kHz mono 16-bit, the turn's span
The speaking actor's mouth moves in the dialog video during their turns. All eleven labels appear;
most turns are neu/hap/exc/sad/ang. Evidence: hap and exc carry happiness, fru and dis anger, sur
happiness, fea sadness, oth and xxx a random class.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .audio import SR, random_voice, write_wav
from .common import EMOTIONS, Progress, item_rng, shown_class, snap, write_json
from .config import Sizes, SynthConfig
from .faces import random_identity
from .text import sentences
from .video import Utterance, background, cast, divx_encoding, render

WIDTH, HEIGHT, FPS = 320, 240, 30
LABELS = ("neu", "hap", "exc", "sad", "ang", "fru", "sur", "fea", "dis", "oth", "xxx")
TARGET_SHARE = {"neu": 0.3, "hap": 0.15, "exc": 0.15, "sad": 0.2, "ang": 0.2}
EVIDENCE = {"neu": "neutral", "hap": "happiness", "exc": "happiness", "sad": "sadness", "ang": "anger",
            "fru": "anger", "dis": "anger", "sur": "happiness", "fea": "sadness"}
CATEGORY = {"neu": "Neutral", "hap": "Happiness", "exc": "Excited", "sad": "Sadness", "ang": "Anger",
            "fru": "Frustration", "sur": "Surprise", "fea": "Fear", "dis": "Disgust", "oth": "Other"}
VAD = {  # integer ranges of valence, activation, dominance an annotator gives each class
    "anger": ((1, 2), (4, 5), (3, 5)), "happiness": ((4, 5), (3, 5), (3, 4)),
    "neutral": ((2, 4), (2, 3), (2, 4)), "sadness": ((1, 2), (1, 2), (1, 3)),
}
HEADER = "% [START_TIME - END_TIME] TURN_NAME EMOTION [V, A, D]\n\n"


def dialog_names(sizes: Sizes) -> list[tuple[int, str]]:
    """(session, dialog) pairs: impro and script alternate, starting with impro in session 1."""
    names = []
    for session, count in enumerate(sizes.iemocap_dialogs, start=1):
        seen = {"impro": 0, "script": 0}
        for j in range(count):
            kind = ("impro", "script")[(session - 1 + j) % 2]
            seen[kind] += 1
            letter = "FM"[j % 2]  # which actor wore the markers; only part of the name
            suffix = f"{seen[kind]:02d}" if kind == "impro" else f"{(seen[kind] + 1) // 2:02d}_{2 - seen[kind] % 2}"
            names.append((session, f"Ses{session:02d}{letter}_{kind}{suffix}"))
    return names


def generate_iemocap(out: Path, config: SynthConfig, sizes: Sizes, progress: Progress) -> dict[str, int]:
    """Write all sessions; returns counts."""
    dialogs = dialog_names(sizes)
    plans = [_plan_turns(item_rng(config.seed, "iemocap", name, "turns"), name, sizes) for _, name in dialogs]
    labels = iter(_assign_labels(item_rng(config.seed, "iemocap", "labels"), sum(len(p) for p in plans)))
    counts = {"iemocap_dialogs": 0, "iemocap_turns": 0}
    for (session, name), turns in progress(list(zip(dialogs, plans)), "iemocap"):
        for turn in turns:
            turn["label"] = next(labels)
        _write_dialog(out, config, session, name, turns)
        counts["iemocap_dialogs"] += 1
        counts["iemocap_turns"] += len(turns)
    return counts


def _plan_turns(rng: np.random.Generator, dialog: str, sizes: Sizes) -> list[dict]:
    """Turn timing and speakers; turn names count per gender (F000, M000, F001, ...)."""
    turns, seen = [], {"F": 0, "M": 0}
    t = rng.uniform(0.5, 1.5)
    gender = "FM"[int(rng.integers(2))]
    for _ in range(int(rng.integers(sizes.iemocap_turns[0], sizes.iemocap_turns[1] + 1))):
        if turns and rng.random() < 0.85:
            gender = "M" if gender == "F" else "F"
        start = round(t, 4)
        end = round(start + rng.uniform(1.3, 3.8), 4)
        turns.append({"name": f"{dialog}_{gender}{seen[gender]:03d}", "gender": gender, "start": start, "end": end})
        seen[gender] += 1
        t = end + rng.uniform(0.15, 0.8)
    return turns


def _assign_labels(rng: np.random.Generator, count: int) -> list[str]:
    """Every label at least once, the rest mostly the five target labels, in random order."""
    if count < len(LABELS):
        raise ValueError(f"IEMOCAP needs at least {len(LABELS)} turns to show every label, got {count}")
    target, share = list(TARGET_SHARE), np.array(list(TARGET_SHARE.values()))
    rest = [target[int(i)] for i in rng.choice(len(target), size=count - len(LABELS), p=share)]
    rest = [LABELS[5 + int(rng.integers(6))] if rng.random() < 0.08 else label for label in rest]
    labels = list(LABELS) + rest
    return [labels[int(i)] for i in rng.permutation(count)]


def _write_dialog(out: Path, config: SynthConfig, session: int, dialog: str, turns: list[dict]) -> None:
    """Render one dialog: its video, turn wavs, EmoEvaluation and transcription files, ground truth."""
    rng = item_rng(config.seed, "iemocap", dialog)
    people = []
    for i, gender in enumerate("FM"):
        person = item_rng(config.seed, "iemocap", "speaker", session, gender)
        photo = (session + i) % 2  # the two actors of a session come from different photos
        people.append((random_identity(person, photo), random_voice(person, female=gender == "F")))
    actors = cast(people, WIDTH, HEIGHT)

    utterances, lines, evaluations = [], [], [HEADER]
    evaluators = sorted(rng.choice(np.arange(1, 7), size=3, replace=False))
    for turn in turns:
        label = turn["label"]
        evidence = EVIDENCE.get(label) or EMOTIONS[int(rng.integers(len(EMOTIONS)))]
        speaker = "FM".index(turn["gender"])
        text_class = shown_class(rng, evidence, config.text_reliability)
        audio_class = shown_class(rng, evidence, config.audio_reliability)
        face_class = shown_class(rng, evidence, config.face_reliability)
        listener = None
        if rng.random() < config.listener_expression_prob:
            listener = EMOTIONS[int(rng.integers(len(EMOTIONS)))]
        length = turn["end"] - turn["start"]
        lead, tail = rng.uniform(0.05, 0.15, size=2)
        voiced = (round(turn["start"] + lead, 4), round(turn["end"] - tail, 4))
        words = " ".join(sentences(rng, text_class, length))
        if text_class == "happiness" and rng.random() < 0.15:
            words += " [LAUGHTER]"
        utterance = Utterance(turn["start"], turn["end"], speaker, evidence, text_class, audio_class, face_class,
                              listener, voiced)
        utterances.append(utterance)
        turn.update(utterance.to_dict(), text=words, speaker_box=actors[speaker].box())
        lines.append(f"{turn['name']} [{turn['start']:08.4f}-{turn['end']:08.4f}]: {words}\n")
        evaluations.append(_evaluation(rng, turn, evaluators, evidence))

    base = out / "iemocap" / f"Session{session}"
    duration = snap(turns[-1]["end"] + rng.uniform(0.3, 0.8) + 0.05, 0.1)
    video = base / "dialog" / "avi" / "DivX" / f"{dialog}.avi"
    track = render(video, actors, utterances, background(rng, WIDTH, HEIGHT), FPS, duration, rng, divx_encoding(FPS))
    for turn in turns:
        write_wav(base / "sentences" / "wav" / dialog / f"{turn['name']}.wav",
                  track[int(round(turn["start"] * SR)): int(round(turn["end"] * SR))])
    (base / "dialog" / "EmoEvaluation").mkdir(parents=True, exist_ok=True)
    (base / "dialog" / "EmoEvaluation" / f"{dialog}.txt").write_text("".join(evaluations))
    (base / "dialog" / "transcriptions").mkdir(parents=True, exist_ok=True)
    (base / "dialog" / "transcriptions" / f"{dialog}.txt").write_text("".join(lines))
    write_json(out / "ground_truth" / "iemocap" / f"{dialog}.json", {
        "video": f"iemocap/Session{session}/dialog/avi/DivX/{dialog}.avi",
        "fps": FPS, "width": WIDTH, "height": HEIGHT, "duration": duration,
        "faces": [dict(a.to_dict(), gender=g) for a, g in zip(actors, "FM")],
        "turns": turns,
    })


def _evaluation(rng: np.random.Generator, turn: dict, evaluators: list[int], evidence: str) -> str:
    """One EmoEvaluation block: the turn line, then categorical (C-) and dimensional (A-) annotator lines."""
    label = turn["label"]
    others = [c for key, c in CATEGORY.items() if key != label]
    picks = [others[int(i)] for i in rng.permutation(len(others))]
    if label == "xxx":  # no majority: three different categories
        votes = [[picks[0]], [picks[1]], [picks[2]]]
    else:  # two evaluators agree on the label; extras and the third vote never tie with it
        votes = [[CATEGORY[label]], [CATEGORY[label]], [picks[0]]]
        if rng.random() < 0.3:
            votes[0].append(picks[1])
    self_vote = CATEGORY.get(label, picks[3]) if rng.random() < 0.6 else picks[4]
    self_id = f"{turn['gender']}1"
    vad = VAD[evidence if label != "xxx" else "neutral"]
    dims = [[int(rng.integers(lo, hi + 1)) for lo, hi in vad] for _ in range(3)]
    mean = np.mean(dims[:2], axis=0)
    lines = [f"[{turn['start']:.4f} - {turn['end']:.4f}]\t{turn['name']}\t{label}\t"
             f"[{mean[0]:.4f}, {mean[1]:.4f}, {mean[2]:.4f}]\n"]
    for e, vote in zip(evaluators, votes):
        lines.append(f"C-E{e}:\t{''.join(v + '; ' for v in vote).rstrip()}\t()\n")
    lines.append(f"C-{self_id}:\t{self_vote};\t()\n")
    for who, (v, a, d) in zip([f"E{e}" for e in evaluators[:2]] + [self_id], dims):
        lines.append(f"A-{who}:\tval {v}; act {a}; dom  {d};\t()\n")
    return "".join(lines) + "\n"
