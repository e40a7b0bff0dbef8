"""Subtitle parsing (SRT, WebVTT, ASS/SSA, embedded streams) and cue -> segment filtering and keys."""

from __future__ import annotations

import json
import logging
import subprocess
from collections import Counter
from pathlib import Path

import imageio_ffmpeg
import pytest

from preprocessing.config import SegmentConfig
from preprocessing.segments import find_sidecar, segments_from_video
from preprocessing.subtitles import Cue, SubtitleError, Subtitles, clean_text, embedded_subtitles, parse_srt, read_subtitles

SRT = """\ufeff1
00:00:01,000 --> 00:00:03,500
<i>- Where were you?</i>
- <font color="#ffff00">Out.</font>

2
00:00:04,000 --> 00:00:06,250 X1:100 X2:200 Y1:10 Y2:20
{\\an8}Two  lines
  of text &amp; more
3
00:00:07.5 --> 00:00:09,000
Missing blank line before this cue.

and a stray paragraph

10
01:02:03,004 --> 01:02:04,000
-Dash without space
"""


def write(folder: Path, name: str, text: str, encoding: str = "utf-8") -> Path:
    path = folder / name
    path.write_bytes(text.encode(encoding))
    return path


def test_srt_markup_dashes_multiline_and_timing(tmp_path: Path) -> None:
    subtitles = read_subtitles(write(tmp_path, "a.srt", SRT))
    assert subtitles.skipped == []
    assert subtitles.cues == [
        Cue(1.0, 3.5, "Where were you? Out."),
        Cue(4.0, 6.25, "Two lines of text & more"),
        Cue(7.005, 9.0, "Missing blank line before this cue. and a stray paragraph"),  # ".5" is 5 ms, as in ffmpeg
        Cue(3723.004, 3724.0, "Dash without space"),
    ]


def test_srt_cue_number_alone_before_its_timing_line_is_the_id() -> None:
    srt = "1\n\n00:00:01,000 --> 00:00:03,000\nHi\n\n2\n\n00:00:04,000 --> 00:00:05,000\nThere\n"
    assert parse_srt(srt).cues == [Cue(1.0, 3.0, "Hi"), Cue(4.0, 5.0, "There")]
    # A number paragraph with no timing line after it is still the cue's text.
    assert parse_srt("1\n00:00:01,000 --> 00:00:03,000\nThe answer is\n\n42\n").cues == [Cue(1.0, 3.0, "The answer is 42")]


def test_legacy_encodings_are_decoded(tmp_path: Path) -> None:
    body = "1\n00:00:01,000 --> 00:00:02,000\nCafé – déjà vu\n"
    for encoding in ("cp1252", "utf-16"):
        assert read_subtitles(write(tmp_path, f"{encoding}.srt", body, encoding)).cues[0].text == "Café – déjà vu"


def test_clean_text_keeps_literal_angle_brackets_from_entities() -> None:
    assert clean_text("<b>I &lt;3 you</b>\n\u2014 <v Bob>Me&nbsp;too</v>") == "I <3 you Me too"
    assert clean_text("I <3 you, and 2 > 1") == "I <3 you, and 2 > 1"  # raw brackets that open no tag are text
    assert clean_text("<c.yellow>Hi</c> <00:00:01.500>there<i>!</i>") == "Hi there!"


VTT = """WEBVTT - captions
Kind: captions

NOTE This file has
a two-line note --> with an arrow-like thing

STYLE
::cue { color: yellow }

intro-1
00:01.000 --> 00:03.000 align:start position:10% line:0
<v Anna><i>- Hi.</i></v>
<v Ben>- Hello &amp; welcome.</v>

01:00:00.250 --> 01:00:02.000
<c.loud>Multi</c>
line
"""


def test_vtt_ids_settings_notes_and_voice_tags(tmp_path: Path) -> None:
    cues = read_subtitles(write(tmp_path, "a.vtt", VTT)).cues
    assert cues == [Cue(1.0, 3.0, "Hi. Hello & welcome."), Cue(3600.25, 3602.0, "Multi line")]


