"""The shard loader on real tiny shards: rank splits, exact batch counts, padding, determinism, resume, errors."""

from __future__ import annotations

import io
import itertools
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from helpers import write_tiny_shards

from memobert.config import ConfigError, load_config
from memobert.schema import Manifest, Utterance, encode, read_tar_sample, tar_sample_spans, tar_samples
from pretrain.batch import Batch
from pretrain.config import DataConfig, PretrainConfig
from pretrain.loader import (
    ClipFilter,
    ShardError,
    build_loader,
    count_samples,
    padded_share,
    read_shard,
    shard_paths,
)

N_SAMPLES, N_SHARDS, BATCH, CLS, SEP = 240, 6, 8, 101, 102


@pytest.fixture(scope="session")
def shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_shards(tmp_path_factory.mktemp("loader") / "shards", N_SAMPLES, N_SHARDS, seed=0)


def _cfg(**overrides: object) -> DataConfig:
    return DataConfig(**{"num_workers": 0, "shuffle_buffer": 16, **overrides})


def _loader(source: object, cfg: DataConfig | None = None, **overrides: object):
    args = {"batch_size": BATCH, "rank": 0, "world_size": 1, "seed": 3, "cls_id": CLS, "sep_id": SEP, **overrides}
    return build_loader(source, cfg or _cfg(), **args)


def _take(loader, n: int) -> list[Batch]:
    return list(itertools.islice(loader, n))


def _fingerprints(batch: Batch) -> list[tuple]:
    """(tokens, visual frames, acoustic frames) per row: unique per sample in the tiny set."""
    rows = []
    for i in range(batch.size):
        n_text = int(batch.text_mask[i].sum())
        tokens = tuple(batch.text_ids[i, 1 : n_text - 1].tolist())
        rows.append((tokens, int(batch.visual_mask[i].sum()), int(batch.acoustic_mask[i].sum())))
    return rows


def _utt_fingerprint(utt: Utterance, cfg: DataConfig) -> tuple:
    return (
        tuple(utt.tokens[: cfg.max_text_len].tolist()),
        min(utt.visual.shape[0], cfg.max_visual_len),
        min(utt.audio.shape[0], cfg.max_acoustic_len),
    )


def _same(a: list[Batch], b: list[Batch]) -> bool:
    fields = ("text_ids", "word_ids", "visual", "vprob", "acoustic", "visual_mask", "acoustic_mask")
    return len(a) == len(b) and all(torch.equal(getattr(x, f), getattr(y, f)) for x, y in zip(a, b) for f in fields)


def test_count_samples_and_patterns(shards: Path) -> None:
    assert count_samples(shards) == N_SAMPLES
    pattern = str(shards / "shard-00000{1..2}.tar")
    assert shard_paths(pattern) == [str(shards / "shard-000001.tar"), str(shards / "shard-000002.tar")]
    assert count_samples(pattern) == N_SAMPLES // N_SHARDS * 2
    assert len(shard_paths(str(shards / "*.tar"))) == N_SHARDS
    with pytest.raises(FileNotFoundError, match="shard-000009.tar"):
        shard_paths([str(shards / "shard-000009.tar")])


@pytest.mark.parametrize("world_size", [2, 4])
def test_finite_ranks_read_disjoint_shards_and_run_the_same_number_of_batches(shards: Path, world_size: int) -> None:
    cfg = _cfg()
    owner = {}  # sample fingerprint -> shard
    for path in shard_paths(shards):
        for utt in read_shard(path):
            owner[_utt_fingerprint(utt, cfg)] = path
    seen = []
    for rank in range(world_size):
        loader = _loader(shards, cfg, rank=rank, world_size=world_size, infinite=False)
        batches = list(loader)
        assert len(batches) == len(loader) > 0
        rows = [fp for b in batches for fp in _fingerprints(b)]
        assert {owner[fp] for fp in rows} <= set(shard_paths(shards)[rank::world_size])
        seen.append(set(rows))
    assert all(not (a & b) for a, b in itertools.combinations(seen, 2))
    # With 6 shards over 4 ranks, ranks 0-1 own two shards and 2-3 one: all stop at the smallest count.
    counts = {len(_loader(shards, cfg, rank=r, world_size=world_size, infinite=False)) for r in range(world_size)}
    assert len(counts) == 1


