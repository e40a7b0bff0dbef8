"""Shards from anywhere: real HTTP and S3-compatible servers on 127.0.0.1 and pipe: commands, read by the
real loader and compared with the same shards read from the local folder."""

from __future__ import annotations

import http.server
import itertools
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from helpers import write_tiny_shards

from finetune.config import DataConfig as FinetuneDataConfig
from finetune.data import load_utterances
from memobert.config import ConfigError, load_config
from memobert.shard_store import ReadConfig
from pretrain.batch import Batch
from pretrain.config import DataConfig, PretrainConfig
from pretrain.loader import ShardError, build_loader, count_samples, read_shard, shard_paths

REPO = Path(__file__).resolve().parents[1]
N_SAMPLES, N_SHARDS, BATCH, CLS, SEP = 240, 6, 8, 101, 102
BRACES = "shard-{000000..000005}.tar"
NO_WAIT = ReadConfig(retries=1, backoff_s=0.0, timeout_s=30.0)
# Credentials the S3 server accepts; the leak test looks for them in a run's output folder.
ACCESS_KEY, SECRET_KEY = "AKIAMEMOBERTTESTKEY7", "memobert-test-secret-Zq81vX3pLw"
_SERVERS: dict[str, http.server.ThreadingHTTPServer] = {}  # root URL -> its server, for its request log


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_shards(tmp_path_factory.mktemp("remote") / "shards", N_SAMPLES, N_SHARDS, seed=0)


