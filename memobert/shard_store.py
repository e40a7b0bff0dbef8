"""Where shards live: local paths, fsspec URLs (http(s)://, s3://, ...) and `pipe:COMMAND`, read as byte streams.

A shard source is a local folder with manifest.json, a remote folder (its manifest.json, else a listing of
its .tar files), a brace/glob pattern of local paths or URLs, or `pipe:COMMAND` (the command writes the tar
to stdout). Credentials never appear here: fsspec and botocore take them from the environment, ~/.aws and
the fsspec config, so configs, logs and checkpoints only ever hold the URL.
"""

from __future__ import annotations

import contextlib
import glob
import io
import os
import select
import subprocess
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Callable
from urllib.parse import urlsplit

import webdataset as wds

from memobert.config import check
from memobert.schema import MANIFEST_NAME, Manifest

PIPE = "pipe:"
_BUFFER = 1 << 20  # big reads: fewer syscalls and requests, kinder to network file systems


@dataclass(frozen=True)
class ReadConfig:
    """How shards are read: retries and timeouts for remote ones (URLs, pipe:); skipping for any shard."""

    retries: int = 3  # re-opens of a shard that cannot be opened or ends early, resuming after its last sample
    backoff_s: float = 1.0  # wait before retry k (0-based): backoff_s * 2**k
    timeout_s: float = 60.0  # a connect or read that stalls this long fails (http(s)://, s3://, pipe:)
    skip_bad_shards: bool = False  # after the retries: skip the shard's rest and count it, instead of failing

    def validate(self) -> None:
        check(self.retries >= 0, "retries", "must be >= 0")
        check(self.backoff_s >= 0, "backoff_s", "must be >= 0")
        check(self.timeout_s > 0, "timeout_s", "must be positive")


def is_remote(source: str) -> bool:
    """A URL with a scheme (s3://, https://, ...) or a pipe: command, not a local path."""
    return source.startswith(PIPE) or "://" in source


def shard_paths(source: str | Sequence[str]) -> list[str]:
    """Sorted shard paths/URLs of a folder (manifest.json or listing), brace/glob patterns, or a list of them."""
    sources = [str(source)] if isinstance(source, (str, os.PathLike)) else [str(s) for s in source]
    if len(sources) == 1 and Path(sources[0]).is_dir():
        return [join(sources[0], name) for name in sorted(Manifest.load(Path(sources[0])).shards)]
    if len(sources) == 1 and (manifest := folder_manifest(sources[0])) is not None:
        return [join(sources[0], name) for name in sorted(manifest.shards)]
    if len(sources) == 1 and is_remote(sources[0]) and not _is_pattern(sources[0]):
        return _listing(sources[0])
    paths: set[str] = set()
    for pattern in sources:
        for expanded in wds.shardlists.expand_urls(pattern):
            paths.update(_matches(expanded))
    if not paths:
        raise FileNotFoundError(f"no shards match {source!r}")
    missing = sorted(path for path in paths if not is_remote(path) and not Path(path).is_file())
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise FileNotFoundError(f"shard not found: {missing[0]}{more}")
    return sorted(paths)


def folder_manifest(source: str) -> Manifest | None:
    """The manifest.json of `source` when it names a folder holding one (local or remote), else None."""
    if source.startswith(PIPE) or _is_pattern(source):
        return None
    _reject_credentials(source)
    if not is_remote(source):
        return Manifest.load(Path(source)) if (Path(source) / MANIFEST_NAME).is_file() else None
    import fsspec

    url = join(source, MANIFEST_NAME)
    try:
        with fsspec.open(url, "rt", **_storage_options(url, ReadConfig())) as file:
            return Manifest.from_json(file.read(), url)
    except FileNotFoundError:
        return None


def join(folder: str, name: str) -> str:
    """`name` inside `folder`, for local paths and URLs alike (pathlib would fold a URL's '//')."""
    return f"{folder.rstrip('/')}/{name}" if is_remote(folder) else str(Path(folder) / name)


def split_folder(path: str) -> tuple[str, str]:
    """(folder, file name) of a shard path or URL."""
    if is_remote(path):
        folder, _, name = path.rpartition("/")
        return folder, name
    return str(Path(path).parent), Path(path).name


@contextlib.contextmanager
def open_shard(path: str, read: ReadConfig) -> Iterator[BinaryIO]:
    """A buffered byte stream of the shard; full reads except at its end, whatever the transport."""
    if path.startswith(PIPE):
        with _pipe(path[len(PIPE) :], read.timeout_s) as stream:
            yield stream
    elif is_remote(path):
        import fsspec

        # block_size=0: one streamed GET per shard over http(s), so servers without range requests work too.
        options = {"block_size": 0} if urlsplit(path).scheme in ("http", "https") else {}
        with fsspec.open(path, "rb", **options, **_storage_options(path, read)) as file:
            yield io.BufferedReader(_RawReader(file.read), _BUFFER)  # type: ignore[arg-type]
    else:
        with open(path, "rb", buffering=_BUFFER) as stream:
            yield stream


