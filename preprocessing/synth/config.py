"""Synthetic corpus config: seed, scale and how reliable each modality's emotion cue is."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Literal

from memobert.config import check

PARTS = ("movies", "iemocap", "msp_improv", "ferplus")


@dataclass
class SynthConfig:
    seed: int = 0
    scale: Literal["tiny", "small", "medium"] = "tiny"
    # Probability that a modality's cue shows the utterance's true class; otherwise it shows one of
    # the other three classes. At 0.7 each no single modality suffices and fusing all three helps.
    text_reliability: float = 0.7
    audio_reliability: float = 0.7
    face_reliability: float = 0.7
    # The silent face shows a random expression during this share of the other face's cues, so a
    # pipeline that picks the wrong face gets noise, not the answer.
    listener_expression_prob: float = 0.5
    # Draws this many times the scale's labeled part (IEMOCAP dialogs, MSP-IMPROV utterances per speaker)
    # beside the same movies and FER+: tells a model short of labels from one short of pretraining.
    labeled_scale: int = 1
    parts: list[str] = field(default_factory=lambda: list(PARTS))

    def validate(self) -> None:
        check(self.seed >= 0, "seed", "must be >= 0")
        check(self.labeled_scale >= 1, "labeled_scale", "must be >= 1")
        for key in ("text_reliability", "audio_reliability", "face_reliability", "listener_expression_prob"):
            check(0.0 <= getattr(self, key) <= 1.0, key, "must be in [0, 1]")
        unknown = [p for p in self.parts if p not in PARTS]
        check(not unknown, "parts", f"unknown parts {unknown} (known: {', '.join(PARTS)})")
        check(len(self.parts) > 0, "parts", "must name at least one part")


@dataclass(frozen=True)
class Sizes:
    """How much of each part a scale generates."""

    movies: int
    movie_seconds: tuple[float, float]
    iemocap_dialogs: tuple[int, int, int, int, int]  # per session; alternating impro / script
    iemocap_turns: tuple[int, int]
    msp_per_speaker: int
    ferplus_rows: int

    def labeled_times(self, times: int) -> Sizes:
        """These sizes with `times` the labeled part: IEMOCAP dialogs per session, MSP-IMPROV utterances per speaker."""
        return replace(self, iemocap_dialogs=tuple(n * times for n in self.iemocap_dialogs),
                       msp_per_speaker=self.msp_per_speaker * times)


SIZES: dict[str, Sizes] = {
    # tiny: the test suite's corpus, generated in well under a minute on two cores.
    "tiny": Sizes(movies=7, movie_seconds=(12.0, 16.0), iemocap_dialogs=(2, 1, 1, 1, 1),
                  iemocap_turns=(6, 8), msp_per_speaker=4, ferplus_rows=400),
    # small: the demo's. The labeled part (~450 turns, ~45 per speaker) makes a fold's test speaker more than a
    # handful of utterances (at ~12, one utterance moved UAR by several points); the movies stay short.
    "small": Sizes(movies=24, movie_seconds=(20.0, 40.0), iemocap_dialogs=(4, 4, 4, 4, 4),
                   iemocap_turns=(20, 30), msp_per_speaker=12, ferplus_rows=2000),
    # medium: more pretraining data (about 1,200 movie cues) beside the same ~500 IEMOCAP turns.
    "medium": Sizes(movies=100, movie_seconds=(40.0, 60.0), iemocap_dialogs=(4, 4, 4, 4, 4),
                    iemocap_turns=(20, 30), msp_per_speaker=30, ferplus_rows=8000),
}