class _Handler(http.server.SimpleHTTPRequestHandler):
    """Python's file server plus two misbehaving paths: /stall/NAME sends half of shards/NAME and then
    hangs; /flaky/NAME drops the connection half-way the first time and serves the whole file after."""

    def log_message(self, *args: object) -> None:
        pass

    def do_HEAD(self) -> None:
        body = self._special_body()
        if body is None:
            return super().do_HEAD()
        self._headers(len(body))

    def do_GET(self) -> None:
        self.server.gets.append(self.path)  # type: ignore[attr-defined]
        body = self._special_body()
        if body is None:
            return super().do_GET()
        self._headers(len(body))
        kind = self.path.split("/")[1]
        if kind == "flaky" and self.server.gets.count(self.path) > 1:  # type: ignore[attr-defined]
            self.wfile.write(body)
            return
        self.wfile.write(body[: len(body) // 2])
        self.wfile.flush()
        if kind == "stall":
            self.server.release.wait()  # type: ignore[attr-defined]  # until the test module ends
        self.close_connection = True

    def _special_body(self) -> bytes | None:
        parts = self.path.split("/")
        if len(parts) == 3 and parts[1] in ("stall", "flaky"):
            return (Path(self.directory) / "shards" / parts[2]).read_bytes()
        return None

    def _headers(self, length: int) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "application/x-tar")
        self.send_header("Content-Length", str(length))
        self.end_headers()


@pytest.fixture(scope="module")
def http_root(tmp_path_factory: pytest.TempPathFactory, shards: Path) -> Iterator[str]:
    """http://127.0.0.1:PORT serving shards/ (with manifest.json), listed/ (tars only) and bad/ (a truncated shard)."""
    root = tmp_path_factory.mktemp("www")
    shutil.copytree(shards, root / "shards")
    (root / "listed").mkdir()
    for tar in shards.glob("*.tar"):
        shutil.copy(tar, root / "listed" / tar.name)
    (root / "bad").mkdir()
    data = (shards / "shard-000001.tar").read_bytes()
    (root / "bad" / "shard-000001.tar").write_bytes(data[: len(data) // 2])
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), lambda *a: _Handler(*a, directory=str(root)))
    server.gets, server.release = [], threading.Event()  # type: ignore[attr-defined]
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{server.server_address[1]}"
    _SERVERS[url] = server
    try:
        yield url
    finally:
        server.release.set()  # type: ignore[attr-defined]
        server.shutdown()
        server.server_close()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_for_port(port: int, process: subprocess.Popen) -> None:
    """Poll connect() until the server listens (it fails fast while the port is closed)."""
    for _ in range(100_000):
        if process.poll() is not None:
            raise RuntimeError(f"server exited with {process.returncode}: {process.stderr.read().decode()[-2000:]}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.05)  # the interval between connect() polls; the poll is the synchronisation
    raise RuntimeError(f"nothing listens on 127.0.0.1:{port}")


@pytest.fixture(scope="module")
def s3_env(shards: Path) -> Iterator[dict[str, str]]:
    """moto's S3-compatible server on 127.0.0.1 holding the shards under s3://memobert/shards/; the
    environment (endpoint, credentials) is set for this process and the runs it starts."""
    port = _free_port()
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    env = {"AWS_ENDPOINT_URL_S3": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": ACCESS_KEY,
           "AWS_SECRET_ACCESS_KEY": SECRET_KEY, "AWS_DEFAULT_REGION": "us-east-1"}
    saved = {key: os.environ.get(key) for key in env}
    os.environ.update(env)
    try:
        _wait_for_port(port, server)
        import s3fs

        fs = s3fs.S3FileSystem(skip_instance_cache=True)
        fs.mkdir("memobert")
        fs.put(str(shards) + "/", "memobert/shards/", recursive=True)
        yield env
    finally:
        server.kill()
        server.wait()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _loader(source: object, cfg: DataConfig | None = None, **overrides: object):
    args = {"batch_size": BATCH, "rank": 0, "world_size": 1, "seed": 3, "cls_id": CLS, "sep_id": SEP, **overrides}
    return build_loader(source, cfg or DataConfig(num_workers=0, shuffle_buffer=16, read=NO_WAIT), **args)


def _take(loader, n: int) -> list[Batch]:
    return list(itertools.islice(loader, n))


def _same(a: list[Batch], b: list[Batch]) -> bool:
    fields = ("text_ids", "word_ids", "visual", "vprob", "acoustic", "visual_mask", "acoustic_mask")
    return len(a) == len(b) and all(torch.equal(getattr(x, f), getattr(y, f)) for x, y in zip(a, b) for f in fields)


def _keys(source: str, read: ReadConfig = NO_WAIT) -> list[str]:
    return [utt.key for path in shard_paths(source) for utt in read_shard(path, read)]


def test_http_forms_list_and_read_like_local(shards: Path, http_root: str) -> None:
    local = shard_paths(shards)
    braces = shard_paths(f"{http_root}/shards/{BRACES}")
    assert braces == [f"{http_root}/shards/{Path(p).name}" for p in local]
    assert shard_paths(f"{http_root}/shards") == braces  # its manifest.json
    assert shard_paths(f"{http_root}/listed/") == [f"{http_root}/listed/{Path(p).name}" for p in local]  # index page
    assert count_samples(f"{http_root}/shards/shard-{{000000..000001}}.tar") == 2 * N_SAMPLES // N_SHARDS
    assert _keys(f"{http_root}/shards") == _keys(str(shards))
    assert _same(_take(_loader(f"{http_root}/shards/{BRACES}"), 20), _take(_loader(shards), 20))


def test_s3_forms_list_and_read_like_local(shards: Path, s3_env: dict[str, str]) -> None:
    braces = shard_paths(f"s3://memobert/shards/{BRACES}")
    assert braces == [f"s3://memobert/shards/{Path(p).name}" for p in shard_paths(shards)]
    assert shard_paths("s3://memobert/shards") == braces
    assert shard_paths("s3://memobert/shards/*.tar") == braces
    assert count_samples("s3://memobert/shards") == N_SAMPLES
    assert _same(_take(_loader(f"s3://memobert/shards/{BRACES}"), 20), _take(_loader(shards), 20))


def test_pipe_cat_reads_like_local(shards: Path) -> None:
    source = f"pipe:cat {shards}/{BRACES}"
    assert shard_paths(source)[0] == f"pipe:cat {shards}/shard-000000.tar"
    assert _keys(source) == _keys(str(shards))
    assert _same(_take(_loader(source), 20), _take(_loader(shards), 20))
    with pytest.raises(ShardError, match="pipe:cat /no/such.tar: .*exited with status 1"):
        list(read_shard("pipe:cat /no/such.tar", ReadConfig(retries=0)))


def test_two_ranks_read_disjoint_shards_over_http(shards: Path, http_root: str) -> None:
    source = f"{http_root}/shards/{BRACES}"
    ranks = []
    for rank in (0, 1):
        remote = list(_loader(source, rank=rank, world_size=2, infinite=False))
        assert _same(remote, list(_loader(shards, rank=rank, world_size=2, infinite=False)))
        ranks.append({tuple(row.tolist()) for batch in remote for row in batch.text_ids})
    assert ranks[0] and ranks[1] and not ranks[0] & ranks[1]
    # Training streams in DataLoader worker processes: each worker opens its own connections.
    cfg = DataConfig(num_workers=2, shuffle_buffer=16, read=NO_WAIT)
    for rank in (0, 1):
        remote = _take(_loader(source, cfg, rank=rank, world_size=2), 12)
        assert _same(remote, _take(_loader(shards, cfg, rank=rank, world_size=2), 12))


def test_resume_from_the_middle_over_s3_equals_the_uninterrupted_run(shards: Path, s3_env: dict[str, str]) -> None:
    source = f"s3://memobert/shards/{BRACES}"
    cfg = DataConfig(num_workers=2, shuffle_buffer=16, read=NO_WAIT)
    full = _take(_loader(source, cfg), 30)
    resumed = _take(_loader(source, cfg, start_step=13), 17)
    assert _same(resumed, full[13:])
    assert _same(full, _take(_loader(shards, cfg), 30))


def test_broken_remote_shards_name_the_url_after_retries(http_root: str) -> None:
    truncated = f"{http_root}/bad/shard-000001.tar"
    gets = len(_gets(http_root))
    with pytest.raises(ShardError, match=rf"{truncated}: corrupt tar after sample '.*', 3 attempts: .*truncated"):
        list(read_shard(truncated, ReadConfig(retries=2, backoff_s=0.0)))
    assert _gets(http_root)[gets:].count("/bad/shard-000001.tar") == 3
    missing = f"{http_root}/shards/shard-000099.tar"
    with pytest.raises(ShardError, match=rf"{missing}: cannot be read \(FileNotFoundError\) after sample None, 2 attempts"):
        list(read_shard(missing, NO_WAIT))


def test_broken_remote_shards_are_skipped_and_counted_when_configured(shards: Path, http_root: str) -> None:
    skip = ReadConfig(retries=0, backoff_s=0.0, skip_bad_shards=True)
    skipped: list[str] = []
    truncated = f"{http_root}/bad/shard-000001.tar"
    keys = [utt.key for utt in read_shard(truncated, skip, skipped.append)]
    whole = [utt.key for utt in read_shard(str(shards / "shard-000001.tar"))]
    assert 0 < len(keys) < len(whole) and keys == whole[: len(keys)]
    assert list(read_shard(f"{http_root}/shards/shard-000099.tar", skip, skipped.append)) == []
    assert skipped == [truncated, f"{http_root}/shards/shard-000099.tar"]
    cfg = DataConfig(num_workers=0, shuffle_buffer=16, read=skip)
    loader = _loader([f"{http_root}/shards/{BRACES}", truncated], cfg)
    _take(loader, 40)
    assert loader.skipped_shards > 0


def test_a_dropped_connection_is_retried_from_the_last_sample(shards: Path, http_root: str) -> None:
    flaky = f"{http_root}/flaky/shard-000002.tar"
    assert [u.key for u in read_shard(flaky, NO_WAIT)] == [u.key for u in read_shard(str(shards / "shard-000002.tar"))]
    assert _gets(http_root).count("/flaky/shard-000002.tar") == 2


@pytest.mark.timeout(120)  # without the read timeout this test would hang: fail it instead
def test_a_stalled_server_or_command_hits_the_read_timeout(http_root: str) -> None:
    quick = ReadConfig(retries=0, timeout_s=1.0)
    with pytest.raises(ShardError, match=rf"{http_root}/stall/shard-000003.tar: cannot be read \(.*Timeout"):
        list(read_shard(f"{http_root}/stall/shard-000003.tar", quick))
    with pytest.raises(ShardError, match=r"pipe:sleep 600: cannot be read \(TimeoutError\).*wrote nothing for 1.0 s"):
        list(read_shard("pipe:sleep 600", quick))


def test_finetune_reads_labeled_shards_over_http(shards: Path, http_root: str) -> None:
    cfg = FinetuneDataConfig(read=NO_WAIT)
    remote = load_utterances(f"{http_root}/shards", cfg)
    assert [u.key for u in remote] == [u.key for u in load_utterances(str(shards), cfg)]


def test_read_settings_are_checked_and_passwords_in_urls_refused() -> None:
    with pytest.raises(ConfigError, match="data.read.retries"):
        load_config(PretrainConfig, overrides=["data.read.retries=-1"])
    with pytest.raises(ConfigError, match="data.read.timeout_s"):
        load_config(PretrainConfig, overrides=["data.read.timeout_s=0"])
    with pytest.raises(ValueError, match="holds a password") as raised:
        shard_paths("https://user:hunter2@127.0.0.1/shard-{0..1}.tar")
    assert "hunter2" not in str(raised.value)


def test_a_pretraining_run_over_s3_leaves_no_credentials_in_its_output(tmp_path: Path, s3_env: dict[str, str]) -> None:
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "memobert.cli", "pretrain", "--config", str(REPO / "configs/pretrain/cpu_tiny.yaml"),
           "model.acoustic_dim=16", "model.visual_dim=12", "model.init_from=none", "train.steps=4", "optim.warmup_steps=2",
           "train.log_every=2", "train.ckpt_every=4", "train.val_every=4", "train.val_batches=1",
           f"data.train_shards=s3://memobert/shards/{BRACES}", "data.val_shards=s3://memobert/shards",
           f"train.out_dir={out}"]
    result = subprocess.run(cmd, capture_output=True, cwd=REPO, timeout=600, env={**os.environ, **s3_env})
    assert result.returncode == 0, result.stderr.decode()[-4000:]
    files = [path for path in out.rglob("*") if path.is_file()]
    assert any(path.name == "trainer_state.json" for path in files) and any(path.name == "metrics.jsonl" for path in files)
    for path in files:
        data = path.read_bytes()
        assert SECRET_KEY.encode() not in data and ACCESS_KEY.encode() not in data, path
    assert SECRET_KEY.encode() not in result.stdout + result.stderr


def _gets(http_root: str) -> list[str]:
    """The paths of the GET requests the server has answered so far."""
    return _SERVERS[http_root].gets  # type: ignore[attr-defined]


def test_finetune_reuses_runs_across_read_settings_but_not_across_skipping(tmp_path: Path) -> None:
    from finetune.config import FinetuneConfig
    from finetune.run import check_and_save_config

    check_and_save_config(tmp_path, load_config(FinetuneConfig, overrides=["data.read.retries=3"]))
    check_and_save_config(tmp_path, load_config(FinetuneConfig, overrides=["data.read.retries=9", "data.read.timeout_s=5"]))
    with pytest.raises(ConfigError, match="data.read.skip_bad_shards"):
        check_and_save_config(tmp_path, load_config(FinetuneConfig, overrides=["data.read.skip_bad_shards=true"]))
