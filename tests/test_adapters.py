"""Labeled-corpus adapters on hand-made release trees (every label kind), plus the synthetic corpus."""

from __future__ import annotations

import json
import subprocess
from collections import Counter
from pathlib import Path

import imageio_ffmpeg
import numpy as np
import pytest
import soundfile

from finetune.protocols import CLASSES
from preprocessing.adapters import CorpusError, load_csv, load_iemocap, load_labeled, load_msp_improv

ANGER, HAPPINESS, NEUTRAL, SADNESS = range(4)
assert CLASSES == ("anger", "happiness", "neutral", "sadness")

# (turn, label) of one IEMOCAP dialog: every label kind of the release, both speakers.
# The dialog is "Ses01F": its F is who wore the markers, not who speaks each turn.
IEMOCAP_TURNS = [
    ("Ses01F_impro01_F000", "neu"), ("Ses01F_impro01_M000", "hap"), ("Ses01F_impro01_F001", "exc"),
    ("Ses01F_impro01_M001", "sad"), ("Ses01F_impro01_F002", "ang"), ("Ses01F_impro01_M002", "fru"),
    ("Ses01F_impro01_F003", "sur"), ("Ses01F_impro01_M003", "fea"), ("Ses01F_impro01_F004", "dis"),
    ("Ses01F_impro01_M004", "oth"), ("Ses01F_impro01_F005", "xxx"),
]


def write_iemocap_dialog(session_dir: Path, dialog: str, turns: list[tuple[str, str]], wav_missing: str = "") -> None:
    """EmoEvaluation (header, turn and annotator lines), transcriptions, an avi and per-turn wavs."""
    base = session_dir / "dialog"
    evaluation = ["% [START_TIME - END_TIME] TURN_NAME EMOTION [V, A, D]", ""]
    transcript = []
    for i, (turn, label) in enumerate(turns):
        start, end = 2.0 + 3 * i + 0.1234, 4.0 + 3 * i + 0.5
        evaluation += [f"[{start:.4f} - {end:.4f}]\t{turn}\t{label}\t[2.5000, 3.0000, 2.5000]",
                       "C-E2:\tNeutral;\t()", "C-F1:\tAnger; Frustration;\t(annoyed)",
                       "A-E3:\tval 3; act 2; dom  2;\t()", ""]
        transcript.append(f"{turn} [{start:08.4f}-{end:08.4f}]: Line  {i} of {turn}.")
        wav = session_dir / "sentences" / "wav" / dialog / f"{turn}.wav"
        wav.parent.mkdir(parents=True, exist_ok=True)
        if turn != wav_missing:
            wav.touch()
    transcript.append("M: [BREATHING]")  # noise lines without a turn time exist in the release
    for sub, lines in (("EmoEvaluation", evaluation), ("transcriptions", transcript)):
        (base / sub).mkdir(parents=True, exist_ok=True)
        (base / sub / f"{dialog}.txt").write_text("\n".join(lines) + "\n")
    (base / "EmoEvaluation" / "Categorical").mkdir(exist_ok=True)  # subfolders of the release are not dialogs
    (base / "EmoEvaluation" / f"._{dialog}.txt").write_bytes(b"\x00\x05\x16\x07")  # macOS resource fork
    (base / "avi" / "DivX").mkdir(parents=True, exist_ok=True)
    (base / "avi" / "DivX" / f"{dialog}.avi").touch()


@pytest.fixture()
def iemocap(tmp_path: Path) -> Path:
    root = tmp_path / "IEMOCAP_full_release"
    write_iemocap_dialog(root / "Session1", "Ses01F_impro01", IEMOCAP_TURNS)
    write_iemocap_dialog(root / "Session5", "Ses05M_script01_1",
                         [("Ses05M_script01_1_M000", "ang"), ("Ses05M_script01_1_F000", "sad"),
                          ("Ses05M_script01_1_F001", "neu")], wav_missing="Ses05M_script01_1_F001")
    return root