ASS = """[Script Info]
ScriptType: v4.00+

[V4+ Styles]
Format: Name, Fontname, Fontsize
Style: Default,Arial,16

[Events]
Format: Layer, Style, Start, End, Name, MarginL, MarginR, MarginV, Effect, Text
Dialogue: 0,Default,0:00:05.00,0:00:07.50,Bob,0,0,0,,{\\an8}{\\i1}Well,{\\i0} hello\\Nthere, friend
Comment: 0,Default,0:00:01.00,0:00:02.00,,0,0,0,,not shown
Dialogue: 0,Default,0:00:01.00,0:00:03.05,,0,0,0,,- First{\\b1}!{\\b0}\\N- Second.
Dialogue: 0,Default,0:00:08.00,0:00:09.00,,0,0,0,,{\\p1}m 0 0 l 10 0 10 10{\\p0}Sign\\htext
"""


def test_ass_format_line_override_tags_and_line_breaks(tmp_path: Path) -> None:
    cues = read_subtitles(write(tmp_path, "a.ass", ASS)).cues
    assert cues == [
        Cue(5.0, 7.5, "Well, hello there, friend"),
        Cue(1.0, 3.05, "First! Second."),
        Cue(8.0, 9.0, "Sign text"),
    ]


def test_ssa_v4_marked_field(tmp_path: Path) -> None:
    ssa = "[Events]\nFormat: Marked, Start, End, Style, Name, MarginL, MarginR, MarginV, Effect, Text\n" \
          "Dialogue: Marked=0,0:00:02.00,0:00:04.00,*Default,NTP,0000,0000,0000,,Old style\n"
    assert read_subtitles(write(tmp_path, "a.ssa", ssa)).cues == [Cue(2.0, 4.0, "Old style")]


GOOD = ["1\n00:00:01,000 --> 00:00:02,000\nOne\n", "2\n00:00:03,000 --> 00:00:04,000\nTwo\n",
        "3\n00:00:05,000 --> 00:00:06,000\nThree\n"]
THREE = [Cue(1.0, 2.0, "One"), Cue(3.0, 4.0, "Two"), Cue(5.0, 6.0, "Three")]


@pytest.mark.parametrize(
    ("name", "data"),
    [
        ("dot_millis", "\n".join(GOOD).replace(",", ".").encode()),
        ("utf8_bom", b"\xef\xbb\xbf" + "\n".join(GOOD).encode()),
        ("utf16_le_bom", "\n".join(GOOD).encode("utf-16-le").join([b"\xff\xfe", b""])),
        ("utf16_be_bom", "\n".join(GOOD).encode("utf-16-be").join([b"\xfe\xff", b""])),
        ("numbering_gaps", "\n".join(GOOD).replace("2\n", "17\n").replace("3\n", "4\n").encode()),
        ("no_blank_lines", "".join(GOOD).encode()),
        ("bom_mid_file", ("\n".join(GOOD[:2]) + "\n\ufeff" + GOOD[2]).encode()),  # files joined after the fact
        ("crlf", "\n".join(GOOD).replace("\n", "\r\n").encode()),
    ],
)
def test_messy_srt_files_read_in_full(tmp_path: Path, name: str, data: bytes) -> None:
    path = tmp_path / f"{name}.srt"
    path.write_bytes(data)
    assert read_subtitles(path) == Subtitles(THREE, [])


def test_a_utf16_file_cut_mid_character_reads_up_to_the_cut(tmp_path: Path) -> None:
    path = tmp_path / "cut.srt"
    path.write_bytes(("\ufeff" + "\n".join(GOOD)).encode("utf-16-le") + b"\n")
    cues = read_subtitles(path).cues
    assert cues[:2] == THREE[:2] and cues[2].text.startswith("Three")


def test_messy_vtt_and_ass_files_read_in_full(tmp_path: Path) -> None:
    vtt = "WEBVTT\n00:01,000 --> 00:02,000\nOne\n3\n00:00:03.000 --> 00:00:04.000\nTwo\nlast\n00:05.000 --> 00:06.000\nThree\n"
    # A comma before the milliseconds, the header and cues not separated by blank lines, ids or none.
    assert read_subtitles(write(tmp_path, "a.vtt", vtt, "utf-16")) == Subtitles(
        [Cue(1.0, 2.0, "One"), Cue(3.0, 4.0, "Two last"), Cue(5.0, 6.0, "Three")], [])
    ass = "\ufeff[Events]\nFormat: Start, End, Text\nDialogue: 0:00:01.00,0:00:02.00,One\n"
    assert read_subtitles(write(tmp_path, "a.ass", ass)) == Subtitles([Cue(1.0, 2.0, "One")], [])


