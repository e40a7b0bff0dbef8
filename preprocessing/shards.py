"""Resumable shard output: one part file per finished unit, then deterministic packing into shards.

A unit (one video, one labeled recording) is written to `parts/<unit>.tar` atomically, and its
outcome appended to `units.jsonl`. A rerun skips every unit already recorded, so a run killed at
any point and rerun ends with exactly the samples of an uninterrupted run. `finalize` packs the
parts into shards of the target size and writes manifest.json. With a seed, the samples of all parts
are permuted together (one seeded permutation of every sample, parts taken in unit-name order), so a
shard, and any batch drawn from it, holds clips of the whole corpus instead of a few consecutive
videos; packing reads only the finished parts, so it is redone identically after any kill.
"""

from __future__ import annotations

import json
import os
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Iterator

import numpy as np
import webdataset as wds

from memobert.schema import Manifest, Utterance, decode, encode, read_tar_sample, tar_sample_spans, tar_samples

PARTS = "parts"
UNITS_LOG = "units.jsonl"
FAILURES = "failures.jsonl"
SHARD_PATTERN = "shard-%06d.tar"
OPEN_PARTS = 128  # part files kept open while packing in shuffled order: random reads, bounded descriptors


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

    def finalize(self, max_bytes: int, max_count: int, dims: dict[str, int], extractors: dict[str, Any],
                 settings: dict[str, Any], shuffle_seed: int | None = None) -> Manifest:
        """Pack all parts into shards and write manifest.json: in a seeded permutation across all parts, or
        with shuffle_seed None in unit order (the parts sorted by unit name)."""
        for old in self.folder.glob("shard-*.tar"):
            old.unlink()  # a finalize cut short by a kill leaves partial shards: redo from the parts
        parts = sorted(self.parts.glob("*.tar"))
        counts: dict[str, int] = {}
        pattern = str(self.folder / SHARD_PATTERN)
        with wds.ShardWriter(pattern, maxcount=max_count, maxsize=max_bytes, mtime=0.0, verbose=0) as sink:
            for sample in _samples_in_order(parts, shuffle_seed):
                sink.write(sample)
                name = Path(sink.fname).name
                counts[name] = counts.get(name, 0) + 1
        manifest = Manifest(shards=counts, dims=dims, extractors=extractors,
                            settings={**settings, "pack": {"shuffled": shuffle_seed is not None, "seed": shuffle_seed}})
        manifest.save(self.folder)
        return manifest


def _samples_in_order(parts: list[Path], shuffle_seed: int | None) -> Iterator[dict[str, Any]]:
    """Raw samples of the parts: in file order, or in one seeded permutation of all of them."""
    if shuffle_seed is None:
        for part in parts:
            yield from tar_samples(str(part))
        return
    # Only byte ranges are held (~28 bytes per clip), never samples: the corpus need not fit in memory.
    spans = [np.asarray(tar_sample_spans(str(part)), dtype=np.int64).reshape(-1, 2) for part in parts]
    owner = np.repeat(np.arange(len(parts), dtype=np.int32), [len(s) for s in spans])
    first = np.cumsum([0] + [len(s) for s in spans])
    files: OrderedDict[int, BinaryIO] = OrderedDict()
    try:
        for i in np.random.default_rng(shuffle_seed).permutation(len(owner)):
            part = int(owner[i])
            if part in files:
                files.move_to_end(part)
            else:
                if len(files) == OPEN_PARTS:
                    files.popitem(last=False)[1].close()
                files[part] = open(parts[part], "rb")
            start, end = spans[part][i - first[part]]
            yield read_tar_sample(files[part], (int(start), int(end)), str(parts[part]))
    finally:
        for stream in files.values():
            stream.close()


def read_utterances(path: Path) -> Iterator[Utterance]:
    """Every utterance of one shard or part file (tests, tools)."""
    for sample in tar_samples(str(path)):
        yield decode(sample)
