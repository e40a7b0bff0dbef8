"""Labeled emotion corpora (IEMOCAP, MSP-IMPROV release layouts, a generic CSV) as labeled `Segment`s.

Each loader returns (segments, drop_counts): items left out, counted by reason ("label:fru",
"type:R", "missing_video", ...), so a report can show what the protocol kept.
"""

from __future__ import annotations

import csv
import re
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

from finetune.protocols import CLASSES, iemocap_speaker, msp_improv_speaker
from preprocessing.segments import Segment, make_key, sanitize_key


class CorpusError(ValueError):
    """A labeled corpus is missing, of an unknown layout, or has a malformed file (named in the message)."""


class NotACorpusError(CorpusError):
    """The path has no labeled-corpus layout at all (it may be a folder of videos); other errors mean a broken corpus."""


Loaded = tuple[list[Segment], Counter[str]]

IEMOCAP_LABELS = {"ang": "anger", "hap": "happiness", "exc": "happiness", "neu": "neutral", "sad": "sadness"}
MSP_IMPROV_LABELS = {"A": "anger", "H": "happiness", "N": "neutral", "S": "sadness"}
# Label spellings a CSV manifest may use besides the class names themselves.
CSV_ALIASES = {"ang": "anger", "angry": "anger", "hap": "happiness", "happy": "happiness",
               "neu": "neutral", "sad": "sadness"}
AUDIO_SUFFIXES = (".wav", ".flac", ".mp3", ".ogg", ".opus")  # what soundfile (libsndfile >= 1.1) decodes
# Audio-only containers libsndfile cannot decode: refused at load, naming the row, instead of failing every unit.
UNREADABLE_AUDIO_SUFFIXES = (".m4a", ".aac", ".wma")
MSP_EVALUATION = ("Evaluation.txt", "Evalution.txt")  # the release spells it the second way

_NUMBER = r"\d+(?:\.\d*)?"
_IEMOCAP_TURN = re.compile(rf"^\[\s*({_NUMBER})\s*-\s*({_NUMBER})\s*\]\s+(\S+)\s+(\S+)\s+\[")
_IEMOCAP_TEXT = re.compile(rf"^(\S+)\s*\[\s*{_NUMBER}\s*-\s*{_NUMBER}\s*\]:\s*(.*)$")


def load_iemocap(root: str | Path, merge_excited: bool = True) -> Loaded:
    """IEMOCAP turns of the 4 classes (excited counts as happiness when `merge_excited`), all sessions."""
    root = Path(root)
    sessions = sorted((int(m.group(1)), p) for p in root.glob("Session*")
                      if (m := re.fullmatch(r"Session(\d+)", p.name)) and (p / "dialog").is_dir())
    if not sessions:
        raise CorpusError(f"{root}: no IEMOCAP SessionN/dialog folders")
    labels = dict(IEMOCAP_LABELS)
    if not merge_excited:
        del labels["exc"]
    segments: list[Segment] = []
    drops: Counter[str] = Counter()
    for session, folder in sessions:
        # Skip hidden files: copies made on macOS carry "._<name>.txt" resource forks.
        for evaluation in sorted((folder / "dialog" / "EmoEvaluation").glob("[!.]*.txt")):
            segments += _iemocap_dialog(folder, session, evaluation, labels, drops)
    return segments, drops


def _iemocap_dialog(
    folder: Path, session: int, evaluation: Path, labels: dict[str, str], drops: Counter[str]
) -> list[Segment]:
    dialog = evaluation.stem
    texts = _iemocap_transcripts(folder / "dialog" / "transcriptions" / f"{dialog}.txt")
    video = folder / "dialog" / "avi" / "DivX" / f"{dialog}.avi"
    turns = []
    for number, line in enumerate(_read_lines(evaluation), 1):
        match = _IEMOCAP_TURN.match(line)
        if match is None:  # header, blank and per-annotator lines
            continue
        start, end, turn, code = float(match[1]), float(match[2]), match[3], match[4]
        gender = turn.rsplit("_", 1)[-1][:1]  # Ses01F_impro01_M003 -> M: the dialog's F is not the speaker
        if gender not in ("F", "M"):
            raise CorpusError(f"{evaluation}:{number}: turn name {turn!r} does not end in _F<n> or _M<n>")
        turns.append((start, end, turn, code, gender))
    segments: list[Segment] = []
    for start, end, turn, code, gender in sorted(turns):
        wav = folder / "sentences" / "wav" / dialog / f"{turn}.wav"
        reason = _first_failed((code in labels, f"label:{code}"), (turn in texts, "missing_transcript"),
                               (video.is_file(), "missing_video"), (wav.is_file(), "missing_audio"))
        if reason:
            drops[reason] += 1
            continue
        segments.append(Segment(
            video=str(video), index=len(segments), start=start, end=end, text=texts[turn],
            key=sanitize_key(turn), label=CLASSES.index(labels[code]),
            speaker=iemocap_speaker(session, gender), session=session, audio_path=str(wav)))
    return segments


