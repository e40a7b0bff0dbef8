"""The shard schema: the one place that knows how an utterance is stored in a WebDataset tar.

Writers (preprocessing) and readers (pretrain, finetune) both go through `encode` / `decode`,
read tars with `tar_samples` (a path) or `stream_samples` (any byte stream), and agree on manifest.json through `Manifest`.
"""

from __future__ import annotations

import ast
import functools
import io
import json
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

SCHEMA_VERSION = 1
MANIFEST_NAME = "manifest.json"
_BLOCK = 512  # tar block size
_END = bytes(_BLOCK)  # an all-zero block ends a tar

# Array entries of one sample: tar member suffix -> dtype. Shapes: tokens/words [Tt],
# audio [Ta, Da], visual [Tv, Dv], vprob [Tv, 8]; Ta and Tv may be 0 (modality missing).
ARRAYS: dict[str, np.dtype] = {
    "tokens": np.dtype(np.int32),
    "words": np.dtype(np.int32),
    "audio": np.dtype(np.float16),
    "visual": np.dtype(np.float16),
    "vprob": np.dtype(np.float16),
}


@dataclass
class Utterance:
    """One sample: metadata (id, video, start, end, text, speaker track; label etc. downstream) and arrays."""

    key: str
    meta: dict[str, Any]
    tokens: np.ndarray
    words: np.ndarray
    audio: np.ndarray
    visual: np.ndarray
    vprob: np.ndarray

    def __post_init__(self) -> None:
        for name, dtype in ARRAYS.items():
            setattr(self, name, np.ascontiguousarray(getattr(self, name), dtype=dtype))
        if self.tokens.shape != self.words.shape or self.tokens.ndim != 1:
            raise ValueError(f"{self.key}: tokens {self.tokens.shape} and words {self.words.shape} must be equal 1-d")
        if self.visual.shape[0] != self.vprob.shape[0]:
            raise ValueError(f"{self.key}: visual has {self.visual.shape[0]} frames, vprob {self.vprob.shape[0]}")
        for name in ("audio", "visual", "vprob"):
            if getattr(self, name).ndim != 2:
                raise ValueError(f"{self.key}: {name} must be 2-d [frames, dim], got {getattr(self, name).shape}")


def encode(utt: Utterance) -> dict[str, Any]:
    """A WebDataset sample dict (`__key__` plus one bytes entry per member) for ShardWriter."""
    sample: dict[str, Any] = {"__key__": utt.key, "json": json.dumps(utt.meta, sort_keys=True).encode()}
    for name in ARRAYS:
        buf = io.BytesIO()
        np.save(buf, getattr(utt, name), allow_pickle=False)
        sample[f"{name}.npy"] = buf.getvalue()
    return sample


def decode(sample: dict[str, Any]) -> Utterance:
    """Inverse of `encode` on the raw bytes WebDataset yields (no `.decode()` stage needed)."""
    key = sample["__key__"]
    where = f"sample {key} ({sample.get('__url__', '?')})"
    try:
        arrays = {name: load_npy(sample[f"{name}.npy"]) for name in ARRAYS}
        meta = json.loads(sample["json"])
    except KeyError as err:
        raise ValueError(f"{where}: missing member {err}") from err
    except ValueError as err:  # damaged .npy or .json bytes (json.JSONDecodeError is a ValueError)
        raise ValueError(f"{where}: {err}") from err
    return Utterance(key=key, meta=meta, **arrays)


def load_npy(data: bytes) -> np.ndarray:
    """Parse .npy bytes without a file object; about 10x faster than np.load(BytesIO) for small arrays."""
    if data[:6] != b"\x93NUMPY":
        raise ValueError("not .npy data")
    major = data[6]
    header_len_size = 2 if major == 1 else 4
    header_len = int.from_bytes(data[8 : 8 + header_len_size], "little")
    start = 8 + header_len_size
    dtype, shape = _parse_npy_header(data[start : start + header_len])
    return np.frombuffer(data, dtype=dtype, offset=start + header_len).reshape(shape)


@functools.lru_cache(maxsize=4096)
def _parse_npy_header(header: bytes) -> tuple[np.dtype, tuple[int, ...]]:
    fields = ast.literal_eval(header.decode("latin1"))
    if fields["fortran_order"]:
        raise ValueError("fortran-ordered .npy is not supported")
    return np.dtype(fields["descr"]), tuple(fields["shape"])


@dataclass
class Manifest:
    """manifest.json of one output folder: shards and counts, feature dims, extractors and settings."""

    shards: dict[str, int] = field(default_factory=dict)  # shard file name -> sample count
    dims: dict[str, int] = field(default_factory=dict)  # audio / visual / vprob feature dims
    extractors: dict[str, Any] = field(default_factory=dict)  # name, weights path and sha256 per encoder
    settings: dict[str, Any] = field(default_factory=dict)  # the resolved preprocessing config
    schema_version: int = SCHEMA_VERSION

    @property
    def num_samples(self) -> int:
        return sum(self.shards.values())

    def save(self, folder: Path) -> Path:
        path = Path(folder) / MANIFEST_NAME
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(asdict(self), indent=2, sort_keys=True))
        tmp.replace(path)  # atomic: a reader never sees half a manifest
        return path

    @classmethod
    def load(cls, folder: Path) -> "Manifest":
        path = Path(folder) / MANIFEST_NAME
        if not path.is_file():
            raise FileNotFoundError(f"no {MANIFEST_NAME} in {folder}: is this a preprocessing output folder?")
        return cls.from_json(path.read_text(), str(path))

    @classmethod
    def from_json(cls, text: str, where: str) -> "Manifest":
        """A manifest from the text of a manifest.json found at `where` (a path or URL, for messages)."""
        data = json.loads(text)
        if data.get("schema_version") != SCHEMA_VERSION:
            raise ValueError(f"{where}: schema version {data.get('schema_version')}, this code reads {SCHEMA_VERSION}")
        return cls(**data)

    def shard_paths(self, folder: Path) -> list[str]:
        return [str(Path(folder) / name) for name in sorted(self.shards)]


