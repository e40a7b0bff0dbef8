"""The shard loader: WebDataset tars -> length-bucketed, dynamically padded `Batch`es, one stream per rank.

How a rank's stream is made, and why it resumes exactly:
- The stream is a sequence of *visits*. Visit v reads whole shards and is fully determined by
  (seed, rank, v): its shards, their interleaving, its shuffle order and its bucketing all come from one
  RNG seeded with them.
  - infinite (training): a visit reads `open_shards` distinct shards drawn uniformly from all shards,
    interleaved clip by clip in a random order into one shuffle buffer, so a batch mixes several shards
    (and, with shards packed across the corpus by preprocessing, clips of the whole corpus). Shards are
    drawn afresh at every visit (resampling), so no rank ever runs dry and every rank yields exactly as
    many batches as the trainer asks for.
  - finite (validation): a visit is one shard; rank r reads shards r, r + world_size, ... (disjoint) once,
    in order, and stops after `num_batches`: the smallest rank's batch count, which every rank computes
    alike from the same shards without communicating, so all ranks run the same number of steps and none
    waits forever.
- Inside a visit: raw members (memobert.schema.tar_samples: webdataset's sample grouping with a ~10x faster tar reader) ->
  memobert.schema.decode (never webdataset's .decode()) -> drop clips the ClipFilter rejects (counted per
  reason) -> shuffle buffer -> length bucketing -> pretrain.batch.collate (dynamic padding).
  Buffers start empty at every visit, so a visit's batches depend on that visit alone: floor(kept /
  batch_size) of them in training (a random remainder is dropped, so every training batch is full),
  ceil(kept / batch_size) in validation.
- Workers: DataLoader worker w of num_workers serves the visits v = role (mod num_workers), with
  role = (w + start_step) mod num_workers. The DataLoader takes one batch from each worker in turn, so
  batch t always comes from role t mod num_workers (webdataset's split_by_worker, made resumable).
- Resume: batch t is a function of (seed, rank, num_workers, batch_size, cfg, the shard list) and nothing
  else. With start_step = t each role works out, from per-shard counts of kept clips (exact: the filter is
  a pure function of the clip), which visit holds its next batch, starts there and skips the batches before
  it in that visit without collating them. The counts cost one read of each distinct shard visited before t
  (cached per process), not a replay of the stream. Change num_workers (0 and 1 are the same), open_shards,
  batch_size, the shards or the filters and the resumed stream is a different, still deterministic one:
  nothing is replayed on purpose, but the exact continuation is lost.
- Sources: local paths, URLs (http(s)://, s3://, other fsspec schemes) and pipe: commands
  (memobert.shard_store), each read front to back as one byte stream; everything above works on the path
  strings alone, so splits, visits and resume positions are the same whatever the transport.
- Errors: a damaged tar or an undecodable sample raises ShardError naming the file and the sample; nothing
  is skipped silently, so batch counts and resume positions stay exact. A remote shard that fails to open
  or ends early is first re-opened (data.read.retries, with backoff) and resumed after its last sample read.
  data.read.skip_bad_shards trades exactness for liveness: the failing shard's rest is skipped and counted
  (TimedLoader.skipped_shards); the kept counts of the resume pass then may not match what a retried read
  yields, so the resumed stream is deterministic only if the failure is.
"""

from __future__ import annotations

import functools
import logging
import math
import os
import random
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TypeVar

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from memobert.schema import MANIFEST_NAME, Utterance, decode, stream_samples
# shard_paths is re-exported: the stages list their shards through the loader.
from memobert.shard_store import ReadConfig, folder_manifest, is_remote, open_shard, shard_paths, split_folder
from pretrain.batch import Batch, collate
from pretrain.config import DataConfig

T = TypeVar("T")
log = logging.getLogger(__name__)

# Bucketing sorts pools of this many batches by length: bigger pools pad less but make batches more uniform.
POOL_BATCHES = 8
DROP_REASONS = ("text_words", "text_tokens", "visual_frames")  # ClipFilter.reason's answers, in its order
SKIPPED_SHARDS = "skipped_shards"  # beside the drop reasons in what a RankStream yields: shards cut short (skip_bad_shards)