def _iemocap_transcripts(path: Path) -> dict[str, str]:
    """Turn name -> text from `<turn> [START-END]: text` lines (others, e.g. noise lines, ignored)."""
    if not path.is_file():
        return {}
    return {m[1]: " ".join(m[2].split()) for line in _read_lines(path) if (m := _IEMOCAP_TEXT.match(line))}


def load_msp_improv(root: str | Path, transcripts: str | Path | None = None) -> Loaded:
    """MSP-IMPROV target-sentence recordings (5th name field "S") of classes A/H/N/S, from Evaluation.txt.

    Media are found anywhere under `root` by name (MSP-IMPROV-<...>.avi video, same-named .wav audio).
    Our references name no transcript file of the release, so `transcripts` may point at a folder of
    per-recording `<name>.txt` files or a `<name><TAB or ;><text>` table (names with or without
    extension, UTD- or MSP- prefix); the default reads `<name>.txt` files anywhere under `root`
    (beside each recording, as in the synthetic corpus).
    """
    root = Path(root)
    evaluation = msp_improv_evaluation(root)
    if evaluation is None:
        raise CorpusError(f"{root}: no MSP-IMPROV {' or '.join(MSP_EVALUATION)}")
    videos = _index(root, ".avi")
    wavs = _index(root, ".wav")
    texts = _msp_transcripts(root, transcripts)
    segments: list[Segment] = []
    drops: Counter[str] = Counter()
    for name, parts, code in msp_improv_records(evaluation):
        reason = _first_failed((parts[4] == "S", f"type:{parts[4]}"), (code in MSP_IMPROV_LABELS, f"label:{code}"),
                               (name in videos, "missing_video"), (name in texts, "missing_transcript"))
        if reason:
            drops[reason] += 1
            continue
        wav = wavs.get(name)
        duration = _duration(wav or videos[name])
        if duration is None:
            drops["unreadable_media"] += 1
            continue
        session = int(parts[3][1:])
        segments.append(Segment(
            video=str(videos[name]), index=0, start=0.0, end=duration, text=texts[name], key=name,
            label=CLASSES.index(MSP_IMPROV_LABELS[code]), speaker=msp_improv_speaker(session, parts[3][0]),
            session=session, audio_path=str(wav) if wav else None))
    return segments, drops


def msp_improv_evaluation(root: Path) -> Path | None:
    """The release's Evaluation.txt (or its misspelt twin) under root, None when there is none."""
    return next((root / n for n in MSP_EVALUATION if (root / n).is_file()), None)


def msp_improv_records(evaluation: Path) -> Iterator[tuple[str, list[str], str]]:
    """(recording name with the MSP- prefix, its dash fields, label code) of each distinct record of Evaluation.txt."""
    seen: set[str] = set()
    for line in _read_lines(evaluation):
        fields = [f.strip() for f in line.split(";")]
        parts = Path(fields[0]).stem.split("-")
        # Records look like "UTD-IMPROV-S01A-F01-S-FM01.avi; A; A:..; V:..; D:..;" - anything else is skipped.
        if len(fields) < 2 or len(parts) != 6 or parts[1] != "IMPROV" or not re.fullmatch(r"[FM]\d\d", parts[3]):
            continue
        name = "-".join(["MSP", *parts[1:]])  # on disk the recordings carry the MSP- prefix
        if name not in seen:
            seen.add(name)
            yield name, parts, fields[1].upper()


def msp_improv_release_count(root: Path) -> int | None:
    """The release's 4-class target-sentence ("S") records in root's Evaluation.txt; None without one."""
    evaluation = msp_improv_evaluation(root)
    if evaluation is None:
        return None
    return sum(parts[4] == "S" and code in MSP_IMPROV_LABELS for _, parts, code in msp_improv_records(evaluation))


def _msp_transcripts(root: Path, transcripts: str | Path | None) -> dict[str, str]:
    """Recording name (MSP- prefix) -> text, from the source `load_msp_improv` documents."""
    source = Path(transcripts) if transcripts is not None else root
    texts = {}
    if source.is_dir():
        for path in sorted(source.rglob("*-IMPROV-*.txt")):
            texts[_msp_name(path.stem)] = " ".join(" ".join(_read_lines(path)).split())
    elif source.is_file():
        for number, line in enumerate(_read_lines(source), 1):
            if not line.strip():
                continue
            name, sep, text = line.partition("\t") if "\t" in line else line.partition(";")
            if not sep:
                raise CorpusError(f"{source}:{number}: expected '<recording><TAB or ;><text>', got {line.strip()!r}")
            texts[_msp_name(Path(name.strip()).stem)] = " ".join(text.split())
    else:
        raise CorpusError(f"MSP-IMPROV transcripts {source}: no such file or folder")
    if not texts:  # without text every recording would be dropped: say why instead
        raise CorpusError(f"MSP-IMPROV: no transcripts in {source} (expected <recording>.txt files or a "
                          "'<recording><TAB or ;><text>' table; pass transcripts=PATH)")
    return texts