def test_resampled_mode_yields_exactly_n_full_batches_on_every_rank(shards: Path) -> None:
    # More ranks than shards and more batches than one pass holds: resampling never runs dry.
    n = N_SAMPLES // BATCH + 10
    streams = []
    for rank in range(8):
        loader = _loader(shards, rank=rank, world_size=8)
        batches = _take(loader, n)
        assert len(batches) == loader.batches == n
        assert all(b.size == BATCH for b in batches)
        assert loader.total_wait_s >= loader.last_wait_s > 0
        streams.append(batches)
    assert not _same(streams[0][:5], streams[1][:5])  # ranks draw their own streams


def test_shapes_and_max_lengths(shards: Path) -> None:
    cfg = _cfg(min_visual_len=0, max_text_tokens=0, min_words=0)  # no filter: truncation applies
    batches = list(_loader(shards, cfg, infinite=False))
    assert sum(b.size for b in batches) == N_SAMPLES
    for b in batches:
        lt, lv, la = b.text_ids.shape[1], b.visual.shape[1], b.acoustic.shape[1]
        assert b.word_ids.shape == b.text_mask.shape == b.text_ids.shape
        assert b.visual.shape[2] == 12 and b.vprob.shape == (b.size, lv, 8) and b.acoustic.shape[2] == 16
        assert lt <= cfg.max_text_len + 2 and lv <= cfg.max_visual_len and la <= cfg.max_acoustic_len
        assert (b.text_ids[:, 0] == CLS).all()
        ends = b.text_mask.sum(1) - 1
        assert (b.text_ids[torch.arange(b.size), ends] == SEP).all()
        # dynamic padding: each batch is as long as its longest row, no longer
        assert int(b.text_mask.sum(1).max()) == lt
        assert int(b.acoustic_mask.sum(1).max()) == la or la == 1
    # The set has longer clips than the limits, so truncation was exercised.
    assert max(b.text_ids.shape[1] for b in batches) == cfg.max_text_len + 2
    assert max(b.visual.shape[1] for b in batches) == cfg.max_visual_len
    assert max(b.acoustic.shape[1] for b in batches) == cfg.max_acoustic_len


def test_filters_drop_and_count_each_reason(shards: Path) -> None:
    utts = [utt for path in shard_paths(shards) for utt in read_shard(path)]
    few_words = [len(u.meta["text"].split()) < 3 for u in utts]
    long_text = [len(u.tokens) > 30 and not w for u, w in zip(utts, few_words)]
    short_visual = [u.visual.shape[0] < 10 and not (w or t) for u, w, t in zip(utts, few_words, long_text)]
    expected = {"text_words": sum(few_words), "text_tokens": sum(long_text), "visual_frames": sum(short_visual)}
    assert all(0 < n < N_SAMPLES for n in expected.values()), expected
    loader = _loader(shards, _cfg(), infinite=False)  # the defaults: the authors' text filters, min_visual_len 10
    batches = list(loader)
    assert sum(b.size for b in batches) == N_SAMPLES - sum(expected.values())
    assert loader.dropped_by_reason == expected and loader.dropped == sum(expected.values())
    assert loader.drop_metrics() == {f"dropped/{reason}": n for reason, n in expected.items()}
    assert all(int(b.visual_mask.sum(1).min()) >= 10 for b in batches)
    assert all(int(b.text_mask.sum(1).max()) <= 30 + 2 for b in batches)


def test_filter_defaults_are_the_authors_and_bad_values_name_the_key() -> None:
    data = load_config(PretrainConfig, overrides=["model.init_from=none"]).data
    assert (data.max_text_tokens, data.min_words, data.min_visual_len, data.open_shards) == (30, 3, 10, 4)
    for key, bad in (("max_text_tokens", -1), ("min_words", -1), ("open_shards", 0)):
        with pytest.raises(ConfigError, match=key):
            load_config(PretrainConfig, overrides=["model.init_from=none", f"data.{key}={bad}"])


