"""Cross-validation protocols: which speakers train, validate and test in each fold.

Model selection uses the validation speaker only; the test speaker is never looked at before the
final evaluation (the authors' "trnval" configs selected on the test speaker: optimistic). The one
exception is msp_improv_11to1, the authors' MSP-IMPROV protocol, offered for comparison with their table.
"""

from __future__ import annotations

from dataclasses import dataclass

IEMOCAP_SESSIONS = (1, 2, 3, 4, 5)
MSP_IMPROV_SESSIONS = (1, 2, 3, 4, 5, 6)
CLASSES = ("anger", "happiness", "neutral", "sadness")  # ids 0..3 in both corpora


@dataclass(frozen=True)
class Fold:
    index: int  # 1-based, as papers number folds
    train: tuple[str, ...]
    val: str
    test: str


def iemocap_speaker(session: int, gender: str) -> str:
    """IEMOCAP speaker id, e.g. Ses01F: the session and the gender letter of the turn's last part."""
    return f"Ses{session:02d}{gender}"


def msp_improv_speaker(session: int, gender: str) -> str:
    """MSP-IMPROV speaker id as in recording names (4th dash field), e.g. F01, M06."""
    return f"{gender}{session:02d}"


def _paired_folds(speaker_of, sessions: tuple[int, ...]) -> list[Fold]:
    everyone = [speaker_of(s, g) for s in sessions for g in ("F", "M")]
    folds = []
    for session in sessions:
        female, male = speaker_of(session, "F"), speaker_of(session, "M")
        for test, val in ((female, male), (male, female)):
            train = tuple(s for s in everyone if s not in (test, val))
            folds.append(Fold(index=len(folds) + 1, train=train, val=val, test=test))
    return folds


def iemocap_folds() -> list[Fold]:
    """10 folds, leave one session out: fold 2k-1 tests session k's F speaker (M validates), fold 2k swaps."""
    return _paired_folds(iemocap_speaker, IEMOCAP_SESSIONS)


def msp_improv_folds() -> list[Fold]:
    """12 folds, one per test speaker; the other speaker of the same session validates, 10 train."""
    return _paired_folds(msp_improv_speaker, MSP_IMPROV_SESSIONS)


def msp_improv_11to1_folds() -> list[Fold]:
    """The authors' 12 MSP-IMPROV folds: the other 11 speakers train, the test speaker also validates.

    Selection on the test speaker makes the scores optimistic (test-selected): not a clean estimate.
    """
    everyone = [msp_improv_speaker(s, g) for s in MSP_IMPROV_SESSIONS for g in ("F", "M")]
    return [Fold(index=fold.index, train=tuple(s for s in everyone if s != fold.test), val=fold.test, test=fold.test)
            for fold in msp_improv_folds()]


# Protocols whose model selection reads the test speaker; their tables say so in the title.
TEST_SELECTED = ("msp_improv_11to1",)


def folds_for(protocol: str) -> list[Fold]:
    """The folds of a protocol by name (iemocap | msp_improv | msp_improv_11to1)."""
    table = {"iemocap": iemocap_folds, "msp_improv": msp_improv_folds, "msp_improv_11to1": msp_improv_11to1_folds}
    if protocol not in table:
        raise ValueError(f"unknown protocol {protocol!r}; known: {', '.join(table)}")
    return table[protocol]()