def _msp_name(stem: str) -> str:
    return re.sub(r"^UTD-", "MSP-", stem)


def load_csv(path: str | Path) -> Loaded:
    """A manifest with columns path, start, end, label (required), text, speaker, session (optional).

    `path` is a video or an audio file (by suffix), relative to the CSV's folder unless absolute;
    label is a class name or an alias (ang, hap, neu, sad, angry, happy). Bad rows raise naming the line.
    """
    path = Path(path)
    try:
        handle = path.open(newline="", encoding="utf-8-sig")
    except OSError as err:
        raise CorpusError(f"{path}: cannot read: {err.strerror}") from err
    segments: list[Segment] = []
    with handle:
        reader = csv.DictReader(handle)
        missing = [c for c in ("path", "start", "end", "label") if c not in (reader.fieldnames or [])]
        if missing:
            raise CorpusError(f"{path}: missing column(s) {', '.join(missing)} (header: {reader.fieldnames})")
        for row in reader:
            try:
                segments.append(_csv_segment(path, row, len(segments)))
            except ValueError as err:
                raise CorpusError(f"{path}:{reader.line_num}: {err}") from err
    return segments, Counter()


def _csv_segment(csv_path: Path, row: dict[str, str | None], index: int) -> Segment:
    value = {k: (v or "").strip() for k, v in row.items() if k is not None}
    media = csv_path.parent / value["path"]  # an absolute path stays absolute
    if not value["path"] or not media.is_file():
        raise ValueError(f"media file {str(media)!r} not found")
    if media.suffix.lower() in UNREADABLE_AUDIO_SUFFIXES:
        raise ValueError(f"media file {str(media)!r}: soundfile cannot read {media.suffix} audio; convert it to one of "
                         f"{', '.join(AUDIO_SUFFIXES)}")
    start, end = float(value["start"]), float(value["end"])
    if not 0 <= start < end:
        raise ValueError(f"need 0 <= start < end, got start={start}, end={end}")
    label = CSV_ALIASES.get(value["label"].lower(), value["label"].lower())
    if label not in CLASSES:
        raise ValueError(f"unknown label {value['label']!r} (known: {', '.join(CLASSES)} or {', '.join(CSV_ALIASES)})")
    is_audio = media.suffix.lower() in AUDIO_SUFFIXES
    return Segment(
        video=None if is_audio else str(media), index=index, start=start, end=end,
        text=" ".join(value.get("text", "").split()), key=make_key(csv_path.stem, index),
        label=CLASSES.index(label), speaker=value.get("speaker") or None,
        session=int(value["session"]) if value.get("session") else None, audio_path=str(media) if is_audio else None)


def load_labeled(path: str | Path, merge_excited: bool = True, msp_transcripts: str | Path | None = None) -> Loaded:
    """Load by layout: Session1/dialog -> IEMOCAP, Evaluation.txt -> MSP-IMPROV, a .csv file -> CSV."""
    path = Path(path)
    if path.is_file() and path.suffix.lower() == ".csv":
        return load_csv(path)
    if (path / "Session1" / "dialog").is_dir():
        return load_iemocap(path, merge_excited)
    if any((path / name).is_file() for name in MSP_EVALUATION):
        return load_msp_improv(path, msp_transcripts)
    raise NotACorpusError(f"{path}: not a labeled corpus: expected an IEMOCAP release (Session1/dialog/), "
                          f"an MSP-IMPROV release ({' or '.join(MSP_EVALUATION)}) or a .csv manifest")


def _first_failed(*checks: tuple[bool, str]) -> str | None:
    """The drop reason of the first check that fails, in protocol order; None when all pass."""
    return next((reason for passed, reason in checks if not passed), None)


def _read_lines(path: Path) -> list[str]:
    try:
        return path.read_text(encoding="utf-8-sig", errors="replace").splitlines()
    except OSError as err:
        raise CorpusError(f"{path}: cannot read: {err.strerror}") from err


def _index(root: Path, suffix: str) -> dict[str, Path]:
    """Recording name (MSP- prefix) -> file, for every `*-IMPROV-*<suffix>` under root."""
    return {_msp_name(p.stem): p for p in sorted(root.rglob(f"*-IMPROV-*{suffix}"))}


def _duration(media: Path) -> float | None:
    """Seconds of an audio file (soundfile) or video (OpenCV's container frame count); None if unreadable."""
    if media.suffix.lower() in AUDIO_SUFFIXES:
        import soundfile

        try:
            return float(soundfile.info(str(media)).duration)
        except RuntimeError:
            return None
    import cv2

    capture = cv2.VideoCapture(str(media))
    frames, fps = capture.get(cv2.CAP_PROP_FRAME_COUNT), capture.get(cv2.CAP_PROP_FPS)
    capture.release()
    return frames / fps if frames > 0 and fps > 0 else None