def test_iemocap_labels_speakers_and_drops(iemocap: Path) -> None:
    segments, drops = load_iemocap(iemocap)
    got = [(s.key, s.label, s.speaker, s.session) for s in segments]
    assert got == [
        ("Ses01F_impro01_F000", NEUTRAL, "Ses01F", 1),
        ("Ses01F_impro01_M000", HAPPINESS, "Ses01M", 1),
        ("Ses01F_impro01_F001", HAPPINESS, "Ses01F", 1),  # exc merged into happiness
        ("Ses01F_impro01_M001", SADNESS, "Ses01M", 1),
        ("Ses01F_impro01_F002", ANGER, "Ses01F", 1),
        ("Ses05M_script01_1_M000", ANGER, "Ses05M", 5),
        ("Ses05M_script01_1_F000", SADNESS, "Ses05F", 5),  # a Ses05M dialog, a female speaker
    ]
    assert drops == {"label:fru": 1, "label:sur": 1, "label:fea": 1, "label:dis": 1, "label:oth": 1,
                     "label:xxx": 1, "missing_audio": 1}
    first = segments[0]
    assert (first.start, first.end, first.text, first.index) == (2.1234, 4.5, "Line 0 of Ses01F_impro01_F000.", 0)
    assert first.video == str(iemocap / "Session1/dialog/avi/DivX/Ses01F_impro01.avi")
    assert first.audio_path == str(iemocap / "Session1/sentences/wav/Ses01F_impro01/Ses01F_impro01_F000.wav")
    assert [s.index for s in segments[:5]] == [0, 1, 2, 3, 4]


def test_iemocap_without_excited_merge(iemocap: Path) -> None:
    segments, drops = load_iemocap(iemocap, merge_excited=False)
    assert "Ses01F_impro01_F001" not in {s.key for s in segments}
    assert drops["label:exc"] == 1 and len(segments) == 6


def test_iemocap_bad_turn_name_names_the_file(iemocap: Path) -> None:
    path = iemocap / "Session1/dialog/EmoEvaluation/Ses01F_impro01.txt"
    path.write_text(path.read_text() + "[40.0 - 41.0]\tSes01F_impro01_X009\tneu\t[1, 2, 3]\n")
    with pytest.raises(CorpusError, match="Ses01F_impro01.txt:.*X009"):
        load_iemocap(iemocap)


# Evaluation.txt records: (recording, label). Kept: 5th name field "S" and a label in A/H/N/S.
MSP_RECORDS = [
    ("UTD-IMPROV-S01A-F01-S-FM01", "A"),
    ("UTD-IMPROV-S01A-M01-S-FM01", "H"),
    ("UTD-IMPROV-S01A-F01-R-FM01", "N"),  # other turns of the improvisation
    ("UTD-IMPROV-S02H-F02-P-FM01", "N"),  # read prompt
    ("UTD-IMPROV-S03N-M03-T-MF02", "S"),  # natural interaction
    ("UTD-IMPROV-S04S-F04-S-FM01", "S"),
    ("UTD-IMPROV-S05A-M05-S-MF01", "N"),
    ("UTD-IMPROV-S06H-F06-S-FM01", "O"),  # other
    ("UTD-IMPROV-S06H-M06-S-MF01", "X"),  # no agreement
    ("UTD-IMPROV-S02A-M02-S-MF01", "A"),  # no video on disk
    ("UTD-IMPROV-S03H-F03-S-FM01", "H"),  # a broken video and no wav
]


def tiny_avi(path: Path, seconds: float) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run([imageio_ffmpeg.get_ffmpeg_exe(), "-nostdin", "-v", "error", "-y", "-f", "lavfi",
                    "-i", f"color=c=gray:s=32x32:r=10:d={seconds}", "-c:v", "mjpeg", str(path)], check=True)


@pytest.fixture()
def msp(tmp_path: Path) -> Path:
    root = tmp_path / "MSP-IMPROV"
    lines = ["Evaluation of the MSP-IMPROV corpus", ""]
    for name, label in MSP_RECORDS:
        lines += [f"{name}.avi; {label}; A:3.000000; V:2.500000; D:3.000000; N:5.000000;",
                  "A-1; Angry; Frustrated; A:3.0; V:2.0; D:3.0;", ""]
        msp_name = name.replace("UTD-", "MSP-")
        session = f"session{int(name.split('-')[3][1:])}"
        folder = Path(session) / name.split("-")[2] / name.split("-")[4]
        if msp_name.endswith("M02-S-MF01"):
            continue
        if msp_name.endswith("F03-S-FM01"):
            (root / "Video" / folder).mkdir(parents=True, exist_ok=True)
            (root / "Video" / folder / f"{msp_name}.avi").write_bytes(b"RIFF not a video")
        elif msp_name.endswith("M01-S-FM01"):
            tiny_avi(root / "Video" / folder / f"{msp_name}.avi", 2.0)  # no wav: duration from the video
        else:
            (root / "Video" / folder).mkdir(parents=True, exist_ok=True)
            (root / "Video" / folder / f"{msp_name}.avi").touch()
            (root / "Audio" / folder).mkdir(parents=True, exist_ok=True)
            soundfile.write(root / "Audio" / folder / f"{msp_name}.wav", np.zeros(24_000, np.float32), 16_000)
        (root / "Video" / folder / f"{msp_name}.txt").write_text(f"Text of {name[11:]}\n")
    lines.append("UTD-IMPROV-S01A-F01-S-FM01.avi; H; a duplicate record is ignored")
    (root / "Evaluation.txt").write_text("\n".join(lines) + "\n")
    return root