def tar_samples(path: str) -> Iterator[dict[str, Any]]:
    """The raw samples of a tar as webdataset groups them: {"__key__", "__url__", "<suffix>": bytes, ...}.

    A minimal ustar/pax reader instead of webdataset's tar iterator: that one runs Python's tarfile, which
    parses two headers per member (webdataset's writer adds a pax header for every float mtime) and reads
    ~2,600 samples/s per core; this reads ~27,000 (docs/benchmarks.md, Loader).
    """
    with open(path, "rb", buffering=1 << 20) as stream:  # big reads: fewer syscalls, kinder to network file systems
        yield from stream_samples(stream, path)


def stream_samples(stream: BinaryIO, name: str) -> Iterator[dict[str, Any]]:
    """`tar_samples` of an open tar byte stream (a file, an HTTP body, a pipe), read front to back; `name` goes
    into `__url__` and messages. The stream's read(n) must return n bytes unless the stream has ended."""
    for sample, _ in _grouped(stream, name, read_data=True):
        yield sample


def tar_sample_spans(path: str) -> list[tuple[int, int]]:
    """Byte range [start, end) of each sample's members (headers included), in file order; data is skipped."""
    with open(path, "rb") as stream:
        return [span for _, span in _grouped(stream, path, read_data=False)]


def read_tar_sample(stream: BinaryIO, span: tuple[int, int], path: str) -> dict[str, Any]:
    """The raw sample whose members lie in `span` of the open tar `stream` (from tar_sample_spans)."""
    stream.seek(span[0])
    blob = stream.read(span[1] - span[0])
    samples = [sample for sample, _ in _grouped(io.BytesIO(blob + _END), path, read_data=True)]
    if len(samples) != 1:
        raise ValueError(f"{path}: bytes {span[0]}-{span[1]} hold {len(samples)} samples, not one: file changed?")
    return samples[0]


def _grouped(stream: BinaryIO, path: str, read_data: bool) -> Iterator[tuple[dict[str, Any], tuple[int, int]]]:
    """(raw sample, its byte span) per sample; without read_data the members' bytes are skipped, not read.

    A span starts at the first header of the sample's first member (a pax or GNU long-name header included).
    """
    sample: dict[str, Any] = {}
    long_name = None  # from a pax or GNU long-name header, for the member that follows it
    offset = member_start = start = 0
    extended = False  # a long-name header was read: the member it belongs to starts there
    while (header := stream.read(_BLOCK)) != _END:
        if len(header) < _BLOCK:
            raise ValueError(f"{path}: ends at byte {offset + len(header)} without an end-of-archive block: truncated?")
        if header[257:262] != b"ustar":
            raise ValueError(f"{path}: no tar header at byte {offset}")
        size = int(header[124:136].rstrip(b"\0 ") or b"0", 8)
        kind = header[156:157]
        padding = -size % _BLOCK
        data = None
        if read_data or kind in (b"x", b"L"):
            data = stream.read(size)
            if len(data) < size:
                raise ValueError(f"{path}: member at byte {offset} is truncated: {len(data)} of {size} bytes")
            stream.read(padding)
        else:
            stream.seek(size + padding, io.SEEK_CUR)
        if not extended:
            member_start = offset
        offset += _BLOCK + size + padding
        extended = kind in (b"x", b"L")
        if extended:
            long_name = _pax_path(data) if kind == b"x" else data.rstrip(b"\0").decode()
            continue
        name, long_name = long_name or _header_name(header), None
        # webdataset's rule: the key is the path up to the first dot of the file name, the rest the suffix.
        dot = name.find(".", name.rfind("/") + 1)
        if kind not in (b"0", b"\0") or dot < 0:
            continue
        key, suffix = name[:dot], name[dot + 1 :].lower()
        if sample and key != sample["__key__"]:
            yield sample, (start, member_start)
            sample = {}
        if not sample:
            sample = {"__key__": key, "__url__": path}
            start = member_start
        if suffix in sample:
            raise ValueError(f"{path}: sample {key!r} has two {suffix!r} members")
        sample[suffix] = data
        end = offset
    if sample:
        yield sample, (start, end)


def _header_name(header: bytes) -> str:
    name = header[:100].split(b"\0", 1)[0]
    prefix = header[345:500].split(b"\0", 1)[0] if header[257:263] == b"ustar\0" else b""  # POSIX only
    return (prefix + b"/" + name if prefix else name).decode()


def _pax_path(records: bytes) -> str | None:
    """The path a pax extended header sets, if any (webdataset's only set mtime)."""
    for line in records.split(b"\n"):
        key, _, value = line.partition(b" ")[2].partition(b"=")
        if key == b"path":
            return value.decode()
    return None