class ShardError(RuntimeError):
    """A shard could not be read, or one of its samples could not be decoded."""


def count_samples(source: str | Sequence[str]) -> int:
    """Samples in the shards as listed by their folders' manifest.json (no shard is read)."""
    counts: dict[str, dict[str, int]] = {}
    total = 0
    for path in shard_paths(source):
        folder, name = split_folder(path)
        if folder not in counts:
            manifest = folder_manifest(folder)
            if manifest is None:
                raise FileNotFoundError(f"no {MANIFEST_NAME} in {folder}: is this a preprocessing output folder?")
            counts[folder] = manifest.shards
        if name not in counts[folder]:
            raise ValueError(f"{path} is not listed in the manifest of {folder}")
        total += counts[folder][name]
    return total


def read_shard(path: str, read: ReadConfig = ReadConfig(),
               on_skip: Callable[[str], None] | None = None) -> Iterator[Utterance]:
    """Decoded samples of one shard, in file order; a failure raises ShardError naming the file and sample.

    A remote shard that cannot be opened or ends early is re-opened up to read.retries times, each time
    resuming after the last sample read; then, with read.skip_bad_shards, its rest is skipped and on_skip
    called with its path instead of raising.
    """
    samples = _raw_samples(path, read)
    key = None
    while True:
        try:
            raw = next(samples, None)
        except Exception as err:  # the tar itself is damaged or unreadable: any transport's error, after retries
            detail = str(err).removeprefix(f"{path}: ")  # the tar reader names the file too
            what = "corrupt tar" if isinstance(err, ValueError) else f"cannot be read ({type(err).__name__})"
            attempts = f", {read.retries + 1} attempts" if is_remote(path) else ""
            message = f"{path}: {what} after sample {key!r}{attempts}: {detail}"
            if not read.skip_bad_shards:
                raise ShardError(message) from err
            log.warning("skipping the rest of a shard: %s", message)
            if on_skip is not None:
                on_skip(path)
            return
        if raw is None:
            return
        key = raw["__key__"]
        try:
            utt = decode(raw)
        except Exception as err:
            detail = str(err).removeprefix(f"sample {key} ({path}): ")  # decode names the sample and file too
            raise ShardError(f"{path}: sample {key!r} does not decode: {detail}") from err
        yield utt


@dataclass(frozen=True)
class ClipFilter:
    """Which clips pretraining drops, and why: the authors' text filters and our visual-length one."""

    min_visual_len: int
    max_text_tokens: int  # 0: no limit
    min_words: int

    @classmethod
    def of(cls, cfg: DataConfig) -> ClipFilter:
        return cls(cfg.min_visual_len, cfg.max_text_tokens, cfg.min_words)

    def reason(self, utt: Utterance) -> str | None:
        """Why the clip is dropped (the first failing rule, in a fixed order), or None to keep it."""
        if len(str(utt.meta.get("text", "")).split()) < self.min_words:
            return "text_words"
        if self.max_text_tokens and len(utt.tokens) > self.max_text_tokens:
            return "text_tokens"
        if utt.visual.shape[0] < self.min_visual_len:
            return "visual_frames"
        return None

    def describe(self) -> str:
        return (f"min_visual_len={self.min_visual_len}, max_text_tokens={self.max_text_tokens}, "
                f"min_words={self.min_words}")


def kept_count(path: str, clip_filter: ClipFilter, read: ReadConfig = ReadConfig()) -> int:
    """Clips of a shard that the filter keeps (one read per process, file version and filter).

    A remote shard is taken not to change while the process runs: asking its version would cost a request.
    """
    return _kept_count(path, clip_filter, read, None if is_remote(path) else os.stat(path).st_mtime_ns)


@functools.lru_cache(maxsize=None)
def _kept_count(path: str, clip_filter: ClipFilter, read: ReadConfig, mtime_ns: int | None) -> int:
    return sum(clip_filter.reason(utt) is None for utt in read_shard(path, read))