def test_msp_improv_keeps_target_sentences_of_four_classes(msp: Path) -> None:
    segments, drops = load_msp_improv(msp)
    got = [(s.key, s.label, s.speaker, s.session, s.end) for s in segments]
    assert got == [
        ("MSP-IMPROV-S01A-F01-S-FM01", ANGER, "F01", 1, 1.5),
        ("MSP-IMPROV-S01A-M01-S-FM01", HAPPINESS, "M01", 1, 2.0),
        ("MSP-IMPROV-S04S-F04-S-FM01", SADNESS, "F04", 4, 1.5),
        ("MSP-IMPROV-S05A-M05-S-MF01", NEUTRAL, "M05", 5, 1.5),
    ]
    assert drops == {"type:R": 1, "type:P": 1, "type:T": 1, "label:O": 1, "label:X": 1, "missing_video": 1,
                     "unreadable_media": 1}
    first, video_only = segments[0], segments[1]
    assert first.text == "Text of S01A-F01-S-FM01" and first.start == 0.0
    assert first.video == str(msp / "Video/session1/S01A/S/MSP-IMPROV-S01A-F01-S-FM01.avi")
    assert first.audio_path == str(msp / "Audio/session1/S01A/S/MSP-IMPROV-S01A-F01-S-FM01.wav")
    assert video_only.audio_path is None


def test_msp_improv_transcript_table_option(msp: Path, tmp_path: Path) -> None:
    table = tmp_path / "texts.tsv"
    table.write_text("MSP-IMPROV-S01A-F01-S-FM01\tFrom the  table.\nUTD-IMPROV-S04S-F04-S-FM01.wav;Semicolon form\n\n")
    segments, drops = load_msp_improv(msp, transcripts=table)
    assert [(s.key, s.text) for s in segments] == [("MSP-IMPROV-S01A-F01-S-FM01", "From the table."),
                                                    ("MSP-IMPROV-S04S-F04-S-FM01", "Semicolon form")]
    assert drops["missing_transcript"] == 3  # the other S recordings of classes A/H/N/S with a video
    table.write_text("MSP-IMPROV-S01A-F01-S-FM01 no separator\n")
    with pytest.raises(CorpusError, match="texts.tsv:1"):
        load_msp_improv(msp, transcripts=table)
    for path in msp.rglob("*.txt"):
        if path.name != "Evaluation.txt":
            path.unlink()
    with pytest.raises(CorpusError, match="no transcripts in .*pass transcripts=PATH"):
        load_msp_improv(msp)


def test_csv_manifest(tmp_path: Path) -> None:
    (tmp_path / "media").mkdir()
    (tmp_path / "media" / "a.mp4").touch()
    (tmp_path / "media" / "b.wav").touch()
    outside = tmp_path.parent / f"{tmp_path.name}_abs.mp4"
    outside.touch()
    (tmp_path / "set.v1.csv").write_text(
        "path,start,end,text,label,speaker,session\n"
        "media/a.mp4,1.5,4,\"Hi,  there\",ang,spk1,2\n"
        "media/b.wav,0,2.5,,Happy,,\n"
        f"{outside},3,5,Fine.,neutral,spk2,1\n"
        "media/a.mp4,5,9,Bye.,SAD,spk1,2\n")
    segments, drops = load_csv(tmp_path / "set.v1.csv")
    assert drops == Counter()
    got = [(s.key, s.video, s.audio_path, s.start, s.end, s.text, s.label, s.speaker, s.session) for s in segments]
    assert got == [
        ("set_v1_0000", str(tmp_path / "media/a.mp4"), None, 1.5, 4.0, "Hi, there", ANGER, "spk1", 2),
        ("set_v1_0001", None, str(tmp_path / "media/b.wav"), 0.0, 2.5, "", HAPPINESS, None, None),
        ("set_v1_0002", str(outside), None, 3.0, 5.0, "Fine.", NEUTRAL, "spk2", 1),
        ("set_v1_0003", str(tmp_path / "media/a.mp4"), None, 5.0, 9.0, "Bye.", SADNESS, "spk1", 2),
    ]


