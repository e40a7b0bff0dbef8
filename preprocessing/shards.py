"""Resumable shard output: one part file per finished unit, then deterministic packing into shards.

A unit (one video, one labeled recording) is written to `parts/<unit>.tar` atomically, and its
outcome appended to `units.jsonl`. A rerun skips every unit already recorded, so a run killed at
any point and rerun ends with exactly the samples of an uninterrupted run. `finalize` packs the
parts, sorted by unit name, into shards of the target size and writes manifest.json.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import webdataset as wds

from memobert.schema import Manifest, Utterance, decode, encode, tar_samples

PARTS = "parts"
UNITS_LOG = "units.jsonl"
FAILURES = "failures.jsonl"
SHARD_PATTERN = "shard-%06d.tar"


@dataclass
class UnitRecord:
    unit: str
    status: str  # "ok" | "failed"
    samples: int = 0
    reason: str = ""
    dropped: dict[str, int] | None = None  # utterances dropped inside the unit, by reason


class ShardOutput:
    """The output folder of one preprocessing run: part files, the unit log, failures, shards."""

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)
        self.parts = self.folder / PARTS
        self.parts.mkdir(parents=True, exist_ok=True)

    def finished_units(self) -> dict[str, UnitRecord]:
        """Units recorded by earlier runs (ok or failed): a rerun skips them."""
        log = self.folder / UNITS_LOG
        if not log.is_file():
            return {}
        records = {}
        for line in log.read_text().splitlines():
            try:
                record = UnitRecord(**json.loads(line))
            except (json.JSONDecodeError, TypeError):
                continue  # a line cut by a kill mid-write: that unit simply runs again
            if record.status == "failed" or (self.parts / f"{record.unit}.tar").is_file():
                records[record.unit] = record
        return records

    def write_unit(self, unit: str, utterances: list[Utterance], dropped: dict[str, int] | None = None) -> None:
        """Write a finished unit's samples atomically, then record it."""
        tmp = self.parts / f".{unit}.tar.tmp"
        with wds.TarWriter(str(tmp), mtime=0.0) as sink:  # fixed mtime: identical bytes on rerun
            for utt in utterances:
                sink.write(encode(utt))
        tmp.replace(self.parts / f"{unit}.tar")
        self._record(UnitRecord(unit=unit, status="ok", samples=len(utterances), dropped=dropped or {}))

    def fail_unit(self, unit: str, reason: str) -> None:
        """Record a unit that could not be processed; the failures file names it with the reason."""
        record = UnitRecord(unit=unit, status="failed", reason=reason)
        with (self.folder / FAILURES).open("a") as f:
            f.write(json.dumps({"unit": unit, "reason": reason}) + "\n")
        self._record(record)

    def _record(self, record: UnitRecord) -> None:
        with (self.folder / UNITS_LOG).open("a") as f:
            f.write(json.dumps(record.__dict__) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def finalize(self, max_bytes: int, max_count: int, dims: dict[str, int], extractors: dict[str, Any], settings: dict[str, Any]) -> Manifest:
        """Pack all parts (sorted by unit) into shards and write manifest.json."""
        for old in self.folder.glob("shard-*.tar"):
            old.unlink()  # a finalize cut short by a kill leaves partial shards: redo from the parts
        counts: dict[str, int] = {}
        pattern = str(self.folder / SHARD_PATTERN)
        with wds.ShardWriter(pattern, maxcount=max_count, maxsize=max_bytes, mtime=0.0, verbose=0) as sink:
            for part in sorted(self.parts.glob("*.tar")):
                for sample in tar_samples(str(part)):
                    sink.write(sample)
                    name = Path(sink.fname).name
                    counts[name] = counts.get(name, 0) + 1
        manifest = Manifest(shards=counts, dims=dims, extractors=extractors, settings=settings)
        manifest.save(self.folder)
        return manifest


def read_utterances(path: Path) -> Iterator[Utterance]:
    """Every utterance of one shard or part file (tests, tools)."""
    for sample in tar_samples(str(path)):
        yield decode(sample)