def _raw_samples(path: str, read: ReadConfig) -> Iterator[dict]:
    """The raw samples of a shard; a remote one is re-opened after a failure, skipping the samples already read."""
    attempts = read.retries + 1 if is_remote(path) else 1
    done = 0
    for attempt in range(attempts):
        try:
            with open_shard(path, read) as stream:
                for i, sample in enumerate(stream_samples(stream, path)):
                    if i >= done:
                        done += 1
                        yield sample
            return
        except Exception as err:  # whatever the transport raises (OSError, aiohttp, botocore, a short tar)
            if attempt + 1 == attempts:
                raise
            wait = read.backoff_s * 2**attempt
            log.warning("%s: read failed after %d samples (%s: %s); retry %d of %d in %.1f s",
                        path, done, type(err).__name__, err, attempt + 1, read.retries, wait)
            time.sleep(wait)


def padded_share(batch: Batch) -> float:
    """Share of padding in the packed sequence the model attends over: [CLS] text [SEP], visual, acoustic."""
    lengths = batch.text_mask.sum(1) + batch.visual_mask.sum(1) + batch.acoustic_mask.sum(1)
    return 1.0 - lengths.sum().item() / (batch.size * lengths.max().item())


class RankStream(IterableDataset):
    """One rank's batch stream (see the module docstring); yields (Batch, clips dropped since the last batch, by reason)."""

    def __init__(
        self,
        paths: list[str],
        cfg: DataConfig,
        *,
        batch_size: int,
        rank: int,
        seed: int,
        cls_id: int,
        sep_id: int,
        infinite: bool,
        start_step: int = 0,
        label_key: str | None = None,
    ) -> None:
        self.paths, self.cfg, self.batch_size, self.rank, self.seed = paths, cfg, batch_size, rank, seed
        self.cls_id, self.sep_id, self.label_key, self.infinite = cls_id, sep_id, label_key, infinite
        self.start_step = start_step
        self.clip_filter = ClipFilter.of(cfg)
        self.num_roles = max(1, cfg.num_workers)
        # Worked out once, here in the main process: workers need only the result.
        self.starts = [self._role_start(role) for role in range(self.num_roles)]
        self._dropped: Counter[str] = Counter()

    def __iter__(self) -> Iterator[tuple[Batch, dict[str, int]]]:
        info = get_worker_info()
        role = ((info.id if info else 0) + self.start_step) % self.num_roles
        visit, skip = self.starts[role]
        self._dropped = Counter()
        fruitless: set[str] = set()
        while self.infinite or visit < len(self.paths):
            paths, rng = self._visit(visit)
            produced = 0
            for utts in self._batches(paths, rng):
                if produced >= skip:
                    yield self._collate(utts), self._take_dropped()
                produced += 1
            if produced == 0 and self.infinite:
                fruitless.update(paths)
                self._check_fruitless(fruitless)
            visit, skip = visit + self.num_roles, 0

    def visit_len(self, visit: int) -> int:
        """Batches that a visit yields, from the kept counts of its shards."""
        kept = sum(kept_count(path, self.clip_filter, self.cfg.read) for path in self._visit(visit)[0])
        return kept // self.batch_size if self.infinite else math.ceil(kept / self.batch_size)

    def _role_start(self, role: int) -> tuple[int, int]:
        """The visit holding this role's batch at start_step, and how many of its batches come before it."""
        todo = (self.start_step - role + self.num_roles - 1) // self.num_roles  # role's batches before start_step
        visit, fruitless = role, set()
        while todo > 0 and todo >= (n := self.visit_len(visit)):  # todo == 0 reads no shard
            if n == 0:
                fruitless.update(self._visit(visit)[0])
                self._check_fruitless(fruitless)
            todo -= n
            visit += self.num_roles
        return visit, todo

    def _check_fruitless(self, fruitless: set[str]) -> None:
        # Without this, a stream where no shard fills a batch would spin forever instead of failing.
        if len(fruitless) == len(self.paths):
            raise ShardError(
                f"no shard has {self.batch_size} clips that pass the filters ({self.clip_filter.describe()}), "
                f"not even {self.cfg.open_shards} together (open_shards): the stream would never yield a batch"
            )

    def _visit(self, visit: int) -> tuple[list[str], random.Random]:
        # A string seed is hashed with SHA-512: the same on every machine and Python run.
        rng = random.Random(f"{self.seed}/{self.rank}/{visit}")
        if not self.infinite:
            return [self.paths[visit]], rng
        return rng.sample(self.paths, min(self.cfg.open_shards, len(self.paths))), rng

    def _batches(self, paths: list[str], rng: random.Random) -> Iterator[list[Utterance]]:
        """The visit's batches of utterances: interleave, filter, shuffle buffer, then pools split into batches."""
        size = self.batch_size
        pool_size = size * (POOL_BATCHES if self.cfg.bucket_by_length else 1)
        pool: list[Utterance] = []
        shards = [read_shard(path, self.cfg.read, self._count_skip) for path in paths]
        for utt in _shuffle(self._kept(_interleave(shards, rng)), max(1, self.cfg.shuffle_buffer), rng):
            pool.append(utt)
            if len(pool) == pool_size:
                yield from self._split(pool, rng)
                pool = []
        if self.infinite:
            # Training batches are full; the pool is in shuffled order, so the dropped remainder is random.
            del pool[len(pool) - len(pool) % size :]
        yield from self._split(pool, rng)

    def _split(self, pool: list[Utterance], rng: random.Random) -> list[list[Utterance]]:
        if self.cfg.bucket_by_length:
            pool.sort(key=self._length)
        batches = [pool[i : i + self.batch_size] for i in range(0, len(pool), self.batch_size)]
        rng.shuffle(batches)  # else a pool's batches would come shortest first
        return batches

    def _length(self, utt: Utterance) -> int:
        cfg = self.cfg
        return (
            min(len(utt.tokens), cfg.max_text_len)
            + min(utt.visual.shape[0], cfg.max_visual_len)
            + min(utt.audio.shape[0], cfg.max_acoustic_len)
        )

    def _kept(self, utts: Iterator[Utterance]) -> Iterator[Utterance]:
        for utt in utts:
            reason = self.clip_filter.reason(utt)
            if reason is None:
                yield utt
            else:
                self._dropped[reason] += 1

    def _count_skip(self, path: str) -> None:
        self._dropped[SKIPPED_SHARDS] += 1

    def _take_dropped(self) -> dict[str, int]:
        dropped, self._dropped = dict(self._dropped), Counter()
        return dropped

    def _collate(self, utts: list[Utterance]) -> Batch:
        cfg = self.cfg
        return collate(
            utts, self.cls_id, self.sep_id, cfg.max_text_len, cfg.max_visual_len, cfg.max_acoustic_len, self.label_key
        )