def _clip(key: str, text: str, n_tokens: int, n_visual: int) -> Utterance:
    return Utterance(key=key, meta={"id": key, "text": text}, tokens=np.arange(5, 5 + n_tokens, dtype=np.int32),
                     words=np.arange(n_tokens, dtype=np.int32), audio=np.zeros((3, 16), np.float16),
                     visual=np.zeros((n_visual, 12), np.float16), vprob=np.full((n_visual, 8), 1 / 8, np.float16))


def test_hand_made_clips_are_dropped_for_the_right_reason(tmp_path: Path) -> None:
    clips = (
        [_clip(f"ok{i}", "one two three", 30, 10) for i in range(BATCH)]  # at every limit: kept
        + [_clip("w0", "", 3, 20), _clip("w2", "two words", 3, 20), _clip("w2t", "two words!", 40, 0)]
        + [_clip(f"t{i}", "a long line of text", 31, 20) for i in range(2)]
        + [_clip("v", "one two three", 3, 9)]
    )
    with wds.TarWriter(str(tmp_path / "clips.tar")) as sink:
        for clip in clips:
            sink.write(encode(clip))
    Manifest(shards={"clips.tar": len(clips)}, dims={}, extractors={}, settings={}).save(tmp_path)
    loader = _loader(tmp_path, _cfg(), infinite=False)
    kept = [row for b in loader for row in _fingerprints(b)]
    assert len(kept) == BATCH and loader.dropped_by_reason == {"text_words": 3, "text_tokens": 2, "visual_frames": 1}
    assert ClipFilter.of(_cfg()).reason(clips[-1]) == "visual_frames"
    everything = _loader(tmp_path, _cfg(min_visual_len=0, max_text_tokens=0, min_words=0), infinite=False)
    assert sum(b.size for b in everything) == len(clips) and everything.dropped == 0


def test_bucketing_pads_less_than_plain_batching(shards: Path) -> None:
    def mean_padding(bucket: bool) -> float:
        batches = _take(_loader(shards, _cfg(bucket_by_length=bucket)), 40)
        return sum(map(padded_share, batches)) / len(batches)

    plain, bucketed = mean_padding(False), mean_padding(True)
    assert bucketed < 0.6 * plain, (bucketed, plain)


def test_same_seed_same_batches_other_seed_other_batches(shards: Path) -> None:
    first, again = _take(_loader(shards), 20), _take(_loader(shards), 20)
    assert _same(first, again)
    assert not _same(first, _take(_loader(shards, seed=4), 20))


@pytest.mark.parametrize(("num_workers", "open_shards"), [(0, 1), (0, 3), (2, 4)])
def test_start_step_continues_the_same_stream(shards: Path, num_workers: int, open_shards: int) -> None:
    cfg = _cfg(num_workers=num_workers, open_shards=open_shards)
    start, more = 13, 12  # 13 crosses several visits and is not a multiple of the worker count
    continued = _take(_loader(shards, cfg), start + more)[start:]
    resumed = _loader(shards, cfg, start_step=start)
    assert _same(_take(resumed, more), continued)


def test_training_batches_mix_the_open_shards(shards: Path) -> None:
    cfg = _cfg(min_visual_len=0, max_text_tokens=0, min_words=0)
    owner = {_utt_fingerprint(utt, cfg): path for path in shard_paths(shards) for utt in read_shard(path)}
    assert len(owner) == N_SAMPLES

    def shards_per_batch(open_shards: int) -> list[int]:
        batches = _take(_loader(shards, _cfg(min_visual_len=0, max_text_tokens=0, min_words=0, open_shards=open_shards)), 30)
        return [len({owner[fp] for fp in _fingerprints(b)}) for b in batches]

    assert set(shards_per_batch(1)) == {1}  # one shard per visit: every batch from a single shard
    mixed = shards_per_batch(3)
    assert max(mixed) == 3 and sum(mixed) / len(mixed) > 2


def test_two_workers_yield_full_batches_and_report_drops(shards: Path) -> None:
    loader = _loader(shards, _cfg(num_workers=2))
    batches = _take(loader, 30)
    assert len(batches) == 30 and all(b.size == BATCH for b in batches)
    assert loader.dropped > 0
    # two workers read different visits: both halves of the stream are busy, not one worker twice
    assert not _same(batches[0:1], batches[1:2])