def _broken_srt(second: str) -> str:
    return GOOD[0] + "\n" + second + "\n" + GOOD[2]


@pytest.mark.parametrize(
    ("name", "text", "line", "why"),
    [
        ("arrow.srt", _broken_srt("2\n00:00:03,000 -> 00:00:04,000\nTwo\n"), 6, "expected a timing line"),
        ("hours.srt", _broken_srt("2\n00:00:03 --> 00:00:04,000\nTwo\n"), 6, "expected a timing line"),
        ("backwards.srt", _broken_srt("2\n00:00:04,000 --> 00:00:03,000\nTwo\n"), 6, "before it starts"),
        ("no_timing.srt", _broken_srt("2\nTwo\n"), 6, "got 'Two'"),
        # The skipped cue's text after a blank line inside it is skipped with it, not added to cue 1.
        ("stray_text.srt", _broken_srt("2\n00:00:03,000 -> 00:00:04,000\nTwo\n\nand more\n"), 6, "expected a timing line"),
        ("no_blanks.srt", GOOD[0] + "2\n00:00:03,000 - 00:00:04,000\nTwo\n" + GOOD[2], 5, "expected a timing line"),
        ("number_apart.srt", GOOD[0] + "\n2\n\n00:00:03,000 -> 00:00:04,000\nTwo\n\n" + GOOD[2], 7, "expected a timing"),
        ("text_first.srt", "Subtitles by nobody\n\n" + GOOD[0] + "\n" + GOOD[2], 1, "got 'Subtitles by nobody'"),
        ("bad.vtt", "WEBVTT\n\n00:01.000 --> 00:02.000\nOne\n\nid\n00:03.000 -> 00:04.000\nTwo\n\n"
                    "00:05.000 --> 00:06.000\nThree\n", 7, "expected a timing line"),
        ("stray.vtt", "WEBVTT\n\n00:01.000 --> 00:02.000\nOne\n\nTwo\nwithout a time\n\n00:05.000 --> 00:06.000\nThree\n",
         7, "got 'without a time'"),
        ("bad_time.ass", "[Events]\nFormat: Start, End, Text\nDialogue: 0:00:01.00,0:00:02.00,One\n"
                         "Dialogue: 0:00:03,0:00:x4.00,Two\nDialogue: 0:00:05.00,0:00:06.00,Three\n", 4, "bad time"),
        ("short.ass", "[Events]\nFormat: Start, End, Text\nDialogue: 0:00:01.00,0:00:02.00,One\n"
                      "Dialogue: 0:00:03.00\nDialogue: 0:00:05.00,0:00:06.00,Three\n", 4, "Dialogue has 1 fields"),
        ("early.ass", "[Events]\nDialogue: 0:00:03.00,0:00:04.00,Two\nFormat: Start, End, Text\n"
                      "Dialogue: 0:00:01.00,0:00:02.00,One\nDialogue: 0:00:05.00,0:00:06.00,Three\n", 2, "before the"),
    ],
)
def test_a_malformed_cue_is_skipped_with_a_warning_naming_file_and_line(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, name: str, text: str, line: int, why: str
) -> None:
    path = write(tmp_path, name, text)
    with caplog.at_level(logging.WARNING, logger="preprocessing.subtitles"):
        subtitles = read_subtitles(path)
    assert subtitles.cues == [THREE[0], THREE[2]]
    assert len(subtitles.skipped) == 1 and subtitles.skipped[0].startswith(f"{path}:{line}: ") and why in subtitles.skipped[0]
    assert [r.getMessage() for r in caplog.records] == [f"skipped a malformed subtitle cue: {subtitles.skipped[0]}"]


def test_skipped_cues_are_counted_per_video(tmp_path: Path) -> None:
    write(tmp_path, "ep.srt", _broken_srt("2\n00:00:03,000 -> 00:00:04,000\nTwo\n\n5\n00:00:09 --> 00:00:10\nFive\n"))
    (tmp_path / "ep.mp4").touch()
    counts: Counter[str] = Counter()
    segments = segments_from_video(tmp_path / "ep.mp4", SegmentConfig(min_seconds=0.5), counts=counts)
    assert [s.text for s in segments] == ["One", "Three"]
    assert counts == {"skipped_malformed_cue": 2}