def _interleave(streams: list[Iterator[Utterance]], rng: random.Random) -> Iterator[Utterance]:
    """The clips of all shards, each next clip taken from a shard chosen at random among those not yet ended."""
    while streams:
        i = rng.randrange(len(streams))
        utt = next(streams[i], None)
        if utt is None:
            streams.pop(i)
        else:
            yield utt


def _shuffle(items: Iterator[T], size: int, rng: random.Random) -> Iterator[T]:
    """Buffer shuffle as in webdataset: once `size` items are held, each new one swaps out a random one."""
    buffer: list[T] = []
    for item in items:
        if len(buffer) < size:
            buffer.append(item)
            continue
        i = rng.randrange(size)
        yield buffer[i]
        buffer[i] = item
    rng.shuffle(buffer)
    yield from buffer


class TimedLoader:
    """Iterates a rank's Batches and records how long each one was waited for, and how many clips were dropped.

    last_wait_s: the wait for the latest batch; total_wait_s and batches: sums since iteration began
    (data-wait % = total_wait_s / elapsed). dropped_by_reason: clips the ClipFilter dropped in the shard
    data read for the batches yielded so far, per reason (text_words, text_tokens, visual_frames); dropped:
    their sum. skipped_shards: shards cut short by a read failure (data.read.skip_bad_shards). num_batches: None
    for an infinite stream, else the count every rank yields.
    """

    def __init__(self, loader: DataLoader, num_batches: int | None) -> None:
        self.loader = loader
        self.num_batches = num_batches
        self.last_wait_s = 0.0
        self.total_wait_s = 0.0
        self.batches = 0
        self.dropped_by_reason: Counter[str] = Counter()
        self.skipped_shards = 0

    @property
    def dropped(self) -> int:
        return sum(self.dropped_by_reason.values())

    def drop_metrics(self) -> dict[str, int]:
        """Clips dropped so far, one metric per reason ("dropped/text_words", ...), every reason present."""
        return {f"dropped/{reason}": self.dropped_by_reason[reason] for reason in DROP_REASONS}

    def __len__(self) -> int:
        if self.num_batches is None:
            raise TypeError("an infinite (resampled) loader has no length: take as many batches as you need")
        return self.num_batches

    def __iter__(self) -> Iterator[Batch]:
        self.last_wait_s = self.total_wait_s = 0.0
        self.batches = 0
        self.dropped_by_reason = Counter()
        self.skipped_shards = 0
        items = iter(self.loader)
        while self.num_batches is None or self.batches < self.num_batches:
            start = time.perf_counter()
            item = next(items, None)
            self.last_wait_s = time.perf_counter() - start
            if item is None:
                raise RuntimeError(f"stream ended after {self.batches} of {self.num_batches} batches: shard changed?")
            batch, dropped = item
            self.total_wait_s += self.last_wait_s
            self.batches += 1
            self.skipped_shards += dropped.pop(SKIPPED_SHARDS, 0)
            self.dropped_by_reason.update(dropped)
            yield batch


