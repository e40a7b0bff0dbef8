"""Loader benchmark: samples/s per core of a naive `WebDataset(...).decode()` vs pretrain.loader, and padding.

Writes a synthetic shard set of realistic samples (text <= 30 tokens, visual <= 36 x 342, audio <= 64 x 768,
vprob 36 x 8, all float16, lengths correlated through the clip duration, ~15% of clips with < 10 visual
frames), then, in one process, times:
  naive      wds.WebDataset(urls, shardshuffle=False).decode()  (np.load per .npy member)
  wds-raw    the same without .decode(): webdataset's tar reading alone
  tar        memobert.schema.tar_samples: the loader's own tar reading
  decode     pretrain.loader.read_shard: tar + memobert.schema.decode
  loader     build_loader(num_workers=0), every sample into a collated, padded Batch
  train-K    build_loader(infinite), the training stream, with open_shards K = 1 and the default
  decode-http, loader-http   decode and loader over http://127.0.0.1 (Python's http.server, a subprocess)
  decode-s3, loader-s3       the same over s3:// (moto's S3-compatible server, a subprocess)
and the padded share of batches with and without length bucketing. Per-core figures are samples per
CPU-second of this process (robust on a shared machine); wall figures are printed beside them. The servers
run in their own processes, so the remote rows' per-core figures are the reading side's CPU alone.

Then batch diversity: a second synthetic corpus of many videos (tiny features: only the order of clips
matters) goes through the preprocessing pack (preprocessing.shards) in unit order and in the seeded
shuffle, and the training stream reads each with several open_shards values; the figure is the number
of distinct source videos per batch, against its exact expectation for a batch drawn i.i.d. (without
replacement) from all clips of the corpus.

    PYTHONPATH=. .venv/bin/python benchmarks/loader.py [--samples 4000] [--workers 0,2] [--videos 1000] [--no-remote]
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import math
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import numpy as np
import webdataset as wds

from memobert.schema import Manifest, Utterance, encode, tar_samples
from pretrain.batch import Batch
from preprocessing.shards import ShardOutput
from pretrain.config import DataConfig
from pretrain.loader import ClipFilter, build_loader, kept_count, read_shard, shard_paths

DIMS = {"audio": 768, "visual": 342, "vprob": 8}


def write_shards(folder: Path, n_samples: int, n_shards: int, seed: int = 0, vocab: str | None = None) -> Path:
    """Synthetic shards whose sizes and length mix resemble movie-subtitle utterances (vocab: recorded for the trainer)."""
    rng = np.random.default_rng(seed)
    counts = {}
    for shard, indices in enumerate(np.array_split(np.arange(n_samples), n_shards)):
        name = f"bench-{shard:06d}.tar"
        with wds.TarWriter(str(folder / name)) as sink:
            for i in indices:
                sink.write(encode(_utterance(int(i), rng)))
        counts[name] = len(indices)
    extractors = {"text": {"name": "wordpiece", "vocab": vocab}} if vocab else {}
    Manifest(shards=counts, dims=DIMS, extractors=extractors, settings={"synthetic": True, "seed": seed}).save(folder)
    return folder


def _utterance(i: int, rng: np.random.Generator) -> Utterance:
    seconds = rng.uniform(1.0, 5.0)  # subtitle cue length
    n_text = int(np.clip(seconds * 3 + rng.normal(0, 2), 1, 30))
    n_audio = min(64, int(seconds / 0.06))  # pooled 60 ms wav2vec2 frames
    n_visual = min(36, int(seconds * 10)) if rng.random() > 0.15 else int(rng.integers(0, 10))  # face lost
    vprob = rng.random((n_visual, DIMS["vprob"]))
    return Utterance(
        key=f"clip{i:08d}",
        meta={"id": f"clip{i:08d}", "video": f"movie{i // 500:03d}", "start": 0.0, "end": seconds,
              "text": " ".join(["word"] * n_text)},
        tokens=rng.integers(1000, 30000, n_text),
        words=np.arange(n_text),
        audio=rng.standard_normal((n_audio, DIMS["audio"]), np.float32),
        visual=rng.standard_normal((n_visual, DIMS["visual"]), np.float32),
        vprob=vprob / vprob.sum(1, keepdims=True),
    )


def diversity_corpus(folder: Path, videos: int, mean_clips: int, shard_clips: int, seed: int = 0) -> tuple[Path, Path, np.ndarray]:
    """(unit-order shards, shuffled shards, clips per video): parts packed by preprocessing.shards both ways
    (the CPU time of each pack is printed).

    Clip j of video v has the text tokens [VIDEO_TOKEN + v, ...], so a Batch names its rows' videos.
    """
    rng = np.random.default_rng(seed)
    clips = rng.integers(mean_clips // 5, mean_clips * 9 // 5 + 1, videos)
    plain = ShardOutput(folder / "unit_order")
    for video, n in enumerate(clips):
        plain.write_unit(f"movie{video:05d}", [_tiny_clip(video, j) for j in range(n)])
    (folder / "shuffled").mkdir()
    (folder / "shuffled" / "parts").symlink_to(plain.parts)
    dims = {"audio": 4, "visual": 4, "vprob": 8}
    for out, shuffle_seed in ((plain, None), (ShardOutput(folder / "shuffled"), seed)):
        cpu = time.process_time()
        out.finalize(max_bytes=1 << 40, max_count=shard_clips, dims=dims, extractors={}, settings={}, shuffle_seed=shuffle_seed)
        print(f"pack ({'unit order' if shuffle_seed is None else 'shuffled'}): "
              f"{int(clips.sum()) / (time.process_time() - cpu):,.0f} clips/CPU-s")
    return plain.folder, folder / "shuffled", clips


VIDEO_TOKEN = 1000


def _tiny_clip(video: int, j: int) -> Utterance:
    key = f"movie{video:05d}_{j:05d}"
    return Utterance(key=key, meta={"id": key, "video": f"movie{video:05d}", "text": "a b c"},
                     tokens=np.array([VIDEO_TOKEN + video, 5, 6], np.int32), words=np.arange(3, dtype=np.int32),
                     audio=np.zeros((2, 4), np.float16), visual=np.zeros((2, 4), np.float16),
                     vprob=np.full((2, 8), 1 / 8, np.float16))


def iid_distinct(clips: np.ndarray, batch: int) -> float:
    """Expected distinct videos in `batch` clips drawn without replacement from all clips (exact)."""
    total = int(clips.sum())

    def log_choose(n: int, k: int) -> float:
        return math.lgamma(n + 1) - math.lgamma(k + 1) - math.lgamma(n - k + 1) if 0 <= k <= n else -math.inf

    return sum(1 - math.exp(log_choose(total - int(n), batch) - log_choose(total, batch)) for n in clips)


def distinct_per_batch(folder: Path, open_shards: int, batch_size: int, batches: int) -> np.ndarray:
    """Distinct source videos in each of the first `batches` training batches (one rank, one worker)."""
    cfg = DataConfig(num_workers=0, min_visual_len=0, max_text_tokens=0, min_words=0, open_shards=open_shards)
    loader = build_loader(str(folder), cfg, batch_size=batch_size, rank=0, world_size=1, seed=0, cls_id=101, sep_id=102)
    counts = []
    for batch in loader:
        counts.append(len(set(batch.text_ids[:, 1].tolist())))
        if len(counts) == batches:
            return np.asarray(counts)
    raise AssertionError("unreachable: the training stream is endless")


@contextlib.contextmanager
def served(folder: Path) -> Iterator[dict[str, str]]:
    """The shard folder behind a local HTTP server and a local S3-compatible server: {"http": url, "s3": url}."""
    http_port, s3_port = _free_port(), _free_port()
    quiet = dict(stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    servers = [
        subprocess.Popen([sys.executable, "-m", "http.server", "-b", "127.0.0.1", "-d", str(folder), str(http_port)], **quiet),
        subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(s3_port)], **quiet),
    ]
    # Dummy credentials for the local server; the endpoint goes through the environment like a user's would.
    os.environ.update(AWS_ENDPOINT_URL_S3=f"http://127.0.0.1:{s3_port}", AWS_ACCESS_KEY_ID="bench",
                      AWS_SECRET_ACCESS_KEY="bench", AWS_DEFAULT_REGION="us-east-1")
    try:
        for port in (http_port, s3_port):
            _wait_for_port(port)
        import s3fs

        s3fs.S3FileSystem(skip_instance_cache=True).put(str(folder) + "/", "bench/shards/", recursive=True)
        yield {"http": f"http://127.0.0.1:{http_port}", "s3": "s3://bench/shards"}
    finally:
        for server in servers:
            server.kill()
            server.wait()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_for_port(port: int) -> None:
    for _ in range(600):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"no server on 127.0.0.1:{port}")


def timed(count: Callable[[], int], repeats: int = 2) -> tuple[int, float, float]:
    """(items, CPU seconds, wall seconds) of the fastest of `repeats` runs (the first warms the page cache)."""
    best = None
    for _ in range(repeats):
        cpu, wall = time.process_time(), time.perf_counter()
        n = count()
        result = (n, time.process_time() - cpu, time.perf_counter() - wall)
        best = result if best is None or result[1] < best[1] else best
    return best


def padding(batches: Iterable[Batch]) -> tuple[float, float]:
    """(packed-sequence padding share, per-modality tensor padding share) over all batches, by positions."""
    seq_real = seq_total = tensor_real = tensor_total = 0
    for b in batches:
        masks = (b.text_mask, b.visual_mask, b.acoustic_mask)
        lengths = sum(m.sum(1) for m in masks)
        seq_real += int(lengths.sum())
        seq_total += b.size * int(lengths.max())
        tensor_real += sum(int(m.sum()) for m in masks)
        tensor_total += sum(m.numel() for m in masks)
    return 1 - seq_real / seq_total, 1 - tensor_real / tensor_total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=4000)
    parser.add_argument("--shards", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=160)
    parser.add_argument("--workers", default="", help="comma-separated num_workers to time end to end (wall)")
    parser.add_argument("--dir", default=None, help="where to write the shards (default: a temporary folder)")
    parser.add_argument("--videos", type=int, default=1000, help="videos of the diversity corpus (0: skip it)")
    parser.add_argument("--clips-per-video", type=int, default=100, help="mean; drawn uniformly in [0.2, 1.8] x mean")
    parser.add_argument("--shard-clips", type=int, default=800, help="clips per shard of the diversity corpus")
    parser.add_argument("--diversity-batches", type=int, default=200)
    parser.add_argument("--open-shards", default="1,2,4,8", help="comma-separated open_shards for the diversity table")
    parser.add_argument("--skip-throughput", action="store_true")
    parser.add_argument("--no-remote", action="store_true", help="skip the HTTP and S3 rows")
    args = parser.parse_args()
    if not args.skip_throughput:
        throughput(args)
    if args.videos:
        diversity(args)


def diversity(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        plain, shuffled, clips = diversity_corpus(Path(tmp), args.videos, args.clips_per_video, args.shard_clips)
        iid = iid_distinct(clips, args.batch_size)
        print(f"# batch diversity: {args.videos} videos, {int(clips.sum()):,} clips ({clips.min()}-{clips.max()} per "
              f"video), shards of {args.shard_clips} clips; {args.diversity_batches} training batches of {args.batch_size}")
        print(f"i.i.d. expectation: {iid:.1f} distinct videos per batch")
        print(f"{'packing':<12} {'open_shards':>11} {'mean':>7} {'min':>5} {'max':>5} {'/ i.i.d.':>9}")
        for name, folder in (("unit order", plain), ("shuffled", shuffled)):
            for open_shards in [int(k) for k in args.open_shards.split(",") if k]:
                counts = distinct_per_batch(folder, open_shards, args.batch_size, args.diversity_batches)
                print(f"{name:<12} {open_shards:>11} {counts.mean():>7.1f} {counts.min():>5} {counts.max():>5} "
                      f"{counts.mean() / iid:>9.1%}")


def throughput(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        folder = write_shards(Path(tmp), args.samples, args.shards)
        urls = shard_paths(str(folder))
        size_mb = sum(os.path.getsize(u) for u in urls) / 1e6
        machine = f"{platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}"
        print(f"# {machine}, {datetime.date.today()}; {args.samples} samples in {args.shards} shards, {size_mb:.0f} MB")

        common = dict(rank=0, world_size=1, seed=0, cls_id=101, sep_id=102, batch_size=args.batch_size)
        # every sample into a batch: the same work as naive
        every = DataConfig(num_workers=0, min_visual_len=0, max_text_tokens=0, min_words=0)

        def naive() -> int:
            return sum(1 for _ in wds.WebDataset(urls, shardshuffle=False).decode())

        def wds_raw() -> int:
            return sum(1 for _ in wds.WebDataset(urls, shardshuffle=False))

        def tar() -> int:
            return sum(1 for u in urls for _ in tar_samples(u))

        def decoded() -> int:
            return sum(1 for u in urls for _ in read_shard(u))

        loader = build_loader(str(folder), every, infinite=False, **common)  # builds the kept-count cache

        def ours() -> int:
            return sum(b.size for b in loader)

        def train(open_shards: int) -> Callable[[], int]:
            cfg = DataConfig(num_workers=0, min_visual_len=0, max_text_tokens=0, min_words=0, open_shards=open_shards)
            stream = build_loader(str(folder), cfg, **common)
            # Whole visits reading twice the shard set: a cut inside a visit would count the clips read
            # to fill its shuffle buffer and first pool without the batches they make.
            visits = max(1, 2 * args.shards // open_shards)
            batches = sum(stream.loader.dataset.visit_len(v) for v in range(visits))
            return lambda: sum(b.size for _, b in zip(range(batches), stream))

        paths = [("naive", naive), ("wds-raw", wds_raw), ("tar", tar), ("decode", decoded), ("loader", ours),
                 ("train-1", train(1)), (f"train-{DataConfig.open_shards}", train(DataConfig.open_shards))]
        rows = {name: timed(fn) for name, fn in paths}
        if not args.no_remote:
            rows.update(remote_rows(folder, every, common))
        print(f"{'path':<11} {'samples/CPU-s':>14} {'samples/s wall':>15}")
        for name, (n, cpu, wall) in rows.items():
            print(f"{name:<11} {n / cpu:>14,.0f} {n / wall:>15,.0f}")
        per_core = {name: n / cpu for name, (n, cpu, _) in rows.items()}
        print(f"loader / naive per core: {per_core['loader'] / per_core['naive']:.1f}x; "
              f"decode / naive: {per_core['decode'] / per_core['naive']:.1f}x")
        for where in ("http", "s3"):
            if f"loader-{where}" in per_core:
                print(f"{where} / local per core: decode {per_core[f'decode-{where}'] / per_core['decode']:.2f}x, "
                      f"loader {per_core[f'loader-{where}'] / per_core['loader']:.2f}x")

        cpu, wall = time.process_time(), time.perf_counter()
        kept = sum(kept_count(u, ClipFilter(11, 30, 3)) for u in urls)  # a filter not cached yet: a cold count pass
        print(f"kept-count pass (resume / finite-mode cost): {args.samples / (time.process_time() - cpu):,.0f} "
              f"samples/CPU-s, {args.samples / (time.perf_counter() - wall):,.0f} samples/s wall ({kept} kept)")

        for workers in [int(w) for w in args.workers.split(",") if w]:
            cfg = DataConfig(num_workers=workers, min_visual_len=0, max_text_tokens=0, min_words=0)
            loader = build_loader(str(folder), cfg, infinite=False, **common)
            n, _, wall = timed(lambda: sum(b.size for b in loader))
            print(f"loader num_workers={workers}: {n / wall:,.0f} samples/s wall")

        print(f"{'padding (default filters)':<28} {'packed sequence':>16} {'modality tensors':>17}")
        for bucket in (False, True):
            cfg = DataConfig(num_workers=0, bucket_by_length=bucket)
            seq, tensors = padding(build_loader(str(folder), cfg, infinite=False, **common))
            print(f"{'bucketing ' + ('on' if bucket else 'off'):<28} {seq:>16.1%} {tensors:>17.1%}")


def remote_rows(folder: Path, every: DataConfig, common: dict) -> dict[str, tuple[int, float, float]]:
    """decode and loader rows over HTTP and S3 servers on 127.0.0.1 (the same shards, the same work as local)."""
    rows = {}
    with served(folder) as roots:
        for where, root in roots.items():
            urls = shard_paths(root)
            rows[f"decode-{where}"] = timed(lambda: sum(1 for u in urls for _ in read_shard(u)))
            loader = build_loader(root, every, infinite=False, **common)
            rows[f"loader-{where}"] = timed(lambda: sum(b.size for b in loader))
    return rows


if __name__ == "__main__":
    main()
