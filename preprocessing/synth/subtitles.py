"""Subtitle writers (SRT, WebVTT, ASS) with the markup real files carry: italics, {\\an8}, speaker dashes."""

from __future__ import annotations

from dataclasses import dataclass, field

WRAP = 36  # characters per subtitle line before wrapping onto a second line


@dataclass
class SubtitleCue:
    start: float
    end: float
    sentences: list[str] = field(default_factory=list)  # empty: a markup-only cue with no text
    italic: bool = False
    top: bool = False  # positioned at the top ({\an8} in SRT/ASS, line:0 in WebVTT)
    dashes: bool = False  # one "- " line per sentence (needs two sentences)

    @property
    def text(self) -> str:
        """The plain text a subtitle reader should recover."""
        return " ".join(self.sentences)

    def lines(self) -> list[str]:
        if self.dashes and len(self.sentences) > 1:
            return [f"- {s}" for s in self.sentences]
        text = self.text
        if len(text) <= WRAP:
            return [text]
        spaces = [i for i, ch in enumerate(text) if ch == " "]
        cut = min(spaces, key=lambda i: abs(i - len(text) / 2))
        return [text[:cut], text[cut + 1:]]


def _clock(t: float, sep: str, digits: int = 3) -> str:
    ms = int(round(t * 1000))
    h, rest = divmod(ms, 3_600_000)
    m, rest = divmod(rest, 60_000)
    s, ms = divmod(rest, 1000)
    if digits == 2:
        return f"{h:d}:{m:02d}:{s:02d}.{ms // 10:02d}"
    return f"{h:02d}:{m:02d}:{s:02d}{sep}{ms:03d}"


def _html_body(cue: SubtitleCue, top_tag: bool) -> str:
    body = "\n".join(cue.lines()) if cue.sentences else ""
    if cue.italic or not cue.sentences:
        body = f"<i>{body}</i>"
    if cue.top and top_tag:
        body = "{\\an8}" + body
    return body


def to_srt(cues: list[SubtitleCue]) -> str:
    """SubRip text."""
    blocks = [f"{i}\n{_clock(c.start, ',')} --> {_clock(c.end, ',')}\n{_html_body(c, True)}\n"
              for i, c in enumerate(cues, 1)]
    return "\n".join(blocks)


def to_vtt(cues: list[SubtitleCue]) -> str:
    """WebVTT text (positioning goes into the cue settings, not the payload)."""
    blocks = ["WEBVTT\n"]
    for c in cues:
        settings = " line:0" if c.top else ""
        blocks.append(f"{_clock(c.start, '.')} --> {_clock(c.end, '.')}{settings}\n{_html_body(c, False)}\n")
    return "\n".join(blocks)


ASS_HEADER = """[Script Info]
ScriptType: v4.00+
PlayResX: {width}
PlayResY: {height}
WrapStyle: 0

[V4+ Styles]
Format: Name, Fontname, Fontsize, PrimaryColour, SecondaryColour, OutlineColour, BackColour, Bold, Italic, \
Underline, StrikeOut, ScaleX, ScaleY, Spacing, Angle, BorderStyle, Outline, Shadow, Alignment, MarginL, MarginR, \
MarginV, Encoding
Style: Default,Arial,16,&H00FFFFFF,&H000000FF,&H00000000,&H00000000,0,0,0,0,100,100,0,0,1,1,0,2,10,10,10,1

[Events]
Format: Layer, Start, End, Style, Name, MarginL, MarginR, MarginV, Effect, Text
"""


def to_ass(cues: list[SubtitleCue], width: int, height: int) -> str:
    """Advanced SubStation Alpha text (override tags in braces, \\N line breaks)."""
    events = []
    for c in cues:
        body = "\\N".join(c.lines()) if c.sentences else ""
        if c.italic or not c.sentences:
            body = "{\\i1}" + body + "{\\i0}"
        if c.top:
            body = "{\\an8}" + body
        events.append(f"Dialogue: 0,{_clock(c.start, '.', 2)},{_clock(c.end, '.', 2)},Default,,0,0,0,,{body}\n")
    return ASS_HEADER.format(width=width, height=height) + "".join(events)
