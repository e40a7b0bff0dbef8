"""Subtitle cues from .srt, .vtt and .ass/.ssa files or a video's embedded subtitle stream.

Every reader returns `Subtitles`: cues with cleaned text (markup, ASS override tags and speaker
dashes removed, lines joined with spaces), and the malformed cues it skipped, each logged as a
warning naming the file and line. A file whose every cue is malformed, or that is not a subtitle
file of its format at all, raises `SubtitleError` naming the file and line.
"""

from __future__ import annotations

import html
import logging
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)


class SubtitleError(ValueError):
    """A subtitle file or stream could not be parsed; the message names the file."""


@dataclass(frozen=True)
class Cue:
    start: float  # seconds
    end: float  # seconds
    text: str  # cleaned; may be empty (the segmenter drops those)


@dataclass
class Subtitles:
    """The cues of one file or stream, and a 'file:line: why' for each malformed cue left out."""

    cues: list[Cue]
    skipped: list[str]


SUFFIXES = (".srt", ".vtt", ".ass", ".ssa")

# SRT uses a comma before the milliseconds; many files in the wild use a dot. Hours may exceed 2 digits.
_SRT_TIME = r"(\d+):(\d{1,2}):(\d{1,2})[,.](\d{1,3})"
_SRT_TIMING = re.compile(rf"^{_SRT_TIME}\s*-->\s*{_SRT_TIME}(?:\s.*)?$")  # trailing X1:.. coordinates allowed
# WebVTT uses a dot; files converted from SRT often keep the comma, which players forgive too.
_VTT_TIME = r"(?:(\d+):)?(\d{2}):(\d{2})[.,](\d{3})"
_VTT_TIMING = re.compile(rf"^{_VTT_TIME}[ \t]+-->[ \t]+{_VTT_TIME}(?:[ \t].*)?$")  # cue settings follow
_SRT_EXPECTED = "'HH:MM:SS,mmm --> HH:MM:SS,mmm'"
_VTT_EXPECTED = "'[HH:]MM:SS.mmm --> [HH:]MM:SS.mmm [settings]'"
# A timing line, well formed or not: an arrow, or a line that opens with a time and holds another
# ("00:00:01,000 -> 00:00:02,000"). Such a line starts a cue, so a broken one costs that cue only.
_TIMING_LIKE = re.compile(r"-->|^\d+:\d+:\d+.*\d+:\d+:\d+")
_ASS_TIME = re.compile(r"^(\d+):(\d{1,2}):(\d{1,2})(?:\.(\d{1,3}))?$")
# <i>, </i>, <font color=..>, WebVTT <v Name>, <c.cls>, <00:00:01.000>; not "<3" or "2 > 1", which are text.
_TAG = re.compile(r"</?[A-Za-z][^<>]*>|<\d[\d:.]*>")
_ASS_OVERRIDE = re.compile(r"\{[^}]*\}")
_SPEAKER_DASH = re.compile(r"^[-\u2010-\u2015]+\s*")  # "- Hi." / "-Hi." / en and em dashes
_INVISIBLE = dict.fromkeys(map(ord, "\u200e\u200f\ufeff"))  # WebVTT &lrm; / &rlm;, stray BOMs


def clean_text(raw: str) -> str:
    """Markup and speaker dashes removed, lines joined with single spaces."""
    words = []
    for line in raw.splitlines():
        line = html.unescape(_ASS_OVERRIDE.sub("", _TAG.sub("", line)))  # unescape last: "&lt;3" stays text
        line = _SPEAKER_DASH.sub("", line.translate(_INVISIBLE).strip())
        words.extend(line.split())
    return " ".join(words)


def read_subtitles(path: str | Path) -> Subtitles:
    """Cues of a subtitle file, chosen by suffix (.srt, .vtt, .ass, .ssa), in file order."""
    path = Path(path)
    parsers = {".srt": parse_srt, ".vtt": parse_vtt, ".ass": parse_ass, ".ssa": parse_ass}
    parser = parsers.get(path.suffix.lower())
    if parser is None:
        raise SubtitleError(f"{path}: unknown subtitle format (known: {', '.join(SUFFIXES)})")
    try:
        data = path.read_bytes()
    except OSError as err:
        raise SubtitleError(f"{path}: cannot read: {err.strerror}") from err
    return parser(_decode(data), str(path))


def _decode(data: bytes) -> str:
    """Text of a subtitle file: UTF-8 (BOM or not), UTF-16 with a BOM, else Windows-1252 (old rips)."""
    if data[:2] in (b"\xff\xfe", b"\xfe\xff"):
        text = data.decode("utf-16", errors="replace")
    else:
        try:
            text = data.decode("utf-8-sig")
        except UnicodeDecodeError:
            text = data.decode("cp1252", errors="replace")
    return text.replace("\ufeff", "")  # files joined from several carry a BOM mid-file, before a cue number