def build_loader(
    source: str | Sequence[str],
    cfg: DataConfig,
    *,
    batch_size: int,
    rank: int,
    world_size: int,
    seed: int,
    cls_id: int,
    sep_id: int,
    start_step: int = 0,
    infinite: bool = True,
    label_key: str | None = None,
) -> TimedLoader:
    """This rank's loader over `source` (see the module docstring).

    infinite=True (training): an endless resampled stream; `start_step` = the number of batches of this
    loader already consumed (micro-batches, not optimizer steps), to resume the same stream. infinite=False
    (validation): one pass over this rank's disjoint shards, cut to the same `num_batches` on every rank.
    rank and world_size are given, never read from the environment.
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if start_step < 0 or (start_step and not infinite):
        raise ValueError(f"start_step {start_step}: must be >= 0, and 0 for a finite (validation) pass")
    paths = shard_paths(source)
    num_batches = None
    if not infinite:
        if len(paths) < world_size:
            raise ValueError(f"{len(paths)} shards in {source!r} for {world_size} ranks: every rank needs a shard")
        clip_filter = ClipFilter.of(cfg)
        per_rank = [
            sum(math.ceil(kept_count(p, clip_filter, cfg.read) / batch_size) for p in paths[r::world_size])
            for r in range(world_size)
        ]
        num_batches = min(per_rank)
        if num_batches == 0:
            empty = per_rank.index(0)
            raise ValueError(f"rank {empty} has no clip that passes the filters ({clip_filter.describe()}) in {source!r}")
        paths = paths[rank::world_size]
    stream = RankStream(
        paths,
        cfg,
        batch_size=batch_size,
        rank=rank,
        seed=seed,
        cls_id=cls_id,
        sep_id=sep_id,
        infinite=infinite,
        start_step=start_step,
        label_key=label_key,
    )
    # Pinned batches upload without a host-device sync (pretrain.batch.stage).
    loader = DataLoader(stream, batch_size=None, num_workers=cfg.num_workers, pin_memory=torch.cuda.is_available())
    return TimedLoader(loader, num_batches)
