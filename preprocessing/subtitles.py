"""Subtitle cues from .srt, .vtt and .ass/.ssa files or a video's embedded subtitle stream.

Every reader returns `Cue`s with cleaned text (markup, ASS override tags and speaker dashes removed,
lines joined with spaces). Malformed input raises `SubtitleError` naming the file and line.
"""

from __future__ import annotations

import html
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path


class SubtitleError(ValueError):
    """A subtitle file or stream could not be parsed; the message names the file."""


@dataclass(frozen=True)
class Cue:
    start: float  # seconds
    end: float  # seconds
    text: str  # cleaned; may be empty (the segmenter drops those)


SUFFIXES = (".srt", ".vtt", ".ass", ".ssa")

# SRT uses a comma before the milliseconds; many files in the wild use a dot. Hours may exceed 2 digits.
_SRT_TIME = r"(\d+):(\d{1,2}):(\d{1,2})[,.](\d{1,3})"
_SRT_TIMING = re.compile(rf"^{_SRT_TIME}\s*-->\s*{_SRT_TIME}(?:\s.*)?$")  # trailing X1:.. coordinates allowed
_VTT_TIME = r"(?:(\d+):)?(\d{2}):(\d{2})\.(\d{3})"
_VTT_TIMING = re.compile(rf"^{_VTT_TIME}[ \t]+-->[ \t]+{_VTT_TIME}(?:[ \t].*)?$")  # cue settings follow
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


def read_subtitles(path: str | Path) -> list[Cue]:
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
        return data.decode("utf-16")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError:
        return data.decode("cp1252", errors="replace")


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
            current.append(line.rstrip())
        else:
            current = []
    return blocks


def _cue(source: str, line: int, start: float, end: float, lines: list[str]) -> Cue:
    if end < start:
        raise SubtitleError(f"{source}:{line}: cue ends ({end:.3f} s) before it starts ({start:.3f} s)")
    return Cue(start, end, clean_text("\n".join(lines)))


def parse_srt(text: str, source: str = "<srt>") -> list[Cue]:
    """SubRip cues; `source` names the file in errors."""
    cues: list[Cue] = []
    blocks = _blocks(text)
    for b, (first, lines) in enumerate(blocks):
        # A cue number alone, its timing line after a blank line: it is that cue's id, not the previous cue's text.
        following = blocks[b + 1][1][0].strip() if b + 1 < len(blocks) else ""
        if len(lines) == 1 and lines[0].strip().isdigit() and _SRT_TIMING.match(following):
            continue
        timings = [i for i, line in enumerate(lines) if _SRT_TIMING.match(line.strip())]
        # A cue starts at its number, or at its timing line; files that skip the blank line between
        # cues put the next number and timing right after the previous text.
        starts = [i - 1 if i > 0 and lines[i - 1].strip().isdigit() else i for i in timings]
        lead = lines[: starts[0]] if starts else lines
        if lead:
            bad = next((i for i, line in enumerate(lead) if "-->" in line), None)
            numbered = lead[0].strip().isdigit() and len(lead) > 1
            if bad is not None or numbered or not cues:
                at = bad if bad is not None else int(numbered)
                raise SubtitleError(f"{source}:{first + at}: expected a timing line "
                                    f"'HH:MM:SS,mmm --> HH:MM:SS,mmm', got {lead[at].strip()!r}")
            # Text after a blank line inside a cue: players show it with that cue, so do we.
            last = cues.pop()
            cues.append(Cue(last.start, last.end, clean_text(last.text + "\n" + "\n".join(lead))))
        for k, at in enumerate(timings):
            h1, m1, s1, ms1, h2, m2, s2, ms2 = _SRT_TIMING.match(lines[at].strip()).groups()
            stop = starts[k + 1] if k + 1 < len(starts) else len(lines)
            # Short fields are whole milliseconds (",5" is 5 ms), as ffmpeg and VLC read them.
            start, end = _seconds(h1, m1, s1, ms1.zfill(3)), _seconds(h2, m2, s2, ms2.zfill(3))
            cues.append(_cue(source, first + at, start, end, lines[at + 1 : stop]))
    return cues


def parse_vtt(text: str, source: str = "<vtt>") -> list[Cue]:
    """WebVTT cues (cue ids, cue settings, NOTE / STYLE / REGION blocks handled); `source` names the file."""
    blocks = _blocks(text)
    if not blocks or not re.match(r"^WEBVTT(?:[ \t].*)?$", blocks[0][1][0]):
        raise SubtitleError(f"{source}:1: a WebVTT file must start with 'WEBVTT'")
    cues: list[Cue] = []
    for first, lines in blocks[1:]:
        if re.match(r"^(NOTE|STYLE|REGION)(?:[ \t]|$)", lines[0]):
            continue
        head = 0 if "-->" in lines[0] else 1  # the line before the timing line is an optional cue id
        timing = _VTT_TIMING.match(lines[head].strip()) if head < len(lines) else None
        if timing is None:
            got = lines[head].strip() if head < len(lines) else lines[0].strip()
            raise SubtitleError(f"{source}:{first + head}: expected a timing line "
                                f"'[HH:]MM:SS.mmm --> [HH:]MM:SS.mmm [settings]', got {got!r}")
        g = timing.groups()
        cues.append(_cue(source, first + head, _seconds(*g[:4]), _seconds(*g[4:]), lines[head + 1:]))
    return cues


def parse_ass(text: str, source: str = "<ass>") -> list[Cue]:
    """Dialogue lines of the [Events] section of an ASS/SSA script, read through its Format line."""
    section, fields, cues = "", None, []
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
            if fields is None:
                raise SubtitleError(f"{source}:{number}: Dialogue line before the [Events] Format line")
            values = value.split(",", len(fields) - 1)  # Text is last and may contain commas
            if len(values) != len(fields):
                raise SubtitleError(f"{source}:{number}: Dialogue has {len(values)} fields, Format names {len(fields)}")
            row = dict(zip(fields, values))
            start, end = _ass_time(row["start"], source, number), _ass_time(row["end"], source, number)
            cues.append(_cue(source, number, start, end, [_ass_plain(row["text"])]))
    if fields is None:
        raise SubtitleError(f"{source}: no [Events] section with a Format line")
    return cues


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


def embedded_subtitles(video: str | Path, stream: int = 0) -> list[Cue] | None:
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
