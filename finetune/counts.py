"""Per-speaker utterance counts of the labeled shards, checked against the corpus release's own total.

A total that differs from the release's means the shards hold another set of utterances than the
paper's tables (e.g. faceless utterances dropped in preprocessing, or a partial corpus).
"""

from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path
from typing import Sequence

from finetune.config import DataConfig
from memobert.schema import MANIFEST_NAME, Utterance
from memobert.shard_store import folder_manifest
from preprocessing.adapters import msp_improv_release_count

log = logging.getLogger(__name__)

# IEMOCAP, 4 classes with excited merged into happiness: the release's count over its 5 sessions.
IEMOCAP_RELEASE_TOTAL = 5531


def speaker_counts(utts: Sequence[Utterance]) -> dict[str, int]:
    """Utterances per speaker, speakers in sorted order."""
    return dict(sorted(Counter(u.meta["speaker"] for u in utts).items()))


def release_total(data: DataConfig) -> tuple[int | None, str]:
    """The release's utterance count for the protocol and where it comes from; None (and why) when unknown."""
    if data.protocol == "iemocap":
        return IEMOCAP_RELEASE_TOTAL, "the IEMOCAP release (4 classes, excited merged into happiness)"
    manifest = folder_manifest(data.shards)
    source = manifest.settings.get("source") if manifest is not None else None
    if not source:
        return None, f"{data.shards} has no {MANIFEST_NAME} naming the MSP-IMPROV release it was made from"
    total = msp_improv_release_count(Path(source))
    if total is None:
        return None, f"no Evaluation.txt in {source}, the release the shards were made from"
    return total, f"{source}/Evaluation.txt (4-class target-sentence records)"


def log_counts(utts: Sequence[Utterance], data: DataConfig) -> None:
    """Log the per-speaker counts; warn when the total is not the release's (or cannot be checked)."""
    counts = speaker_counts(utts)
    log.info("utterances per speaker: %s (total %d)", ", ".join(f"{s} {n}" for s, n in counts.items()), len(utts))
    expected, source = release_total(data)
    if expected is None:
        log.warning("cannot check the total of %d utterances against the release: %s", len(utts), source)
    elif expected != len(utts):
        log.warning("the shards hold %d utterances, the release %d (%s): the tables are not over the paper's "
                    "utterances (faceless utterances dropped in preprocessing? a partial corpus?)", len(utts),
                    expected, source)