@pytest.mark.parametrize(
    ("name", "text", "where"),
    [
        ("bad_timing.srt", "1\n00:00:01,000 -> 00:00:02,000\nHi\n", "bad_timing.srt:2"),
        ("no_timing.srt", "Just some text\n", "no_timing.srt:1"),
        ("all_broken.srt", GOOD[0].replace(",", ";") + "\n" + GOOD[1].replace("-->", "->") + "\n" + GOOD[2][4:],
         "all_broken.srt:2"),
        ("backwards.srt", "1\n00:00:05,000 --> 00:00:02,000\nHi\n", "backwards.srt:2"),
        ("no_header.vtt", "00:01.000 --> 00:02.000\nHi\n", "no_header.vtt:1"),
        ("bad_cue.vtt", "WEBVTT\n\nid\nnot a timing\n", "bad_cue.vtt:4"),
        ("no_events.ass", "[Script Info]\nTitle: x\n", "no_events.ass"),
        ("early.ass", "[Events]\nDialogue: 0,0:00:01.00,0:00:02.00,D,,0,0,0,,Hi\n", "early.ass:2"),
        ("bad_time.ass", "[Events]\nFormat: Start, End, Text\nDialogue: 1.5,0:00:02.00,Hi\n", "bad_time.ass:3"),
        ("short.ass", "[Events]\nFormat: Layer, Start, End, Text\nDialogue: 0,0:00:01.00\n", "short.ass:3"),
        ("bad_format.ass", "[Events]\nFormat: Start, Text, End\nDialogue: 0:00:01.00,Hi,0:00:02.00\n", "bad_format.ass:2"),
        ("unknown.sub", "{1}{2}Hi\n", "unknown.sub"),
    ],
)
def test_a_file_without_one_good_cue_raises_naming_the_file(tmp_path: Path, name: str, text: str, where: str) -> None:
    with pytest.raises(SubtitleError) as info:
        read_subtitles(write(tmp_path, name, text))
    assert f"{tmp_path / where}" in str(info.value)


def test_every_cue_broken_names_the_count_and_the_first_problem(tmp_path: Path) -> None:
    path = write(tmp_path, "all.srt", "".join(g.replace("-->", "->") for g in GOOD))
    with pytest.raises(SubtitleError, match=r"all\.srt: no readable cue, 3 malformed; the first: .*all\.srt:2: expected"):
        read_subtitles(path)


EMBEDDED = """1
00:00:01,000 --> 00:00:03,500
<i>- Where were you?</i>
- Out.

2
00:00:04,000 --> 00:00:04,400
Too short.

3
00:00:05,000 --> 00:00:08,250
Two
lines.
"""


def encode(out: Path, seconds: float, srt: Path | None = None) -> Path:
    """A tiny black H.264 mp4, with `srt` muxed in as a mov_text stream when given."""
    cmd = [imageio_ffmpeg.get_ffmpeg_exe(), "-nostdin", "-v", "error", "-y", "-f", "lavfi",
           "-i", f"color=c=black:s=32x32:r=5:d={seconds}"]
    if srt is not None:
        cmd += ["-i", str(srt), "-map", "0:v", "-map", "1:s", "-c:s", "mov_text"]
    subprocess.run(cmd + ["-c:v", "libx264", "-pix_fmt", "yuv420p", str(out)], check=True)
    return out