@pytest.mark.parametrize(
    ("fmt", "folder"),
    [(tarfile.PAX_FORMAT, "p" * 120), (tarfile.GNU_FORMAT, "g" * 120), (tarfile.USTAR_FORMAT, "u" * 90)],
)
def test_tar_reader_groups_samples_as_webdataset_does(shards: Path, tmp_path: Path, fmt: int, folder: str) -> None:
    # Long member names take a pax header, a GNU long-name header or the ustar prefix field.
    samples = list(itertools.islice(wds.WebDataset(str(shards / "shard-000000.tar"), shardshuffle=False), 3))
    path = tmp_path / "names.tar"
    with tarfile.open(path, "w", format=fmt) as tar:
        for sample in samples:
            for suffix, data in sample.items():
                if not suffix.startswith("__"):
                    info = tarfile.TarInfo(f"{folder}/{sample['__key__']}.{suffix}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    ours = list(tar_samples(str(path)))
    theirs = wds.WebDataset(str(path), shardshuffle=False)
    theirs = [{k: v for k, v in s.items() if k != "__local_path__"} for s in theirs]
    assert ours == theirs and len(ours) == 3 and ours[0]["__key__"].startswith(folder + "/")
    assert [s["__key__"].split("/")[-1] for s in ours] == [s["__key__"] for s in samples]
    with path.open("rb") as stream:  # what the shuffled pack reads: each sample alone, from its byte range
        assert [read_tar_sample(stream, span, str(path)) for span in reversed(tar_sample_spans(str(path)))] == ours[::-1]


def test_a_damaged_tar_names_the_file(shards: Path, tmp_path: Path) -> None:
    bad = tmp_path / "bad.tar"
    data = (shards / "shard-000000.tar").read_bytes()
    bad.write_bytes(data[: len(data) // 2])
    with pytest.raises(ShardError, match="bad.tar: corrupt tar") as raised:
        list(_loader(str(bad), infinite=False))
    assert str(raised.value).count("bad.tar") == 1


@pytest.mark.parametrize("num_workers", [0, 2])
def test_an_undecodable_sample_names_the_file_and_key(shards: Path, tmp_path: Path, num_workers: int) -> None:
    bad = tmp_path / "bad.tar"
    good = next(read_shard(str(shards / "shard-000000.tar")))
    with wds.TarWriter(str(bad)) as sink:
        sink.write(encode(good))
        sink.write({**encode(Utterance(**{**vars(good), "key": "broken"})), "visual.npy": b"not an array"})
    shutil.copy(shards / "shard-000001.tar", tmp_path / "fine.tar")
    with pytest.raises(ShardError, match="bad.tar: sample 'broken' does not decode") as raised:
        list(_loader([str(bad), str(tmp_path / "fine.tar")], _cfg(num_workers=num_workers), infinite=False))
    assert str(raised.value).count("bad.tar") == 1


def test_no_shard_filling_a_batch_fails_instead_of_spinning(shards: Path) -> None:
    with pytest.raises(ShardError, match="no shard has 8 clips"):
        _take(_loader(shards, _cfg(min_visual_len=1000)), 1)


def test_pinning_keeps_a_loader_item_a_batch(shards: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # DataLoader(pin_memory=True) pins only where CUDA exists, so the page-locking itself is stood in
    # by a recorded copy (no GPU here); what is checked is that the DataLoader's pinning walks a
    # (Batch, dropped) item into Batch.pin_memory and gets back a Batch with every tensor pinned.
    from torch.utils.data._utils.pin_memory import pin_memory

    pinned: list[torch.Tensor] = []

    def fake_pin(self: torch.Tensor, device: object = None) -> torch.Tensor:
        pinned.append(self)
        return self.clone()

    item = next(iter(_loader(str(shards)).loader.dataset))
    monkeypatch.setattr(torch.Tensor, "pin_memory", fake_pin)
    batch, dropped = pin_memory(item)
    assert isinstance(batch, Batch) and dropped == item[1]
    tensors = {name: value for name, value in vars(item[0]).items() if value is not None}
    assert len(pinned) == len(tensors) == 8
    assert all(torch.equal(getattr(batch, name), value) for name, value in tensors.items())