def _matches(pattern: str) -> list[str]:
    _reject_credentials(pattern)
    if pattern.startswith(PIPE) or not glob.has_magic(pattern):
        return [pattern]
    if not is_remote(pattern):
        return sorted(glob.glob(pattern))
    import fsspec

    fs, _, _ = fsspec.get_fs_token_paths(pattern, storage_options=_storage_options(pattern, ReadConfig()))
    scheme = urlsplit(pattern).scheme
    return sorted(m if "://" in m else f"{scheme}://{m}" for m in fs.glob(pattern))


def _listing(folder: str) -> list[str]:
    """The .tar files of a remote folder without manifest.json (an HTTP index page works too)."""
    import fsspec

    _reject_credentials(folder)
    fs, _, _ = fsspec.get_fs_token_paths(folder, storage_options=_storage_options(folder, ReadConfig()))
    names = [entry for entry in fs.ls(folder, detail=False) if entry.rstrip("/").endswith(".tar")]
    if not names:
        raise FileNotFoundError(f"no {MANIFEST_NAME} and no .tar files in {folder}")
    return sorted(join(folder, entry.rstrip("/").rpartition("/")[2]) for entry in names)


def _is_pattern(source: str) -> bool:
    return "{" in source or glob.has_magic(source) or source.endswith(".tar")


def _reject_credentials(url: str) -> None:
    if "://" in url and urlsplit(url).password is not None:
        host = urlsplit(url).hostname
        raise ValueError(f"shard URL for {host} holds a password: set credentials in the environment, ~/.aws or "
                         "the fsspec config instead, so that no config, log or checkpoint stores them")


def _storage_options(url: str, read: ReadConfig) -> dict[str, Any]:
    """Timeouts per transport; everything else (endpoint, credentials) comes from the environment and fsspec config."""
    scheme = urlsplit(url).scheme
    if scheme in ("http", "https"):
        import aiohttp

        return {"client_kwargs": {"timeout": aiohttp.ClientTimeout(total=None, sock_connect=read.timeout_s,
                                                                  sock_read=read.timeout_s)}}
    if scheme in ("s3", "s3a"):
        return {"config_kwargs": {"connect_timeout": read.timeout_s, "read_timeout": read.timeout_s}}
    return {}


class _RawReader(io.RawIOBase):
    """A raw stream over a read(n) function that may return short reads (aiohttp, s3 bodies)."""

    def __init__(self, read: Callable[[int], bytes]) -> None:
        self._read = read

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        data = self._read(len(buffer))
        buffer[: len(data)] = data
        return len(data)


class _PipeReader(io.RawIOBase):
    """The stdout of a pipe: command; a read that waits longer than the timeout raises TimeoutError."""

    def __init__(self, fd: int, command: str, timeout_s: float) -> None:
        self._fd, self._command, self._timeout_s = fd, command, timeout_s

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        if not select.select([self._fd], [], [], self._timeout_s)[0]:
            raise TimeoutError(f"pipe:{self._command} wrote nothing for {self._timeout_s} s")
        data = os.read(self._fd, len(buffer))
        buffer[: len(data)] = data
        return len(data)


@contextlib.contextmanager
def _pipe(command: str, timeout_s: float) -> Iterator[BinaryIO]:
    # stderr goes to a file: a chatty command (progress bars) must not block on a full pipe nobody reads.
    with tempfile.TemporaryFile() as stderr:
        process = subprocess.Popen(command, shell=True, stdout=subprocess.PIPE, stderr=stderr)
        assert process.stdout is not None
        stream = io.BufferedReader(_PipeReader(process.stdout.fileno(), command, timeout_s), _BUFFER)
        try:
            try:
                yield stream  # type: ignore[misc]
                while stream.read(_BUFFER):  # the tar's zero padding after its end-of-archive block
                    pass
            except (TimeoutError, GeneratorExit):
                raise
            except Exception as err:
                # A short or broken tar from a failed command: its exit status and stderr say more.
                _check_exit(process, command, stderr, min(timeout_s, 5.0), err)
                raise
            _check_exit(process, command, stderr, timeout_s, None)
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()
            process.stdout.close()


def _check_exit(process: subprocess.Popen, command: str, stderr: BinaryIO, timeout_s: float,
                cause: Exception | None) -> None:
    """Raise OSError with the command's stderr when it exited non-zero (or, with no `cause`, did not exit)."""
    try:
        status = process.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        if cause is not None:
            return
        raise
    if status != 0:
        stderr.seek(0)
        error = stderr.read().decode(errors="replace").strip()[-500:]
        raise OSError(f"pipe:{command} exited with status {status}: {error}") from cause