@pytest.fixture(scope="module")
def videos(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("videos")
    srt = write(folder, "source.txt", EMBEDDED)  # not beside the videos: only the embedded copy counts
    return {
        "embedded": encode(folder / "movie.2010.x264.mp4", 12, srt),
        "plain": encode(folder / "plain.mp4", 1),
    }


def test_embedded_stream_is_extracted(videos: dict[str, Path]) -> None:
    cues = embedded_subtitles(videos["embedded"]).cues
    assert cues == [Cue(1.0, 3.5, "Where were you? Out."), Cue(4.0, 4.4, "Too short."), Cue(5.0, 8.25, "Two lines.")]


def test_video_without_subtitle_stream(videos: dict[str, Path], tmp_path: Path) -> None:
    assert embedded_subtitles(videos["plain"]) is None
    counts: Counter[str] = Counter()
    assert segments_from_video(videos["plain"], SegmentConfig(), counts=counts) == []
    assert counts == {"no_subtitles": 1}
    with pytest.raises(SubtitleError, match="missing.mp4"):
        embedded_subtitles(tmp_path / "missing.mp4")


def test_segments_from_embedded_stream_have_dot_free_stable_keys(videos: dict[str, Path]) -> None:
    first = segments_from_video(videos["embedded"], SegmentConfig())
    again = segments_from_video(videos["embedded"], SegmentConfig())
    assert first == again
    assert [(s.key, s.text) for s in first] == [("movie_2010_x264_0000", "Where were you? Out."),
                                                ("movie_2010_x264_0001", "Two lines.")]
    assert all(s.video == str(videos["embedded"]) for s in first)


def test_sidecar_preference_and_fallback(tmp_path: Path) -> None:
    video = tmp_path / "ep.01.mkv"
    video.touch()
    assert find_sidecar(video) is None
    for suffix in (".ssa", ".ass", ".vtt", ".srt"):
        write(tmp_path, f"ep.01{suffix}", "")
        assert find_sidecar(video) == tmp_path / f"ep.01{suffix}"  # each better format takes over
    write(tmp_path, "ep.01.srt", "1\n00:00:00,000 --> 00:00:02,000\nFrom the sidecar\n")
    assert [s.text for s in segments_from_video(video, SegmentConfig())] == ["From the sidecar"]


def test_filters_clipping_time_order_and_counts(tmp_path: Path) -> None:
    # ASS events need not be in time order; indices and keys follow time.
    events = [
        ("0:00:30.00", "0:00:45.00", "Long speech"),  # 15 s: clipped to 10 s
        ("0:00:01.10", "0:00:02.10", "Exactly one second"),
        ("0:00:03.00", "0:00:03.99", "Too short"),
        ("0:00:05.00", "0:00:07.00", "{\\i1}{\\i0}"),  # markup only: empty text
        ("0:00:08.00", "0:00:10.00", "- \\N- "),  # dashes only: empty text
        ("0:00:11.00", "0:00:13.00", "Kept"),
    ]
    lines = "".join(f"Dialogue: 0,{a},{b},Default,,0,0,0,,{t}\n" for a, b, t in events)
    fmt = "Format: Layer, Start, End, Style, Name, MarginL, MarginR, MarginV, Effect, Text\n"
    write(tmp_path, "show.ass", "[Events]\n" + fmt + lines)
    (tmp_path / "show.mp4").touch()
    counts: Counter[str] = Counter()
    segments = segments_from_video(tmp_path / "show.mp4", SegmentConfig(), video_id="tv/s01/show", counts=counts)
    assert [(s.index, s.key, s.start, s.end, s.text) for s in segments] == [
        (0, "tv_s01_show_0000", 1.1, 2.1, "Exactly one second"),
        (1, "tv_s01_show_0001", 11.0, 13.0, "Kept"),
        (2, "tv_s01_show_0002", 30.0, 40.0, "Long speech"),
    ]
    assert counts == {"dropped_too_short": 1, "dropped_empty_text": 2, "clipped": 1}
    relaxed = segments_from_video(tmp_path / "show.mp4", SegmentConfig(min_seconds=0.5, max_seconds=20.0))
    assert [s.text for s in relaxed] == ["Exactly one second", "Too short", "Kept", "Long speech"]
    assert relaxed[-1].end == 45.0


def test_synth_movies_match_ground_truth(synth_corpus: Path) -> None:
    root = synth_corpus
    truths = sorted((root / "ground_truth" / "movies").glob("*.json"))
    assert truths, f"no movie ground truth under {root}"
    formats: Counter[str] = Counter()
    for path in truths:
        truth = json.loads(path.read_text())
        formats[truth["subtitle_format"]] += 1
        counts: Counter[str] = Counter()
        segments = segments_from_video(root / truth["video"], SegmentConfig(), counts=counts)
        kept = [c for c in truth["cues"] if c["kept"]]
        assert [(s.start, s.end, s.text) for s in segments] == [(c["start"], c["end"], c["text"]) for c in kept], path
        dropped = Counter(c["drop_reason"] for c in truth["cues"] if not c["kept"])
        assert counts == Counter({"dropped_too_short": dropped["short"], "dropped_empty_text": dropped["empty"]}), path
    assert set(formats) == {"srt", "vtt", "ass", "mov_text"}, formats