def _seconds(h: str | None, m: str, s: str, frac: str | None) -> float:
    # frac is a decimal fraction: ASS centiseconds ".05" are 50 ms.
    return int(h or 0) * 3600 + int(m) * 60 + int(s) + (float("0." + frac) if frac else 0.0)


def _blocks(text: str) -> list[tuple[int, list[str]]]:
    """Blank-line separated blocks with the 1-based line number of each block's first line."""
    blocks: list[tuple[int, list[str]]] = []
    current: list[str] = []
    for number, line in enumerate(text.splitlines(), 1):
        if line.strip():
            if not current:
                blocks.append((number, current))
            current.append(line.strip())
        else:
            current = []
    return blocks


def _split_cues(lines: list[str]) -> tuple[list[str], list[tuple[int, list[str]]]]:
    """A block's lines before its first timing line, and (timing line index, text lines) per timing line.

    Files that skip the blank line between cues put the next cue's number and timing line right after
    the previous text: a number just before a timing line is that cue's id, not text.
    """
    heads = [i for i, line in enumerate(lines) if _TIMING_LIKE.search(line)]
    starts = [i - 1 if i > 0 and lines[i - 1].isdigit() else i for i in heads] + [len(lines)]
    return lines[: starts[0]], [(at, lines[at + 1 : stop]) for at, stop in zip(heads, starts[1:])]


def _timed_cue(source: str, line: int, timing_line: str, pattern: re.Pattern, expected: str, lines: list[str]) -> Cue:
    timing = pattern.match(timing_line)
    if timing is None:
        raise SubtitleError(f"{source}:{line}: expected a timing line {expected}, got {timing_line!r}")
    h1, m1, s1, ms1, h2, m2, s2, ms2 = timing.groups()
    # Short SRT fields are whole milliseconds (",5" is 5 ms), as ffmpeg and VLC read them.
    return _cue(source, line, _seconds(h1, m1, s1, ms1.zfill(3)), _seconds(h2, m2, s2, ms2.zfill(3)), lines)


def _cue(source: str, line: int, start: float, end: float, lines: list[str]) -> Cue:
    if end < start:
        raise SubtitleError(f"{source}:{line}: cue ends ({end:.3f} s) before it starts ({start:.3f} s)")
    return Cue(start, end, clean_text("\n".join(lines)))


def _finish(source: str, cues: list[Cue], skipped: list[str]) -> Subtitles:
    """Every parser's end: warn about each skipped cue; when none was good, fail on the first problem."""
    if skipped and not cues:
        raise SubtitleError(f"{source}: no readable cue, {len(skipped)} malformed; the first: {skipped[0]}")
    for problem in skipped:
        log.warning("skipped a malformed subtitle cue: %s", problem)
    return Subtitles(cues, skipped)


def parse_srt(text: str, source: str = "<srt>") -> Subtitles:
    """SubRip cues; a malformed cue is skipped and reported; `source` names the file in messages."""
    cues: list[Cue] = []
    skipped: list[str] = []
    last_skipped = False  # text after a blank line belongs to the cue above: kept or skipped with it
    blocks = _blocks(text)
    for b, (first, lines) in enumerate(blocks):
        # A cue number alone, its timing line after a blank line: it is that cue's id, not the previous cue's text.
        following = blocks[b + 1][1][0] if b + 1 < len(blocks) else ""
        if len(lines) == 1 and lines[0].isdigit() and _TIMING_LIKE.search(following):
            continue
        lead, timed = _split_cues(lines)
        numbered = len(lead) > 1 and lead[0].isdigit()
        # A numbered cue without a timing line, or text before any cue: a malformed cue.
        if numbered or (lead and not cues and not skipped):
            at = int(numbered)
            skipped.append(f"{source}:{first + at}: expected a timing line {_SRT_EXPECTED}, got {lead[at]!r}")
            last_skipped = True
        elif lead and not last_skipped:  # players show text after a blank line inside a cue with that cue, so do we
            last = cues.pop()
            cues.append(Cue(last.start, last.end, clean_text(last.text + "\n" + "\n".join(lead))))
        for at, cue_lines in timed:
            try:
                cues.append(_timed_cue(source, first + at, lines[at], _SRT_TIMING, _SRT_EXPECTED, cue_lines))
                last_skipped = False
            except SubtitleError as err:
                skipped.append(str(err))
                last_skipped = True
    return _finish(source, cues, skipped)