@pytest.mark.parametrize(
    ("row", "message"),
    [
        ("media/a.mp4,1,2,x,fru,s,1", "unknown label 'fru'"),
        ("media/a.mp4,3,2,x,ang,s,1", "start < end"),
        ("media/a.mp4,one,2,x,ang,s,1", "could not convert"),
        ("media/gone.mp4,1,2,x,ang,s,1", "not found"),
        ("media/a.mp4,1,2,x,ang,s,first", "invalid literal"),
        ("media/a.m4a,1,2,x,ang,s,1", "a.m4a'.*soundfile cannot read .m4a audio"),
    ],
)
def test_csv_bad_row_names_file_and_line(tmp_path: Path, row: str, message: str) -> None:
    (tmp_path / "media").mkdir()
    (tmp_path / "media" / "a.mp4").touch()
    (tmp_path / "media" / "a.m4a").touch()
    path = tmp_path / "m.csv"
    path.write_text(f"path,start,end,text,label,speaker,session\nmedia/a.mp4,0,1,ok,neu,s,1\n{row}\n")
    with pytest.raises(CorpusError, match=rf"m\.csv:3: .*{message}"):
        load_csv(path)


def test_csv_missing_column(tmp_path: Path) -> None:
    (tmp_path / "m.csv").write_text("path,start,text\n")
    with pytest.raises(CorpusError, match=r"m\.csv: missing column\(s\) end, label"):
        load_csv(tmp_path / "m.csv")


def test_load_labeled_dispatches_by_layout(iemocap: Path, msp: Path, tmp_path: Path) -> None:
    assert load_labeled(iemocap)[0][0].key == "Ses01F_impro01_F000"
    assert len(load_labeled(iemocap, merge_excited=False)[0]) == 6
    assert load_labeled(msp)[0][0].key == "MSP-IMPROV-S01A-F01-S-FM01"
    (tmp_path / "x.csv").write_text("path,start,end,label\n")
    assert load_labeled(tmp_path / "x.csv") == ([], Counter())
    (tmp_path / "empty").mkdir()
    with pytest.raises(CorpusError, match="empty: not a labeled corpus"):
        load_labeled(tmp_path / "empty")


def test_synth_iemocap_matches_ground_truth(synth_corpus: Path) -> None:
    root = synth_corpus
    segments, drops = load_iemocap(root / "iemocap")
    turns = [t for path in sorted((root / "ground_truth" / "iemocap").glob("*.json"))
             for t in json.loads(path.read_text())["turns"]]
    expected = {t["name"]: t for t in turns if t["label"] in ("neu", "hap", "exc", "sad", "ang")}
    assert {s.key for s in segments} == set(expected)
    for s in segments:
        turn = expected[s.key]
        session = int(s.key[3:5])
        assert (s.start, s.end, s.session) == (turn["start"], turn["end"], session)
        assert s.label == CLASSES.index({"neu": "neutral", "hap": "happiness", "exc": "happiness",
                                         "sad": "sadness", "ang": "anger"}[turn["label"]])
        assert s.speaker == f"Ses{session:02d}{turn['gender']}" and s.text == " ".join(turn["text"].split())
        assert Path(s.video).is_file() and Path(s.audio_path).is_file()
    others = Counter(f"label:{t['label']}" for t in turns if t["name"] not in expected)
    assert drops == others and len(others) == 6  # fru sur fea dis oth xxx all appear


def test_synth_msp_improv_matches_ground_truth(synth_corpus: Path) -> None:
    root = synth_corpus
    segments, drops = load_msp_improv(root / "msp_improv")
    truths = {p.stem: json.loads(p.read_text()) for p in sorted((root / "ground_truth" / "msp_improv").glob("*.json"))}
    expected = {name: t for name, t in truths.items() if t["type"] == "S" and t["label"] in "AHNS"}
    assert [s.key for s in segments] == sorted(expected)  # Evaluation.txt lists recordings by name
    for s in segments:
        truth = expected[s.key]
        assert s.label == "AHNS".index(truth["label"]) and s.speaker == truth["speaker"] == s.key.split("-")[3]
        assert s.session == int(truth["speaker"][1:]) and s.text == " ".join(truth["text"].split())
        assert s.video == str(root / truth["video"]) and s.audio_path == str(Path(s.video).with_suffix(".wav"))
        assert s.start == 0.0 and abs(s.end - truth["duration"]) < 0.05
    others = Counter(f"type:{t['type']}" if t["type"] != "S" else f"label:{t['label']}"
                     for name, t in truths.items() if name not in expected)
    assert drops == others and {"label:O", "label:X", "type:R", "type:P", "type:T"} <= set(drops)
