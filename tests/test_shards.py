"""Resumable shard output: part files, the unit log, failures, deterministic packing and the manifest."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import numpy as np
import pytest

from memobert.schema import Manifest, Utterance, decode, encode, load_npy, tar_samples
from preprocessing.shards import ShardOutput, read_utterances


def _utt(key: str, rng: np.random.Generator, visual: int = 5) -> Utterance:
    n = int(rng.integers(1, 8))
    return Utterance(
        key=key,
        meta={"id": key, "text": "hi", "start": 0.0, "end": 1.5},
        tokens=rng.integers(1000, 2000, n),
        words=np.arange(n),
        audio=rng.normal(size=(int(rng.integers(0, 6)), 16)),
        visual=rng.normal(size=(visual, 12)),
        vprob=np.full((visual, 8), 1 / 8),
    )


def _write_run(folder: Path, units: list[str], kill_after: int | None = None) -> ShardOutput:
    out = ShardOutput(folder)
    done = out.finished_units()
    for i, unit in enumerate(units):
        if kill_after is not None and i == kill_after:
            break
        if unit in done:
            continue
        rng = np.random.default_rng(sum(map(ord, unit)))
        if unit == "broken":
            out.fail_unit(unit, "decord: cannot open broken.mp4")
        else:
            out.write_unit(unit, [_utt(f"{unit}_{j:04d}", rng) for j in range(3)], dropped={"short": 1})
    return out


def test_encode_decode_round_trip() -> None:
    utt = _utt("v_0001", np.random.default_rng(0), visual=0)
    back = decode(encode(utt))
    assert back.meta == utt.meta and back.key == utt.key
    for name in ("tokens", "words", "audio", "visual", "vprob"):
        assert getattr(back, name).dtype == getattr(utt, name).dtype
        np.testing.assert_array_equal(getattr(back, name), getattr(utt, name))
    assert back.visual.shape == (0, 12)  # a missing modality stays a 0-row array
    np.testing.assert_array_equal(load_npy(encode(utt)["audio.npy"]), utt.audio)


def test_killed_run_resumes_to_the_same_shards(tmp_path: Path) -> None:
    units = ["a", "broken", "c", "d", "e"]
    full = _write_run(tmp_path / "full", units)
    full.finalize(max_bytes=10_000, max_count=4, dims={"audio": 16}, extractors={}, settings={})

    cut = _write_run(tmp_path / "cut", units, kill_after=3)
    with (cut.folder / "units.jsonl").open("a") as f:
        f.write('{"unit": "d", "sta')  # a record cut by SIGKILL mid-write
    (cut.parts / ".d.tar.tmp").write_bytes(b"partial")  # an unfinished part
    assert set(cut.finished_units()) == {"a", "broken", "c"}
    rerun = _write_run(tmp_path / "cut", units)
    rerun.finalize(max_bytes=10_000, max_count=4, dims={"audio": 16}, extractors={}, settings={})
    (rerun.folder / "shard-000001.tar").write_bytes(b"cut short")  # a pack killed midway: finalize redoes it
    rerun.finalize(max_bytes=10_000, max_count=4, dims={"audio": 16}, extractors={}, settings={})

    def digest(folder: Path) -> dict[str, str]:
        return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.glob("shard-*.tar"))}

    assert digest(tmp_path / "full") == digest(tmp_path / "cut") and len(digest(tmp_path / "full")) == 3
    manifest = Manifest.load(tmp_path / "cut")
    assert manifest.num_samples == 12 and manifest.shards == {"shard-000000.tar": 4, "shard-000001.tar": 4, "shard-000002.tar": 4}
    keys = [u.key for shard in manifest.shard_paths(tmp_path / "cut") for u in read_utterances(Path(shard))]
    assert keys == sorted(keys) and len(set(keys)) == 12  # unit order without a seed; no duplicates, no unit lost
    failures = (tmp_path / "cut" / "failures.jsonl").read_text()
    assert len(failures.splitlines()) == 1 and "cannot open broken.mp4" in failures  # recorded once, not retried


def _pack(folder: Path, units: list[str], seed: int | None, kill_after: int | None = None) -> list[str]:
    out = _write_run(folder, units, kill_after)
    if kill_after is None:
        out.finalize(max_bytes=10**6, max_count=6, dims={"audio": 16}, extractors={}, settings={}, shuffle_seed=seed)
    return [u.key for shard in sorted(folder.glob("shard-*.tar")) for u in read_utterances(shard)]


def test_a_seed_permutes_samples_across_all_units(tmp_path: Path) -> None:
    units = [f"movie{i}" for i in range(8)]  # 3 samples each, 6 per shard
    in_order = _pack(tmp_path / "plain", units, seed=None)
    shuffled = _pack(tmp_path / "seed0", units, seed=0)
    assert shuffled == [in_order[i] for i in np.random.default_rng(0).permutation(len(in_order))]
    assert shuffled == _pack(tmp_path / "again", units, seed=0)
    assert shuffled != _pack(tmp_path / "seed1", units, seed=1) and sorted(shuffled) == sorted(in_order)
    unit_of = lambda key: key.rsplit("_", 1)[0]  # noqa: E731
    shards = [shuffled[i : i + 6] for i in range(0, len(shuffled), 6)]
    assert all(len({unit_of(k) for k in in_order[i : i + 6]}) == 2 for i in range(0, len(in_order), 6))
    assert min(len({unit_of(k) for k in shard}) for shard in shards) >= 4  # unit order packs 2 units per shard
    assert Manifest.load(tmp_path / "seed0").settings["pack"] == {"shuffled": True, "seed": 0}

    _pack(tmp_path / "killed", units, seed=0, kill_after=5)  # killed after 5 units, then rerun
    assert _pack(tmp_path / "killed", units, seed=0) == shuffled
    digests = [{p.name: p.read_bytes() for p in (tmp_path / name).glob("shard-*.tar")} for name in ("seed0", "killed")]
    assert digests[0] == digests[1]


def test_damaged_tars_and_samples_name_the_file(tmp_path: Path) -> None:
    part = _write_run(tmp_path / "run", ["a"]).parts / "a.tar"
    data = part.read_bytes()
    members_end = -(-len(data.rstrip(b"\0")) // 512) * 512  # the end-of-archive zero blocks start here
    for name, damaged in (("cut.tar", data[:1000]), ("garbage.tar", b"x" * 512), ("no_end.tar", data[:members_end])):
        (tmp_path / name).write_bytes(damaged)
        with pytest.raises(ValueError, match=re.escape(f"{tmp_path / name}: ")):
            list(tar_samples(str(tmp_path / name)))
    sample = next(tar_samples(str(part)))
    where = re.escape(f"sample a_0000 ({part}): ")
    with pytest.raises(ValueError, match=where + "Expecting"):
        decode({**sample, "json": b"{not json"})
    with pytest.raises(ValueError, match=where + "not .npy data"):
        decode({**sample, "audio.npy": b"not an array"})