def parse_vtt(text: str, source: str = "<vtt>") -> Subtitles:
    """WebVTT cues (cue ids, cue settings, NOTE / STYLE / REGION blocks handled); a malformed cue is skipped."""
    blocks = _blocks(text)
    if not blocks or not re.match(r"^WEBVTT(?:[ \t].*)?$", blocks[0][1][0]):
        raise SubtitleError(f"{source}:1: a WebVTT file must start with 'WEBVTT'")
    cues: list[Cue] = []
    skipped: list[str] = []
    for b, (first, lines) in enumerate(blocks):
        if re.match(r"^(NOTE|STYLE|REGION)(?:[ \t]|$)", lines[0]):
            continue
        lead, timed = _split_cues(lines)
        # The header may run into the first cue when its blank line is missing. Elsewhere one line before
        # the timing line is the cue's id; more, or no timing line, is no cue.
        if b > 0 and (len(lead) > 1 or not timed):
            at = min(1, len(lead) - 1)
            skipped.append(f"{source}:{first + at}: expected a timing line {_VTT_EXPECTED}, got {lead[at]!r}")
        for at, cue_lines in timed:
            try:
                cues.append(_timed_cue(source, first + at, lines[at], _VTT_TIMING, _VTT_EXPECTED, cue_lines))
            except SubtitleError as err:
                skipped.append(str(err))
    return _finish(source, cues, skipped)


def parse_ass(text: str, source: str = "<ass>") -> Subtitles:
    """Dialogue lines of the [Events] section of an ASS/SSA script, read through its Format line."""
    section, fields = "", None
    cues: list[Cue] = []
    skipped: list[str] = []
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if line.startswith("[") and line.endswith("]"):
            section = line[1:-1].strip().lower()
            continue
        if section != "events" or ":" not in line:
            continue
        kind, _, value = line.partition(":")
        kind = kind.strip().lower()
        if kind == "format":
            fields = [f.strip().lower() for f in value.split(",")]
            missing = {"start", "end", "text"} - set(fields)
            if missing or fields[-1] != "text":
                raise SubtitleError(f"{source}:{number}: Format line must name Start, End and end with Text")
        elif kind == "dialogue":
            try:
                cues.append(_ass_dialogue(value, fields, source, number))
            except SubtitleError as err:
                skipped.append(str(err))
    if fields is None and not skipped:
        raise SubtitleError(f"{source}: no [Events] section with a Format line")
    return _finish(source, cues, skipped)


def _ass_dialogue(value: str, fields: list[str] | None, source: str, line: int) -> Cue:
    if fields is None:
        raise SubtitleError(f"{source}:{line}: Dialogue line before the [Events] Format line")
    values = value.split(",", len(fields) - 1)  # Text is last and may contain commas
    if len(values) != len(fields):
        raise SubtitleError(f"{source}:{line}: Dialogue has {len(values)} fields, Format names {len(fields)}")
    row = dict(zip(fields, values))
    start, end = _ass_time(row["start"], source, line), _ass_time(row["end"], source, line)
    return _cue(source, line, start, end, [_ass_plain(row["text"])])


def _ass_time(value: str, source: str, line: int) -> float:
    match = _ASS_TIME.match(value.strip())
    if match is None:
        raise SubtitleError(f"{source}:{line}: bad time {value.strip()!r} (expected H:MM:SS.cc)")
    return _seconds(*match.groups())


def _ass_plain(text: str) -> str:
    """ASS text with override blocks removed, \\N / \\n as line breaks, and vector drawings ({\\p1}..{\\p0}) dropped."""
    out, drawing = [], False
    for i, part in enumerate(re.split(r"(\{[^}]*\})", text)):
        if i % 2:  # an override block; \pN with N > 0 starts drawing commands, which are not text
            scale = re.search(r"\\p(\d+)", part)
            drawing = int(scale.group(1)) > 0 if scale else drawing
        elif not drawing:
            out.append(part)
    return "".join(out).replace("\\N", "\n").replace("\\n", "\n").replace("\\h", " ")


def embedded_subtitles(video: str | Path, stream: int = 0) -> Subtitles | None:
    """Cues of the video's `stream`-th subtitle stream via the ffmpeg binary; None when it has no such stream."""
    import imageio_ffmpeg  # deferred: only videos without a sidecar need ffmpeg

    cmd = [imageio_ffmpeg.get_ffmpeg_exe(), "-nostdin", "-v", "error", "-i", str(video),
           "-map", f"0:s:{stream}", "-f", "srt", "-"]
    proc = subprocess.run(cmd, capture_output=True, check=False)
    err = proc.stderr.decode(errors="replace")
    if proc.returncode != 0:
        if "matches no streams" in err:
            return None
        detail = " | ".join(err.strip().splitlines()[-3:]) or f"exit code {proc.returncode}"
        raise SubtitleError(f"{video}: cannot extract subtitle stream {stream} with ffmpeg: {detail}")
    return parse_srt(_decode(proc.stdout), f"{video} (subtitle stream {stream})")
